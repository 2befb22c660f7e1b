"""sf-export's build step: checkpoint in, verified bundle out, written atomically.

The bundle is assembled in a hidden sibling folder and renamed into place only when every graph has passed its
fidelity check, so an export that fails or is interrupted leaves no half bundle behind.
"""
from __future__ import annotations

import errno
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sfedge.calibration.frames import sample_frames
from sfedge.runtime import manifest as manifest_schema
from sfedge.runtime.config_plan import wants_int8_twin
from sfedge.runtime.cpu import INT8_SAFE_LIMIT
from sfedge.runtime.errors import BadInput, ExportFailed, LowFidelity
from sfedge.runtime.memory import give_back
from sfedge.runtime.prompt import CHOICES, eos_ids, spec_from_tokenizer
from sfedge.runtime.tokens import slow_indices, visual_token_count

from . import checkpoint as ckpt_io
from . import clip, fidelity, graphs, llm, llm_fidelity, nf4
from .aggregator import POOLS, reference_tokens
from .calibration_reader import FrameReader
from .streamed import LayerStream, causal_lm_folder
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
    prefill: str = "auto"  # int8: an int8-weight prefill twin; none; auto: int8 up to TWIN_MAX_PARAMS
    note: str | None = None
    choice: str = "letter"  # how the model answers multiple choice by default (prompt.CHOICES), into the manifest
    clip: str | None = None  # CLIP / SigLIP checkpoint folder: question-aware selection and pooling
    allow_mismatched_clip: bool = False
    pooling_kernel: tuple = (2, 3, 3)  # prompt-guided pooling window over T, H, W
    pooling_temperature: float = 0.01
    hub: dict | None = None  # {"repo_id", "revision"} when the checkpoint was named by a hub id

    def int8_prefill(self, ckpt) -> bool:
        """Whether to write the int8 prefill twin (of a 4-bit language model): asked for, or by default when its
        weights stay small (config_plan.wants_int8_twin, which sf-plan predicts with)."""
        return self.llm_precision == "int4" and wants_int8_twin(self.prefill, llm.dims(ckpt.model.config.text_config))

    def check(self):
        if self.slow_pool not in POOLS:
            raise BadInput(f"--slow-pool {self.slow_pool!r}: choose one of {', '.join(POOLS)}")
        bad = [v for v in self.vision_variants if v not in VISION_VARIANTS]
        if bad or "fp32" not in self.vision_variants:
            raise BadInput(f"--vision-variants: fp32 plus any of fp16, int8 (got {', '.join(self.vision_variants)})")
        if self.choice not in CHOICES:
            raise BadInput(f"--choice {self.choice!r}: choose one of {', '.join(CHOICES)}")
        if self.num_frames < 1 or self.slow_frames < 1 or min(self.fast_grid) < 1:
            raise BadInput("--frames, --slow-frames and --fast-grid must be positive")
        if self.llm_precision not in llm.PRECISIONS or self.llm_quant not in llm.QUANT_SCHEMES:
            raise BadInput(f"--llm-precision {'|'.join(llm.PRECISIONS)} and "
                           f"--llm-quant {'|'.join(llm.QUANT_SCHEMES)}")
        if self.block_size not in (32, 64, 128):
            raise BadInput("--block-size must be 32, 64 or 128")
        if self.kv_cache not in ("float32", "int8"):
            raise BadInput("--kv-cache must be float32 or int8")
        if self.prefill not in ("auto", "int8", "none"):
            raise BadInput("--prefill must be auto, int8 or none")
        if self.embeddings not in ("float16", "float32", "int8"):
            raise BadInput("--embeddings must be float16, float32 or int8")
        if len(self.pooling_kernel) != 3 or min(self.pooling_kernel) < 1 or self.pooling_temperature <= 0:
            raise BadInput("--pooling-kernel needs three positive sizes and --pooling-temperature a positive value")


class Log:
    def __init__(self, quiet=False):
        self.t0, self.quiet = time.perf_counter(), quiet

    def __call__(self, msg: str):
        if not self.quiet:
            print(f"[sf-export {time.perf_counter() - self.t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    def bar(self, desc: str, total: int):
        """A per-layer progress bar with its ETA on stderr (silent when quiet)."""
        from tqdm import tqdm

        return tqdm(total=total, desc=f"[sf-export] {desc}", unit="layer", file=sys.stderr, disable=self.quiet,
                    dynamic_ncols=True)


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
    """The stages in order, each writing its graphs and returning its manifest section(s) and its checks'
    verdicts; one gate over every verdict, then the manifest."""
    frames = sample_frames(opts.calibration_videos, tuple(ckpt.vision["image_size"]), count=8)
    with torch.no_grad():
        features = reference_features(ckpt.model, ckpt.vision, torch.from_numpy(frames)).numpy()
    vision, report = _vision(ckpt, bundle, frames, features, opts, side, log)
    give_back()  # the tracer's and the quantizer's peak, before the next stage adds its own
    agg, checks = _aggregator(vision, bundle, opts, side, log)
    report.update(checks)
    extra = {}
    if side:
        extra, checks = clip.export_question_side(side, vision, bundle, work, opts.pooling_kernel,
                                                  opts.pooling_temperature, log)
        report.update(checks)
    visual = _slowfast_reference(features, vision, agg)
    stream, llm_spec, prompt, checks = _language_model(ckpt, bundle, work, opts, visual, log)
    report.update(checks)
    if opts.nf4:
        extra["llm_nf4"], report["llm_nf4"] = _nf4(stream, ckpt.tokenizer, bundle, work, opts, report["llm"], log)
    _gate(report, opts.allow_low_fidelity)
    return _manifest(bundle, ckpt, opts, {"vision": vision, "aggregator": agg, "llm": llm_spec, "prompt": prompt,
                                          "fidelity": report, **extra})


def _vision(ckpt, bundle: Path, frames: np.ndarray, features: np.ndarray, opts: Options, side,
            log) -> tuple[dict, dict]:
    """The vision tower + projector traced (with the CLIP-space head riding along when there is a CLIP side, so
    frames are encoded once), its fp16 and int8 variants, and each checked against PyTorch on `frames`."""
    vision = dict(ckpt.vision)
    log(f"tracing the vision tower + projector ({vision['tower']}, {vision['patch_grid'][0]}x"
        f"{vision['patch_grid'][1]} grid) to ONNX")
    fp32 = bundle / "vision.fp32.onnx"
    vision["graphs"] = {"fp32": fp32.name}
    clip_ref = side and clip.reference_outputs(side, ckpt.model, ckpt.vision, torch.from_numpy(frames))
    ckpt.model.to("meta")  # the references are taken: the fp32 tower's memory goes to the tracer, then the quantizer
    give_back()
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as child:
        child.submit(trace_vision, ckpt.path, opts.clip, opts.allow_mismatched_clip, vision, fp32,
                     frames[:2]).result()
    if "fp16" in opts.vision_variants:
        log("converting the vision graph to fp16")
        vision["graphs"]["fp16"] = graphs.convert_fp16(fp32, bundle / "vision.fp16.onnx").name
    if "int8" in opts.vision_variants:
        vision["graphs"]["int8"] = "vision.int8.onnx"
        vision["int8_method"] = _vision_int8(fp32, bundle / "vision.int8.onnx", vision, opts, log)
        vision["int8_weight_limit"] = INT8_SAFE_LIMIT  # ONNX Runtime's reduce_range (graphs.py)
    report = {}
    for precision, rel in vision["graphs"].items():
        out = graphs.run_graph(bundle / rel, {"frames": frames})
        report[f"vision.{precision}"] = fidelity.verdict(fidelity.compare(features, out), precision)
        if side:
            report.update(clip.vision_fidelity(bundle / rel, frames, clip_ref, precision))
    return vision, report


def trace_vision(checkpoint: Path, clip_dir, allow_mismatch: bool, vision: dict, path: Path,
                 sample_frames: np.ndarray) -> None:
    """The tower + projector (with the CLIP side's head, if any) traced to `path`, run in a child process: the
    tracer keeps the traced module's weights alive afterwards (measured: SigLIP-so400m's 1.6 GB stayed resident
    through the rest of the export), so it runs where its memory ends with it."""
    ckpt = ckpt_io.load(checkpoint)
    frames = torch.from_numpy(sample_frames)
    if clip_dir:
        clip.export_vision(ckpt.model, vision, clip.load(clip_dir, ckpt, allow_mismatch), path, frames)
    else:
        graphs.export_vision(ckpt.model, vision, path, frames)


def _vision_int8(fp32: Path, dst: Path, vision: dict, opts: Options, log) -> str:
    """Static QDQ when there are calibration videos, dynamic otherwise; returns the method for the manifest."""
    if opts.calibration_videos:
        log(f"static int8 (QDQ) quantization, calibrated on {len(opts.calibration_videos)} video(s)")
        graphs.quantize_int8_static(fp32, dst, FrameReader(opts.calibration_videos, tuple(vision["image_size"])))
        return "static QDQ"
    log("dynamic int8 quantization of the vision graph")
    graphs.quantize_int8_dynamic(fp32, dst)
    return "dynamic"


def _aggregator(vision: dict, bundle: Path, opts: Options, side, log) -> tuple[dict, dict]:
    """The SlowFast aggregator traced and checked against its plain statement on random features, at T, T/3 and
    one frame; with a CLIP side also on frames chosen among candidates (any slow frames, a subset as fast)."""
    agg = {"graph": "aggregator.onnx", "num_frames": opts.num_frames, "slow_frames": opts.slow_frames,
           "slow_pool": opts.slow_pool, "fast_grid": list(opts.fast_grid)}
    log("tracing the SlowFast aggregator to ONNX")
    path = graphs.export_aggregator(vision, agg, bundle / agg["graph"])
    feats = np.random.default_rng(0).standard_normal(
        (opts.num_frames, vision["tokens_per_frame"], vision["hidden_size"])).astype(np.float32)
    report = {}
    for t in sorted({opts.num_frames, max(1, opts.num_frames // 3), 1}):
        want = _slowfast_reference(feats[:t], vision, agg)
        got = graphs.run_graph(path, {"features": feats[:t], "fast_index": np.arange(t),
                                      "slow_index": slow_indices(t, opts.slow_frames)})
        report[f"aggregator.T{t}"] = fidelity.verdict(fidelity.compare(want, got), "fp32")
    if side:
        slow, fast = selected_pathways(opts.num_frames, opts.slow_frames)
        want = selected_reference(torch.from_numpy(feats), slow, fast, vision, agg)
        got = graphs.run_graph(path, {"features": feats, "slow_index": slow, "fast_index": fast})
        report["aggregator.selected"] = fidelity.verdict(fidelity.compare(want, got), "fp32")
    return agg, report


def _slowfast_reference(features: np.ndarray, vision: dict, agg: dict) -> np.ndarray:
    """The aggregator's tokens for `features` [T, N, D], the PyTorch way."""
    with torch.no_grad():
        return reference_tokens(torch.from_numpy(features), agg["slow_frames"], vision["patch_grid"],
                                int(vision["has_cls_token"]), agg["slow_pool"], agg["fast_grid"]).numpy()


def _language_model(ckpt, bundle: Path, work: Path, opts: Options, visual: np.ndarray, log):
    """The decoder, its embeddings, tokenizer and prompt section, measured against PyTorch with the calibration
    frames' real visual tokens in front of a question: int4 (and int8 KV) error on them is what text-only checks
    miss. Writing and checking stream the checkpoint a layer at a time. Returns the layer stream (for nf4), the
    llm and prompt sections and the verdict."""
    log(f"language model: {ckpt.language_model_type}, {opts.llm_precision}")
    stream = LayerStream(ckpt.shards, ckpt.model.config.text_config)
    prompt = {**spec_from_tokenizer(ckpt.tokenizer, eos_ids(ckpt.model, ckpt.tokenizer)), "choice": opts.choice}
    llm_spec, figures = llm.write_llm(stream, ckpt.tokenizer, bundle, prompt, precision=opts.llm_precision,
                                      block_size=opts.block_size, scheme=opts.llm_quant, embed_dtype=opts.embeddings,
                                      kv_cache=opts.kv_cache, int8_prefill=opts.int8_prefill(ckpt),
                                      visual_tokens=visual,
                                      text_tokens=opts.fidelity_text_tokens, log=log, bar=log.bar)
    ckpt.tokenizer.save_pretrained(work / "tokenizer")
    shutil.copy(work / "tokenizer" / "tokenizer.json", bundle / "tokenizer.json")
    twin = figures.pop("prefill_twin", None)
    report = {"llm": llm_fidelity.verdict(figures, opts.llm_precision)}
    if twin:
        verdict = llm_fidelity.twin_verdict(twin)
        if verdict["passed"] or opts.prefill != "auto" or llm_spec["kv_dtype"] != "float32":
            report["llm.prefill_twin"] = verdict
        else:  # written by default for speed, not at fidelity's cost (GPTQ's decoder can err less than it)
            llm.drop_twin(bundle, llm_spec)
            llm_spec["prefill_twin_dropped"] = f"erred more than the 4-bit decoder: {verdict['measured']}"
            log(f"the int8 prefill twin is not written: it {llm_spec['prefill_twin_dropped']}; prompts prefill "
                f"through the 4-bit decoder (--prefill int8 keeps it)")
    return stream, llm_spec, prompt, report


def _nf4(stream, tokenizer, bundle: Path, work: Path, opts: Options, llm_verdict: dict, log) -> tuple[dict, dict]:
    """The bitsandbytes nf4 copy (the PyTorch hosts' backend): its manifest section and its perplexity verdict,
    against the same PyTorch perplexity as the ONNX decoder's."""
    log("quantizing the language model to bitsandbytes nf4 (the PyTorch hosts' backend)")
    section = nf4.write_nf4(causal_lm_folder(stream, work / "lm"), bundle)
    ppl = nf4.perplexity(bundle, llm_fidelity.prose_ids(tokenizer, opts.fidelity_text_tokens))
    figures = {"perplexity": {"exported": ppl, "reference": llm_verdict["perplexity"]["reference"]}}
    return section, llm_fidelity.nf4_verdict(figures)


def _gate(report: dict, allow_low_fidelity: bool) -> None:
    """Every check's verdict alike: a miss refuses the bundle, unless allowed, and then the report says which."""
    failed = [k for k, v in report.items() if not v["passed"]]
    if failed and not allow_low_fidelity:
        detail = "; ".join(f"{k}: {report[k]['measured']}, needs {report[k]['threshold']}" for k in failed)
        raise LowFidelity(f"not written: {', '.join(failed)} missed the fidelity threshold ({detail}); pass "
                          f"--allow-low-fidelity to write it anyway, marked as such")
    report["all_passed"] = not failed
    if failed:
        report["low_fidelity_allowed"] = failed


def _manifest(bundle: Path, ckpt, opts: Options, sections: dict) -> dict:
    """Write the manifest (which checks it against the schema and hashes every file) and read it back as the
    runtime will."""
    manifest = {
        "source": {"checkpoint": str(Path(ckpt.path).resolve()), "architecture": ckpt.architecture,
                   "language_model": ckpt.language_model_type, **(opts.hub or {}),
                   **({"note": opts.note} if opts.note else {})},
        "tokenizer": "tokenizer.json",
        "visual_tokens_per_video": visual_token_count(opts.num_frames, sections["aggregator"],
                                                      sections["vision"]["patch_grid"]),
        **sections,
    }
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
