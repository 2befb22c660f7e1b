"""sf-bench: our runtime against the reference, side by side, in one invocation.

Every measurement runs in its own worker process (so peak resident memory belongs to one backend), backends
alternate within each repeat, a warm-up precedes the timed work, and the report gives medians, ranges and ratios
against the reference (Hugging Face transformers fp32, default sdpa attention).

  sf-bench llm     prefill and decode at 30 tokens and at a video-length context (3,680 + 30)
  sf-bench kernels the language model's weight-MatMul kernels (4-bit at two accuracy levels, 8-bit, int8, fp32;
                   threads, spinning) at a decode step and a prefill chunk: what differs between CPU kinds
  sf-bench e2e     a 50-frame question about a real video, then a follow-up, against the reference pipeline
  sf-bench vision  frames per second of the vision graph variants against PyTorch eager, with cosine
  sf-bench scale   the cost of each stage of our path as the frame count (and so the context) grows
  sf-bench watch   standing questions over 10 minutes of looped real footage: per-question latency and memory
                   growth, against answering each question from scratch (re-encoding its window); with
                   --sources 1,2,4: that many RTSP cameras on the loopback address in one process against as many
                   processes (answers per minute, latency, frames dropped, memory)
  sf-bench question-aware  per-question cost of CLIP frame selection (128 candidates) and prompt-guided pooling
                   against plain SlowFast (a ViT-B/16-sized CLIP text tower added to the default workload)
  sf-bench batch   questions per minute over 24 clips cut from real footage, 4 questions each: one `sf-run ask`
                   per question against `sf-run batch` (1 and 2 local workers) and on Ray (2 actors)
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from sfedge.runtime.clitools import run_cli
from sfedge.runtime.errors import BackendUnavailable, BadInput

from . import report, workloads
from .probe import machine
from .suites import SUITES


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sf-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("suite", choices=list(SUITES))
    p.add_argument("--bundle", type=Path, help="bundle to measure (default: the cached default workload)")
    p.add_argument("--checkpoint", type=Path, help="the bundle's source checkpoint, for the reference")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--video", help="video for e2e/vision (default: bigbuckbunny.mp4) and scale (default: bikes.mp4)")
    p.add_argument("--minutes", type=float, default=10, help="watch: minutes of stream time (default 10)")
    p.add_argument("--sources", type=_counts, help="watch: camera counts to compare, e.g. 1,2,4 (RTSP on loopback; "
                                                   "needs ffmpeg and GStreamer's RTSP server)")
    p.add_argument("--out", type=Path, help="write JSON, a markdown table and a PNG plot here")
    return p


def _counts(value: str) -> tuple:
    try:
        counts = tuple(int(x) for x in value.split(","))
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: expected counts of sources such as 1,2,4")
    return counts


def _workload(a, log) -> tuple[Path, Path]:
    """(bundle, checkpoint): the ones given, or the cached default workload."""
    if a.bundle and a.checkpoint:
        return a.bundle.resolve(), a.checkpoint.resolve()
    if a.bundle or a.checkpoint:
        raise BadInput("give both --bundle and --checkpoint (the reference needs the checkpoint), or neither")
    ckpt, bundle = (workloads.question_aware_bundle if a.suite == "question-aware" else workloads.default_bundle)(log)
    return bundle, ckpt


def _main() -> int:
    a = parser().parse_args()
    missing = [m for m in ("torch", "matplotlib") if importlib.util.find_spec(m) is None]
    if missing:  # the reference side and the plots
        raise BackendUnavailable(f"sf-bench needs {' and '.join(missing)}: pip install '.[bench]'")
    log = lambda m: print(f"[sf-bench] {m}", file=sys.stderr, flush=True)  # noqa: E731
    workloads.CACHE.mkdir(parents=True, exist_ok=True)
    bundle, ckpt = (None, None) if a.suite == "kernels" else _workload(a, log)  # kernels need no model
    kw = {"video": a.video} if a.suite not in ("llm", "kernels", "watch", "batch") and a.video else {}
    if a.suite == "watch":
        kw.update(minutes=a.minutes, sources=a.sources or ())
    elif a.sources:
        raise BadInput("--sources goes with sf-bench watch")
    data = SUITES[a.suite](bundle, ckpt, a.repeats, log, **kw)
    rep = {"suite": a.suite, "machine": machine(), "command": " ".join(["sf-bench", *sys.argv[1:]]), "data": data}
    print(report.markdown(rep))
    if a.out:
        report.write(rep, a.out)
    return 0


def main() -> None:
    sys.exit(run_cli("sf-bench", _main))


if __name__ == "__main__":
    main()
