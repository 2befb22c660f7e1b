"""What sf-bench measures on: the default bundles (exported once and cached), the footage and standing questions
of the watch suite, and the questions of the question-aware suite."""
from __future__ import annotations

import os
from pathlib import Path

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sfedge" / "bench"

QA_MODES = {"slowfast": ("uniform", "slowfast"), "clip-selection": ("clip", "slowfast"),
            "prompt-guided": ("uniform", "prompt-guided"), "clip+prompt-guided": ("clip", "prompt-guided")}
QA_QUESTIONS = ("What is the rabbit doing?", "Is there a butterfly?", "What color is the sky?",
                "Does anything fall from a tree?")

WATCH_RULES = [{"name": "what", "question": "What is happening?", "every": "10s", "window": "20s"},
               {"name": "who", "question": "Is anyone in the scene?", "every": "10s", "window": "20s"}]


def _checkpoint(log) -> Path:
    from sfedge.export.demo import build_demo_checkpoint

    ckpt = CACHE / "checkpoint"
    if not (ckpt / "config.json").exists():
        log("building the default workload's checkpoint (ViT-B/16-sized tower + SmolLM2-135M-Instruct)")
        build_demo_checkpoint(ckpt)
    return ckpt


def _export(ckpt: Path, bundle: Path, log, what: str, **options) -> None:
    from sfedge.export.bundle import Log, Options, export
    from sfedge.export.demo import UNTRAINED_NOTE

    if not (bundle / "manifest.json").exists():
        log(f"exporting it{what} (once; cached under ~/.cache/sfedge/bench)")
        export(ckpt, bundle, Options(note=UNTRAINED_NOTE, force=True, **options), Log())


def default_bundle(log) -> tuple[Path, Path]:
    """The default workload: ViT-B/16-sized seeded tower + real SmolLM2, exported once and cached."""
    ckpt, bundle = _checkpoint(log), CACHE / "bundle"
    _export(ckpt, bundle, log, "", vision_variants=("fp32", "fp16", "int8"))
    return ckpt, bundle


def question_aware_bundle(log) -> tuple[Path, Path]:
    """The default workload plus a CLIP side: a seeded ViT-B/16-sized CLIP whose vision tower is the demo's."""
    from sfedge.export.demo import build_clip_checkpoint

    ckpt, clip, bundle = _checkpoint(log), CACHE / "clip-b16", CACHE / "qa-bundle"
    if not (clip / "config.json").exists():
        log("building a ViT-B/16-sized random CLIP around the demo's vision tower")
        build_clip_checkpoint(ckpt, clip)
    _export(ckpt, bundle, log, " with --clip", clip=str(clip))
    return ckpt, bundle


def looped_footage(size, seconds: float, fps: float = 25.0):
    """bigbuckbunny.mp4 then bikes.mp4, looped, as (t, frame) pairs: real footage for as long as a soak needs."""
    import cv2

    from sfedge.runtime.video import demo_video
    frames = []
    for name in ("bigbuckbunny.mp4", "bikes.mp4"):
        cap = cv2.VideoCapture(str(demo_video().with_name(name)))
        while True:
            ok, f = cap.read()
            if not ok:
                break
            frames.append(cv2.resize(f, size[::-1], interpolation=cv2.INTER_AREA))
        cap.release()
    return ((i / fps, frames[i % len(frames)]) for i in range(int(seconds * fps)))


def bikes_video() -> str:
    """bikes.mp4 (250 frames: room for the scale suite's 200)."""
    from sfedge.runtime.video import demo_video
    return str(demo_video().with_name("bikes.mp4"))
