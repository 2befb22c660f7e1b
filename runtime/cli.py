"""sf-run: answer questions about videos from a bundle (ask), or show the memory plan (plan)."""
from __future__ import annotations

import argparse
import json
import sys

from .clitools import parse_size, run_cli
from .errors import BadInput


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sf-run", description="Run a SlowFast Edge bundle.")
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("ask", help="answer a question about a video or image",
                       description="Answer a question about a video or image; the answer streams to stdout.")
    a.add_argument("bundle")
    a.add_argument("--video", required=True, help="video or image file, or 'demo' for the built-in footage")
    a.add_argument("--question", "-q", action="append", required=True,
                   help="the question; repeat for follow-ups about the same video (its KV cache is reused)")
    a.add_argument("--options", nargs="+", help="multiple-choice options, listed as (A) ... (B) ...")
    a.add_argument("--style", default="plain", choices=["plain", "open-ended", "multiple-choice"],
                   help="answer prefill: open-ended starts 'In the video,', multiple-choice 'Best option:('")
    a.add_argument("--frames", type=int, help="frames to sample (default: the bundle's, usually 50)")
    a.add_argument("--max-new-tokens", type=int, default=128)
    a.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    a.add_argument("--top-p", type=float, default=1.0)
    a.add_argument("--top-k", type=int, default=0)
    a.add_argument("--seed", type=int)
    a.add_argument("--memory-budget", help="e.g. 2GB: plan chunk sizes to fit, or refuse with the reason")
    a.add_argument("--device", default="cpu", choices=["cpu", "cuda", "tensorrt", "auto"])
    a.add_argument("--vision", choices=["fp32", "fp16", "int8"], help="vision graph variant (default int8)")
    a.add_argument("--threads", type=int, help="ONNX Runtime threads (default: all cores)")
    a.add_argument("--json", action="store_true", help="print one JSON object per question instead of text")
    pl = sub.add_parser("plan", help="print the memory plan for a budget",
                        description="Print what a question costs in memory, and the settings that fit a budget.")
    pl.add_argument("bundle")
    pl.add_argument("--memory-budget", help="e.g. 6GB")
    pl.add_argument("--frames", type=int)
    pl.add_argument("--max-new-tokens", type=int, default=128)
    pl.add_argument("--vision", choices=["fp32", "fp16", "int8"])
    return p


def _err(msg):
    print(msg, file=sys.stderr, flush=True)


def _ask(a) -> int:
    from .pipeline import Runtime

    _err(f"[sf-run] loading {a.bundle}")
    rt = Runtime.load(a.bundle, device=a.device, memory_budget=a.memory_budget, frames=a.frames,
                      max_new_tokens=a.max_new_tokens, vision_variant=a.vision, threads=a.threads)
    _err(f"[sf-run] device {a.device}: {rt.provider}; plan: {rt.plan.frames} frames, context {rt.plan.context} "
         f"tokens, encode chunk {rt.plan.encode_chunk}")
    for note in rt.notes:
        _err(f"[sf-run] {note}")
    if rt.untrained_note:
        _err(f"[sf-run] note: {rt.untrained_note}")
    _err(f"[sf-run] decoding and encoding {a.video}")
    video = rt.encode(a.video, progress=lambda m: _err(f"[sf-run] {m}"))
    for note in video.notes:
        _err(f"[sf-run] {note}")
    _err(f"[sf-run] {video.count} visual tokens from {len(video.frame_indices)} frames ({video.decode_method})")
    for i, q in enumerate(a.question):
        kw = dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                  seed=a.seed, style=a.style, options=a.options)
        s = rt.ask(video, q, stream=True, **kw)
        if a.json:
            for _ in s:
                pass
            ans = s.answer
            timings = dict(ans.timings)
            if i == 0:
                timings.update({k: video.timings[k] for k in video.timings})
            out = {**ans.to_dict(), "timings": timings, "frames_used": ans.frames_used}
            print(json.dumps(out), flush=True)
        else:
            if len(a.question) > 1:
                print(f"Q: {q}\nA: ", end="", flush=True)
            for piece in s:
                print(piece, end="", flush=True)
            print(flush=True)
            ans = s.answer
            t = dict(ans.timings, **(video.timings if i == 0 else {}))
            _err("[sf-run] " + ", ".join(f"{k} {v:.2f}s" for k, v in t.items()) +
                 f"; {ans.prompt_tokens} prompt tokens{' (video prefix reused)' if ans.reused_prefix else ''}, "
                 f"{ans.generated_tokens} generated; peak memory {ans.peak_memory_bytes / 1e6:.0f} MB")
    return 0


def _plan(a) -> int:
    from . import manifest as manifest_io
    from .planner import make_plan

    m = manifest_io.load(a.bundle, hash_cache=manifest_io.HashCache())
    budget = parse_size(a.memory_budget) if a.memory_budget else None
    print(make_plan(m, budget, a.frames, a.max_new_tokens, a.vision).table())
    return 0


def _main() -> int:
    a = parser().parse_args()
    if a.cmd == "ask":
        if a.max_new_tokens < 1:
            raise BadInput("--max-new-tokens must be at least 1")
        return _ask(a)
    return _plan(a)


def main() -> None:
    sys.exit(run_cli("sf-run", _main))


if __name__ == "__main__":
    main()
