"""sf-export's build step: checkpoint in, verified bundle out, written atomically.

The bundle is assembled in a hidden sibling folder and renamed into place only when every graph has passed its
fidelity check, so an export that fails or is interrupted leaves no half bundle behind.
"""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sfedge import calibration
from sfedge.calibration.frames import sample_frames
from sfedge.runtime import manifest as manifest_schema
from sfedge.runtime.errors import BadInput, ExportFailed, LowFidelity
from sfedge.runtime.tokens import slow_indices, visual_token_count

from . import checkpoint as ckpt_io
from . import clip, fidelity, graphs, llm, llm_fidelity
from .aggregator import POOLS, reference_tokens
from .prompt_spec import eos_ids, prompt_spec
from .vision import reference_features

VISION_VARIANTS = ("fp32", "fp16", "int8")


@dataclass
class Options:
    num_frames: int = 50
    slow_frames: int = 10
    slow_pool: str = "max1d"
    fast_grid: tuple = (4, 4)
    vision_variants: tuple = ("fp32", "int8")
    calibration_videos: list = field(default_factory=list)
    llm_precision: str = "int4"
    llm_quant: str = "imatrix"
    block_size: int = 32
    embeddings: str = "float16"
    allow_low_fidelity: bool = False
    force: bool = False
    fidelity_text_tokens: int = 2048
    nf4: bool = False
    kv_cache: str = "float32"
    note: str | None = None
    clip: str | None = None  # CLIP / SigLIP checkpoint folder: question-aware selection and pooling
    allow_mismatched_clip: bool = False
    pooling_kernel: tuple = (2, 3, 3)  # prompt-guided pooling window over T, H, W
    pooling_temperature: float = 0.01

    def check(self):
        if self.slow_pool not in POOLS:
            raise BadInput(f"--slow-pool {self.slow_pool!r}: choose one of {', '.join(POOLS)}")
        bad = [v for v in self.vision_variants if v not in VISION_VARIANTS]
        if bad or "fp32" not in self.vision_variants:
            raise BadInput(f"--vision-variants: fp32 plus any of fp16, int8 (got {', '.join(self.vision_variants)})")
        if self.num_frames < 1 or self.slow_frames < 1 or min(self.fast_grid) < 1:
            raise BadInput("--frames, --slow-frames and --fast-grid must be positive")
        if self.llm_precision not in ("int4", "fp32") or self.llm_quant not in llm.QUANT_SCHEMES:
            raise BadInput(f"--llm-precision int4|fp32 and --llm-quant {'|'.join(llm.QUANT_SCHEMES)}")
        if self.block_size not in (32, 64, 128):
            raise BadInput("--block-size must be 32, 64 or 128")
        if self.kv_cache not in ("float32", "int8"):
            raise BadInput("--kv-cache must be float32 or int8")
        if self.embeddings not in ("float16", "float32", "int8"):
            raise BadInput("--embeddings must be float16, float32 or int8")
        if len(self.pooling_kernel) != 3 or min(self.pooling_kernel) < 1 or self.pooling_temperature <= 0:
            raise BadInput("--pooling-kernel needs three positive sizes and --pooling-temperature a positive value")


class Log:
    def __init__(self, quiet=False):
        self.t0, self.quiet = time.perf_counter(), quiet

    def __call__(self, msg: str):
        if not self.quiet:
            print(f"[sf-export {time.perf_counter() - self.t0:6.1f}s] {msg}", file=__import__("sys").stderr,
                  flush=True)


def export(checkpoint_dir, out_dir, opts: Options, log=None) -> dict:
    log = log or Log()
    quiet_libraries()
    opts.check()
    out = Path(out_dir)
    if out.exists() and not opts.force:
        raise BadInput(f"{out}: already exists; choose another folder or pass --force to replace it")
    log(f"reading checkpoint {checkpoint_dir}")
    ckpt = ckpt_io.load(checkpoint_dir)
    side = None
    if opts.clip:
        log(f"reading the CLIP side {opts.clip} and comparing its vision tower with the checkpoint's")
        side = clip.load(opts.clip, ckpt, opts.allow_mismatched_clip)
        if side.difference:
            log(f"warning: mismatched CLIP tower allowed: {side.difference}")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    work = Path(tempfile.mkdtemp(prefix="sfedge-export-"))
    try:
        manifest = _build(ckpt, staging, work, opts, log, side)
        _replace(staging, out)
        return manifest
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ExportFailed(f"{out.parent}: disk full while writing the bundle ({e.strerror}); nothing was "
                               f"written, free some space and export again") from None
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def quiet_libraries():
    """Our progress lines replace the libraries' progress bars and advice."""
    import logging

    import transformers


    transformers.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime.quantization logs advice on the root logger


def _replace(staging: Path, out: Path):
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
        os.rename(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staging, out)


def _build(ckpt, bundle: Path, work: Path, opts: Options, log, side=None) -> dict:
    vision = dict(ckpt.vision)
    agg = {"graph": "aggregator.onnx", "num_frames": opts.num_frames, "slow_frames": opts.slow_frames,
           "slow_pool": opts.slow_pool, "fast_grid": list(opts.fast_grid)}
    report = {}
    frames = sample_frames(opts.calibration_videos, tuple(vision["image_size"]), count=8)
    with torch.no_grad():
        ref = reference_features(ckpt.model, vision, torch.from_numpy(frames)).numpy()
    clip_ref = side and clip.reference_outputs(side, ckpt.model, vision, torch.from_numpy(frames))

    log(f"tracing the vision tower + projector ({vision['tower']}, {vision['patch_grid'][0]}x"
        f"{vision['patch_grid'][1]} grid) to ONNX")
    vision["graphs"] = {"fp32": "vision.fp32.onnx"}
    if side:  # the CLIP-space head rides along: frames are encoded once
        clip.export_vision(ckpt.model, vision, side, bundle / "vision.fp32.onnx", torch.from_numpy(frames[:2]))
    else:
        graphs.export_vision(ckpt.model, vision, bundle / "vision.fp32.onnx", torch.from_numpy(frames[:2]))
    if "fp16" in opts.vision_variants:
        log("converting the vision graph to fp16")
        graphs.convert_fp16(bundle / "vision.fp32.onnx", bundle / "vision.fp16.onnx")
        vision["graphs"]["fp16"] = "vision.fp16.onnx"
    if "int8" in opts.vision_variants:
        if opts.calibration_videos:
            log(f"static int8 (QDQ) quantization, calibrated on {len(opts.calibration_videos)} video(s)")
            from sfedge.calibration.frames import FrameReader
            graphs.quantize_int8_static(bundle / "vision.fp32.onnx", bundle / "vision.int8.onnx",
                                        FrameReader(opts.calibration_videos, tuple(vision["image_size"])))
            method = "static QDQ"
        else:
            log("dynamic int8 quantization of the vision graph")
            graphs.quantize_int8_dynamic(bundle / "vision.fp32.onnx", bundle / "vision.int8.onnx")
            method = "dynamic"
        vision["graphs"]["int8"] = "vision.int8.onnx"
        vision["int8_method"] = method
    for precision, rel in vision["graphs"].items():
        out = graphs.run_graph(bundle / rel, {"frames": frames})
        report[f"vision.{precision}"] = fidelity.verdict(fidelity.compare(ref, out), precision)
        if side:
            report.update(clip.vision_fidelity(bundle / rel, frames, clip_ref, precision))

    log("tracing the SlowFast aggregator to ONNX")
    graphs.export_aggregator(vision, agg, bundle / agg["graph"])
    skip = int(vision["has_cls_token"])
    feats = np.random.default_rng(0).standard_normal(
        (opts.num_frames, vision["tokens_per_frame"], vision["hidden_size"])).astype(np.float32)
    for t in sorted({opts.num_frames, max(1, opts.num_frames // 3), 1}):
        ref_tokens = reference_tokens(torch.from_numpy(feats[:t]), opts.slow_frames, vision["patch_grid"], skip,
                                      opts.slow_pool, opts.fast_grid).numpy()
        got = graphs.run_graph(bundle / agg["graph"], {"features": feats[:t], "fast_index": np.arange(t),
                                                        "slow_index": slow_indices(t, opts.slow_frames)})
        report[f"aggregator.T{t}"] = fidelity.verdict(fidelity.compare(ref_tokens, got), "fp32")
    if side:  # frames chosen among candidates: any slow frames, a subset as the fast pathway
        slow, fast = selected_pathways(opts.num_frames, opts.slow_frames)
        want = selected_reference(torch.from_numpy(feats), slow, fast, vision, agg)
        got = graphs.run_graph(bundle / agg["graph"], {"features": feats, "slow_index": slow, "fast_index": fast})
        report["aggregator.selected"] = fidelity.verdict(fidelity.compare(want, got), "fp32")

    # Real visual tokens in front of a question: int4 (and int8 KV) error on them is what text-only checks miss.
    with torch.no_grad():
        visual = reference_tokens(torch.from_numpy(ref), opts.slow_frames, vision["patch_grid"], skip,
                                  opts.slow_pool, opts.fast_grid).numpy()
    question_side = side and clip.export_question_side(side, vision, bundle, work, opts.pooling_kernel,
                                                       opts.pooling_temperature, report, log)
    log(f"language model: {ckpt.language_model_type}, {opts.llm_precision}")
    lm = llm.language_model(ckpt.model)
    llm_spec = llm.write_llm(lm, ckpt.tokenizer, bundle, work, precision=opts.llm_precision,
                             block_size=opts.block_size, scheme=opts.llm_quant, embed_dtype=opts.embeddings,
                             kv_cache=opts.kv_cache, visual_tokens=visual, log=log)
    prompt = prompt_spec(ckpt.tokenizer, vision["image_token"], eos_ids(ckpt.model, ckpt.tokenizer))
    tok_dir = work / "tokenizer"
    ckpt.tokenizer.save_pretrained(tok_dir)
    shutil.copy(tok_dir / "tokenizer.json", bundle / "tokenizer.json")

    figures = llm_fidelity.measure(lm, ckpt.tokenizer, bundle, llm_spec, prompt,
                                   text_tokens=opts.fidelity_text_tokens, visual_tokens=visual, log=log)
    report["llm"] = llm_fidelity.verdict(figures, opts.llm_precision)
    nf4_section = None
    if opts.nf4:
        from . import nf4

        log("quantizing the language model to bitsandbytes nf4 (the PyTorch hosts' backend)")
        nf4_section = nf4.write_nf4(lm, bundle, work)
        ids = np.array(ckpt.tokenizer(calibration.english_text(), add_special_tokens=False)["input_ids"]
                       [:opts.fidelity_text_tokens])
        ppl = nf4.perplexity(bundle, ids)
        ref = report["llm"]["perplexity"]["reference"]
        report["llm_nf4"] = {"perplexity": {"exported": ppl, "reference": ref, "ratio": ppl / ref},
                             "threshold": f"perplexity <= {llm_fidelity.MAX_PPL_RATIO}x PyTorch's",
                             "measured": f"perplexity {ppl / ref:.3f}x",
                             "passed": ppl / ref <= llm_fidelity.MAX_PPL_RATIO}

    failed = [k for k, v in report.items() if not v["passed"]]
    if failed and not opts.allow_low_fidelity:
        detail = "; ".join(f"{k}: {report[k]['measured']}, needs {report[k]['threshold']}" for k in failed)
        raise LowFidelity(f"not written: {', '.join(failed)} missed the fidelity threshold ({detail}); pass "
                          f"--allow-low-fidelity to write it anyway, marked as such")
    report["all_passed"] = not failed
    if failed:
        report["low_fidelity_allowed"] = failed

    manifest = {
        "source": {"checkpoint": str(Path(ckpt.path).resolve()), "architecture": ckpt.architecture,
                   "language_model": ckpt.language_model_type, **({"note": opts.note} if opts.note else {})},
        "vision": vision,
        "aggregator": agg,
        "llm": llm_spec,
        "tokenizer": "tokenizer.json",
        "prompt": prompt,
        "fidelity": report,
        "visual_tokens_per_video": visual_token_count(opts.num_frames, agg, vision["patch_grid"]),
    }
    if nf4_section:
        manifest["llm_nf4"] = nf4_section
    if question_side:
        manifest.update(question_side)
    manifest_schema.write(bundle, manifest)
    return manifest_schema.load(bundle)


def selected_pathways(t: int, s: int) -> tuple[np.ndarray, np.ndarray]:
    """A selection-shaped check case: S slow frames in temporal order and every other frame as the fast pathway."""
    rng = np.random.default_rng(1)
    return np.sort(rng.choice(t, min(s, t), replace=False)), np.arange(0, t, 2)


def selected_reference(feats, slow, fast, vision: dict, agg: dict) -> np.ndarray:
    """The aggregator's rules applied to gathered frames: the slow part of the chosen slow frames, then the fast
    part of the fast-pathway frames, each by the plain statement."""
    skip, grid, pool, fast_grid = int(vision["has_cls_token"]), vision["patch_grid"], agg["slow_pool"], agg["fast_grid"]
    per_slow = visual_token_count(1, {**agg, "slow_frames": 1, "fast_grid": (0, 0)}, grid)
    with torch.no_grad():
        s = reference_tokens(feats[slow], len(slow), grid, skip, pool, fast_grid)
        f = reference_tokens(feats[fast], 1, grid, skip, pool, fast_grid)
    return torch.cat([s[:len(slow) * per_slow], f[per_slow:]]).numpy()
