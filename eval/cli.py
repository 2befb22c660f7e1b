"""sf-eval: a bundle's accuracy on a multiple-choice video benchmark (MVBench or Video-MME JSON lines), and with
--reference how its answers compare with the PyTorch checkpoint's on the very same frames. Progress goes to
stderr, the table to stdout."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sfedge.bench.probe import machine
from sfedge.runtime.answering import cause
from sfedge.runtime import prompt as prompts
from sfedge.runtime.cli import pooling_temperature_option, question_aware_options, runtime_options
from sfedge.runtime.clitools import run_cli
from sfedge.runtime.errors import BadInput

from . import report
from .data import by_video, load_questions
from .reference_cache import ReferenceCache


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sf-eval", description=(
        "Answer a multiple-choice video benchmark with a bundle (greedy, each video encoded once) and report its "
        "accuracy with bootstrap intervals over videos; with --reference, the PyTorch checkpoint answers the same "
        "questions on the same frames, and the report adds McNemar's test, the flips and the option KL."))
    p.add_argument("bundle")
    p.add_argument("--data", required=True,
                   help="JSON lines: MVBench (candidates, answer text) or Video-MME (options 'A. ...', answer "
                        "letter); video paths relative to the file's folder")
    p.add_argument("--reference", metavar="CHECKPOINT",
                   help="the checkpoint the bundle was exported from (needs torch: the export extra)")
    p.add_argument("--reference-cache", type=Path, metavar="FILE",
                   help="keep the reference's answers in this JSON-lines file and reuse them: several bundles of one "
                        "checkpoint are then compared with one run of the original (a different checkpoint, "
                        "video, question or frames is a miss, never a stale answer)")
    p.add_argument("--limit", type=int, help="only the first N questions")
    p.add_argument("--out", type=Path, help="write results.json, report.md and accuracy.png to this folder")
    p.add_argument("--frames", type=int, help="frames to sample (default: the bundle's, usually 50)")
    p.add_argument("--max-new-tokens", type=int, default=8, help="an option letter needs few (default 8)")
    p.add_argument("--choice", choices=list(prompts.CHOICES),
                   help="letter: the options are listed and the answer's letter is read; text: each option's text "
                        "is scored as the answer and the likeliest is the choice (the cloze form, for small "
                        "models); default: the bundle's")
    runtime_options(p, "e.g. 2GB: plan chunk sizes to fit, or refuse with the reason")
    question_aware_options(p)
    pooling_temperature_option(p)
    return p


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _main() -> int:
    a = parser().parse_args()
    if a.limit is not None and a.limit < 1:
        raise BadInput("--limit must be at least 1")
    if a.max_new_tokens < 1:
        raise BadInput("--max-new-tokens must be at least 1")
    if a.reference_cache and not a.reference:
        raise BadInput("--reference-cache goes with --reference CHECKPOINT")
    if a.reference and a.pooling == "prompt-guided":
        raise BadInput("--reference compares SlowFast tokens: the PyTorch reference has no prompt-guided pooling")
    if a.out:  # refused before the run, not after it
        report.require_matplotlib()
        try:
            a.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BadInput(f"{a.out}: cannot create the output folder ({e.strerror})") from None
    questions = load_questions(a.data, a.limit)
    videos = by_video(questions)
    from sfedge.runtime import Runtime

    settings = dict(device=a.device, memory_budget=a.memory_budget, frames=a.frames, max_new_tokens=a.max_new_tokens,
                    vision_variant=a.vision, threads=a.threads, frame_selection=a.frame_selection, pooling=a.pooling,
                    candidates=a.candidates, pooling_temperature=a.pooling_temperature)
    _err(f"[sf-eval] {len(questions)} questions on {len(videos)} videos from {a.data}; loading {a.bundle}")
    rt = Runtime.load(a.bundle, **settings)
    settings["choice"] = choice = a.choice or rt.manifest["prompt"].get("choice", "letter")
    ref = None
    if a.reference:
        def load_reference():
            from sfedge.eval.reference import Reference  # torch: only when asked for

            _err(f"[sf-eval] loading the reference {a.reference}")
            return Reference(a.reference, rt.manifest)

        if a.reference_cache:
            ref = ReferenceCache(a.reference_cache, a.reference, rt.manifest, load_reference)
            _err(f"[sf-eval] reference cache {a.reference_cache}: {len(ref.answers)} answers"
                 + (f", {ref.unreadable} unreadable lines ignored" if ref.unreadable else ""))
        else:
            ref = load_reference()
    rows = []
    for i, (video, group) in enumerate(videos, 1):
        _err(f"[{i}/{len(videos)}] video {video} ({len(group)} question{'s' * (len(group) != 1)})")
        rows += _answer_video(rt, ref, video, group, a.max_new_tokens, choice)
    summary = report.summarize(rows, rt.manifest["fidelity"], reference=ref is not None, bundle=str(a.bundle),
                               data=str(a.data), reference_checkpoint=a.reference, settings=settings,
                               machine=machine())
    if a.reference_cache:
        _err(f"[sf-eval] reference cache: {ref.hits} of the reference's answers reused")
    print(report.table(summary), end="", flush=True)
    if a.out:
        for path in report.write(a.out, summary, rows):
            _err(f"[sf-eval] wrote {path}")
    return 0


def _answer_video(rt, ref, video: Path, group: list, max_new_tokens: int, choice: str) -> list[dict]:
    """A video's rows: encoded once; a video that fails (or a question that does) becomes error rows, and the run
    goes on."""
    try:
        vt = rt.encode(video)
    except Exception as e:  # an undecodable video must not end a run of thousands of questions
        _err(f"  error: {cause(e)}")
        return [report.error_row(q, cause(e)) for q in group]
    rows, video_timings = [], dict(vt.timings)
    for q in group:
        try:
            ans = rt.ask(vt, q.question, options=q.options, max_new_tokens=max_new_tokens, choice=choice)
        except Exception as e:
            _err(f"  {q.id}: error: {cause(e)}")
            rows.append(report.error_row(q, cause(e)))
            continue
        row = report.answer_row(q, ans.text, ans.option_logprobs, choice, {**ans.timings, **video_timings})
        video_timings = {}  # paid once, by the video's first answer
        if ref is not None:  # on the frames the bundle saw, so only the models differ
            text, logprobs = ref.answer(video, q.question, q.options, ans.selected_frames, ans.fast_frames,
                                        max_new_tokens, choice)
            row = report.with_reference(row, text, logprobs, choice)
        rows.append(row)
    return rows


def main() -> None:
    sys.exit(run_cli("sf-eval", _main))


if __name__ == "__main__":
    main()
