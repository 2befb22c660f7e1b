"""sf-export: LLaVA-family checkpoint -> verified edge bundle."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from sfedge.runtime import hub
from sfedge.runtime.clitools import run_cli
from sfedge.runtime.errors import BadInput
from sfedge.runtime.prompt import CHOICES
from sfedge.runtime.tokens import prompt_pooled_count
from sfedge.runtime.units import human

from .engines import DEFAULT_WORKSPACE

# SlowFast-LLaVA's pipeline; the demo's is the one its projector was trained on (`demo.demo_pipeline`).
PIPELINE = {"frames": 50, "slow_frames": 10, "slow_pool": "max1d", "fast_grid": "4x4"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sf-export",
        description="Export a local Hugging Face LLaVA-family checkpoint (Llava, LlavaNext, LlavaNextVideo, "
                    "LlavaOnevision) to an edge bundle: vision tower + projector and the SlowFast aggregator as "
                    "ONNX, the language model as a 4-bit ONNX decoder, each checked against PyTorch.",
        epilog="Examples:\n  sf-export ./llava-1.5-7b-hf ./bundle\n  sf-export --demo ./demo-bundle\n"
               "  sf-export llava-hf/LLaVA-NeXT-Video-7B-hf ./bundle [--revision REV]\n"
               "  sf-export --engines ./bundle --fp16        (on the GPU that will run it)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?",
                   help="checkpoint folder (config.json + weights), or a Hugging Face hub id (owner/name), fetched "
                        "into huggingface_hub's cache (HF_HOME; none fetched with HF_HUB_OFFLINE=1)")
    p.add_argument("out", nargs="?", help="bundle folder to write (refused if it exists, unless --force)")
    p.add_argument("--demo", metavar="OUT", help="build the built-in demo bundle: real SmolLM2-135M-Instruct with the "
                                                 "small CLIP pair, projector and adapters trained on synthetic clips")
    p.add_argument("--revision", help="with a hub id: a branch, tag or commit (default main); the manifest records "
                                      "the commit")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--engines", metavar="BUNDLE",
                   help="build TensorRT engines of BUNDLE's vision graph and aggregator on this device, into the "
                        "bundle (needs tensorrt and cuda-python); takes --fp16, --int8, --calibration-videos, "
                        "--max-frames, --workspace, --memory-budget")
    _pipeline_options(p)
    _vision_options(p)
    _engine_options(p)
    _llm_options(p)
    _question_aware_options(p)
    _check_options(p)
    return p


def _pipeline_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("SlowFast pipeline")
    g.add_argument("--frames", type=int, help=f"frames sampled per video, T (default {PIPELINE['frames']})")
    g.add_argument("--slow-frames", type=int, help=f"slow-pathway frames, S (default {PIPELINE['slow_frames']})")
    g.add_argument("--slow-pool", help="slow pool: max1d (default), avg1d, max2d, avg2d")
    g.add_argument("--fast-grid", help="fast-pathway grid per frame (default 4x4)")


def _vision_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("vision graph")
    g.add_argument("--vision-variants", default="fp32,int8",
                   help="comma-separated: fp32 (always), fp16, int8 (default fp32,int8)")
    g.add_argument("--calibration-videos", nargs="+", default=[], metavar="VIDEO",
                   help="videos for static int8 (QDQ) calibration and fidelity frames; without them int8 is "
                        "dynamic and fidelity uses the demo footage")


def _engine_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("TensorRT engines (with --engines)")
    g.add_argument("--fp16", action="store_true", help="fp16 engines")
    g.add_argument("--int8", action="store_true",
                   help="int8 vision engine (fp16 where int8 does not help), calibrated on --calibration-videos")
    g.add_argument("--max-frames", type=int, help="most frames the engines take (default: the bundle's frames)")
    g.add_argument("--workspace", help=f"TensorRT builder workspace (default {DEFAULT_WORKSPACE})")
    g.add_argument("--memory-budget",
                   help="the budget sf-run will plan for: its encode chunk is the frame count engines are tuned for")


def _llm_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("language model")
    g.add_argument("--llm-precision", default="int4", choices=["int4", "int8", "fp32"],
                   help="int4 (default): 4-bit blocks in the --llm-quant scheme; int8: every MatMul in symmetric 8-bit "
                        "blocks, twice int4's weight bytes, for when answers must match the original closely; fp32: "
                        "unquantized")
    g.add_argument("--llm-quant", default="imatrix",
                   choices=["rtn", "rtn-mixed", "imatrix", "accurate", "gptq", "gptq-mixed"],
                   help="the 4-bit format (int4 only). rtn: round-to-nearest, symmetric, every MatMul at 4 bits; "
                        "rtn-mixed: the same with lm_head and sensitive layers at 8 bits; imatrix (default): the "
                        "format of rtn with each block's scale searched on calibration prompts and visual tokens; "
                        "accurate: affine blocks searched the same way, lm_head at 8 bits (exact on weights already "
                        "in llama.cpp's Q4_1 grid, as SmolLM2's; decodes about half as fast); gptq: the format of "
                        "imatrix, each weight's rounding error compensated on the weights not yet rounded through "
                        "the calibration inputs' second moment (slower to export, same speed); gptq-mixed: gptq "
                        "with rtn-mixed's 8-bit layers (the closest to the original's answers at 4 bits)")
    g.add_argument("--block-size", type=int, default=32, choices=[32, 64, 128],
                   help="4-bit block size (default 32)")
    g.add_argument("--embeddings", default="float16", choices=["float16", "float32", "int8"],
                   help="token embedding table dtype (default float16; int8 has one scale per row)")
    g.add_argument("--kv-cache", default="float32", choices=["float32", "int8"],
                   help="KV-cache precision (default float32). int8 (per-layer scales calibrated at export) reads a "
                        "quarter of the KV bytes per generated token, 1.3x faster decoding at video context on CPU; "
                        "prompts prefill through an fp32-cache twin of the decoder written alongside, which costs a "
                        "second copy of the weights in memory")
    g.add_argument("--prefill", default="auto", choices=["auto", "int8", "none"],
                   help="int8: also write a prefill twin of the decoder with int8 weights, through which prompts "
                        "(video tokens and questions) prefill about 1.5x faster on CPU, at a second copy of the "
                        "weights at 8 bits on disk and in memory (the runtime measures once per CPU kind whether it "
                        "is faster there, and the planner drops it when a memory budget has no room); auto "
                        "(default): int8 for language models whose twin stays under 1.5 GB (about 1.5B parameters), "
                        "left out if it errs more than the 4-bit decoder (as next to gptq's)")
    g.add_argument("--choice", choices=list(CHOICES),
                   help="how the model answers multiple choice unless a question says otherwise: letter (default; "
                        "the demo's is text) lists the options and reads the answer's letter; text scores each "
                        "option's own text as the answer (for small models that cannot read a letter off a list)")
    g.add_argument("--nf4", action="store_true",
                   help="also save a bitsandbytes nf4 copy of the language model (for hosts that run PyTorch)")


def _question_aware_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("question-aware tokens (frame selection, prompt-guided pooling)")
    g.add_argument("--clip", metavar="CLIP_DIR",
                   help="local CLIP or SigLIP checkpoint whose vision tower is the LLaVA one: adds its text tower, "
                        "tokenizer and image head to the bundle, for sf-run --frame-selection clip and "
                        "--pooling prompt-guided")
    g.add_argument("--allow-mismatched-clip", action="store_true",
                   help="accept a CLIP_DIR whose vision tower differs from the checkpoint's (its head is then "
                        "applied to the LLaVA tower's features; the manifest records the difference)")
    g.add_argument("--pooling-kernel", default="2x3x3",
                   help="prompt-guided pooling window TxHxW, stride = kernel (default 2x3x3)")
    g.add_argument("--pooling-temperature", type=float, default=0.01,
                   help="prompt-guided pooling: default softmax temperature inside a window (default 0.01)")


def _check_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("checks")
    g.add_argument("--allow-low-fidelity", action="store_true",
                   help="write the bundle even if a graph misses its fidelity threshold (the manifest says so)")
    g.add_argument("--fidelity-tokens", type=int, default=2048,
                   help="tokens of English prose for the perplexity check (default 2048)")
    g.add_argument("--quiet", action="store_true", help="no progress on stderr")


def options(a, pipeline: dict = PIPELINE):
    from .bundle import Options
    from .clip import parse_kernel

    frames, slow_frames, slow_pool, fast_grid = (pipeline[k] if getattr(a, k) is None else getattr(a, k)
                                                 for k in ("frames", "slow_frames", "slow_pool", "fast_grid"))
    try:
        fh, fw = (int(x) for x in fast_grid.lower().split("x"))
    except ValueError:
        raise BadInput(f"--fast-grid {fast_grid!r}: expected HxW such as 4x4") from None
    return Options(num_frames=frames, slow_frames=slow_frames, slow_pool=slow_pool, fast_grid=(fh, fw),
                   vision_variants=tuple(v.strip() for v in a.vision_variants.split(",") if v.strip()),
                   calibration_videos=a.calibration_videos, llm_precision=a.llm_precision, llm_quant=a.llm_quant,
                   block_size=a.block_size, embeddings=a.embeddings, allow_low_fidelity=a.allow_low_fidelity,
                   force=a.force, fidelity_text_tokens=a.fidelity_tokens, nf4=a.nf4,
                   kv_cache=a.kv_cache, prefill=a.prefill, choice=a.choice or "letter", clip=a.clip,
                   allow_mismatched_clip=a.allow_mismatched_clip,
                   pooling_kernel=parse_kernel(a.pooling_kernel), pooling_temperature=a.pooling_temperature)


def summary(out: Path, m: dict) -> str:
    lines = [f"bundle written: {out}"]
    for rel, e in m["artifacts"].items():
        lines.append(f"  {rel:<28} {human(e['size']):>10}")
    lines.append(f"  total {human(sum(e['size'] for e in m['artifacts'].values()))}")
    lines.append("fidelity:")
    for name, f in m["fidelity"].items():
        if not isinstance(f, dict):
            continue
        if name == "llm_nf4":
            lines.append(f"  llm (nf4): perplexity {f['perplexity']['exported']:.2f}  "
                         f"{'ok' if f['passed'] else 'BELOW THRESHOLD'}")
        elif name == "llm":
            tf, ppl = f["teacher_forced"], f["perplexity"]
            lines.append(f"  llm ({m['llm']['precision']}): perplexity {ppl['exported']:.2f} (PyTorch "
                         f"{ppl['reference']:.2f}), next-token KL {ppl['mean_kl']:.3f} of {ppl['mean_entropy']:.2f} nats, "
                         f"teacher-forced min "
                         f"cosine {tf['min_cosine']:.4f}, mean top-5 overlap {tf['mean_top5_overlap']:.2f}  "
                         f"{'ok' if f['passed'] else 'BELOW THRESHOLD'}")
        elif name == "llm.prefill_twin":
            lines.append(f"  llm prefill twin (int8): {f['measured']}  {'ok' if f['passed'] else 'BELOW THRESHOLD'}")
        else:
            lines.append(f"  {name:<16} min cosine {f['min_cosine']:.6f}  rel max abs err "
                         f"{f['rel_max_abs_error']:.2e}  {'ok' if f['passed'] else 'BELOW THRESHOLD'}")
    a = m["aggregator"]
    lines.append(f"visual tokens per video: {m['visual_tokens_per_video']} ({a['num_frames']} frames, "
                 f"{a['slow_frames']} slow, {a['slow_pool']}, fast {a['fast_grid'][0]}x{a['fast_grid'][1]})")
    if "clip" in m:
        c, pp = m["clip"], m["prompt_pooling"]
        match = "matches" if c["tower_match"] else f"MISMATCHED ({c['tower_difference']})"
        lines.append(f"clip side: {c['model_type']} text tower, embedding {c['embed_dim']}, vision tower {match}; "
                     f"prompt-guided pooling {'x'.join(map(str, pp['kernel']))} gives "
                     f"{prompt_pooled_count(a['num_frames'], m['vision']['patch_grid'], pp['kernel'])} tokens for "
                     f"{a['num_frames']} frames")
    if m["source"].get("note"):
        lines.append(f"note: {m['source']['note']}")
    return "\n".join(lines)


def _engines(a) -> int:
    from .engines import build_engines

    if a.checkpoint or a.out or a.demo:
        raise BadInput("--engines BUNDLE takes no CHECKPOINT, OUT or --demo")
    log = (lambda msg: None) if a.quiet else (lambda msg: print(f"[sf-export] {msg}", file=sys.stderr, flush=True))
    entries = build_engines(a.engines, fp16=a.fp16, int8=a.int8, calibration_videos=a.calibration_videos,
                            max_frames=a.max_frames, workspace=a.workspace or DEFAULT_WORKSPACE,
                            memory_budget=a.memory_budget, log=log)
    for e in entries:
        print(f"engine written: {Path(a.engines) / e['file']} ({e['role']}, {e['precision']}, from {e['graph']})")
    return 0


def _demo(a, log) -> int:
    """The built-in demo: SmolLM2 with the trained CLIP pair, projector and adapters, on the pipeline they were
    trained on, answering multiple choice by option text as they were trained to."""
    from .bundle import export
    from .demo import DEMO_NOTE, build_demo, demo_pipeline

    fixed = [f"--{k.replace('_', '-')}" for k in (*PIPELINE, "clip") if getattr(a, k) is not None]
    if a.checkpoint or a.out or fixed:
        raise BadInput(f"--demo takes no {', '.join(fixed) or 'CHECKPOINT or OUT'}: its pipeline and CLIP side are "
                       f"the ones its weights were trained with")
    pipeline = demo_pipeline()
    opts = options(a, {**pipeline, "fast_grid": "x".join(map(str, pipeline["fast_grid"]))})
    opts.note, opts.choice = DEMO_NOTE, a.choice or "text"
    with tempfile.TemporaryDirectory(prefix="sfedge-demo-") as tmp:
        log("assembling the demo checkpoint: real SmolLM2-135M-Instruct + the trained demo CLIP pair and projector")
        ck, clip = build_demo(Path(tmp))
        opts.clip = str(clip)
        m = export(ck, a.demo, opts, log)
    print(summary(Path(a.demo), m))
    return 0


def _main() -> int:
    a = parser().parse_args()
    if a.engines:  # before any torch import: engines are built on the target device, which may lack torch
        return _engines(a)
    engine_only = {"--fp16": a.fp16, "--int8": a.int8, "--max-frames": a.max_frames, "--workspace": a.workspace,
                   "--memory-budget": a.memory_budget}
    if any(engine_only.values()):
        raise BadInput(f"{', '.join(k for k, v in engine_only.items() if v)}: only with --engines BUNDLE")
    if a.revision and not a.checkpoint:
        raise BadInput("--revision goes with a hub id (owner/name) as CHECKPOINT")
    if a.quiet or not sys.stderr.isatty():
        os.environ.setdefault("TQDM_DISABLE", "1")  # read when tqdm is first imported (the GGUF loader's bar)
    from .bundle import Log, export, quiet_libraries

    log = Log(a.quiet)
    quiet_libraries()
    if a.demo:
        return _demo(a, log)
    if not a.checkpoint or not a.out:
        raise BadInput("give CHECKPOINT and OUT (or --demo OUT); see sf-export --help")
    opts = options(a)
    checkpoint, opts.hub = hub.resolve(a.checkpoint, a.revision)
    if opts.hub:
        log(f"{a.checkpoint}: commit {opts.hub['revision']} in {checkpoint}")
    m = export(checkpoint, a.out, opts, log)
    print(summary(Path(a.out), m))
    return 0


def main() -> None:
    sys.exit(run_cli("sf-export", _main))


if __name__ == "__main__":
    main()
