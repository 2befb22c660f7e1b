"""What sf-eval hands back: one row per question, the summary (overall and per category, with the reference's
figures beside the bundle's when there is one, and the export's own fidelity checks), a table for the terminal,
and with --out results.json, report.md and accuracy.png."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np

from sfedge.runtime.errors import BackendUnavailable

from . import stats
from .data import Question
from .scoring import choose

INSTALL = 'pip install "sfedge[eval]"'
# A question the reference is sure of: its likeliest option holds this much of the options' probability. Flips
# there are what the export lost; below it the original itself is close to a coin toss.
SURE = 0.8


def answer_row(q: Question, text: str, option_logprobs: list | None, choice: str = "letter",
               timings: dict | None = None) -> dict:
    """`choice`: how the answer chose (prompt.CHOICES); `timings`: the runtime's seconds per stage for this answer
    (the video's decode and encode on its first)."""
    chosen = choose(text, q.options, option_logprobs if choice == "text" else None)
    return {**_row(q), "text": text, "choice": chosen.index, "parse": chosen.kind,
            "correct": chosen.index == q.answer, "option_logprobs": option_logprobs, "timings": timings}


def error_row(q: Question, why: str) -> dict:
    """A question the bundle could not answer (its video would not decode, say): listed, counted, not scored."""
    return {**_row(q), "error": why}


def with_reference(row: dict, text: str, option_logprobs: list | None, choice: str = "letter") -> dict:
    chosen = choose(text, row["options"], option_logprobs if choice == "text" else None)
    return {**row, "reference_text": text, "reference_choice": chosen.index, "reference_parse": chosen.kind,
            "reference_correct": chosen.index == row["answer"], "reference_logprobs": option_logprobs}


def _row(q: Question) -> dict:
    return {"id": q.id, "video": str(q.video), "category": q.category, "question": q.question, "options": q.options,
            "answer": q.answer, "text": None, "choice": None, "parse": None, "correct": None,
            "option_logprobs": None, "error": None, "timings": None}


def summarize(rows: list[dict], fidelity: dict, reference: bool, **meta) -> dict:
    """Overall and per-category figures; `meta` (bundle, data, settings...) is kept as given."""
    categories = sorted({r["category"] for r in rows})
    return {**meta, "questions": len(rows), "videos": len({r["video"] for r in rows}),
            "chance": sum(1 / len(r["options"]) for r in rows) / len(rows),
            "overall": _group(rows, reference),
            "categories": {c: _group([r for r in rows if r["category"] == c], reference) for c in categories},
            "speed": speed(rows), "fidelity": fidelity_summary(fidelity)}


VIDEO_STAGES = ("decode", "encode", "aggregate")


def speed(rows: list[dict]) -> dict:
    """Medians, seconds: per video, its decode and encode (paid once); per question, the rest (question-aware
    tokens, prefill, generate)."""
    timed = [r["timings"] for r in rows if r.get("timings")]
    video = [sum(t.get(k, 0.0) for k in VIDEO_STAGES[:2]) for t in timed if t.get("encode")]
    question = [sum(v for k, v in t.items() if k not in VIDEO_STAGES[:2]) for t in timed]
    med = lambda xs: float(np.median(xs)) if xs else None
    return {"video_s": med(video), "question_s": med(question)}


def _group(rows: list[dict], reference: bool) -> dict:
    """Scored are the questions the bundle answered; an empty or unparsed answer is scored, and wrong."""
    scored = [r for r in rows if r["error"] is None]
    out = {"n": len(scored), "errors": len(rows) - len(scored), "accuracy": None, "interval": None,
           "empty_rate": None, "unparsed_rate": None}
    if reference:
        out["reference"] = None
    if not scored:
        return out
    videos = [r["video"] for r in scored]
    acc, low, high = stats.bootstrap_accuracy([r["correct"] for r in scored], videos)
    out.update(accuracy=acc, interval=[low, high],
               empty_rate=sum(r["parse"] == "empty" for r in scored) / len(scored),
               unparsed_rate=sum(r["parse"] == "unparsed" for r in scored) / len(scored))
    if reference:
        out["reference"] = _paired(scored, videos)
    return out


def _paired(scored: list[dict], videos: list[str]) -> dict:
    acc, low, high = stats.bootstrap_accuracy([r["reference_correct"] for r in scored], videos)
    flips, rate = stats.flip_rate([r["choice"] for r in scored], [r["reference_choice"] for r in scored])
    b, c, p = stats.mcnemar([r["correct"] for r in scored], [r["reference_correct"] for r in scored])
    both = [r for r in scored if r["option_logprobs"] is not None and r["reference_logprobs"] is not None]
    kl_mean = kl_max = top1 = None
    sure = {"threshold": SURE, "n": 0, "flips": 0}
    if both:
        kl_mean, kl_max, top1 = stats.option_agreement([r["reference_logprobs"] for r in both],
                                                       [r["option_logprobs"] for r in both])
        sure["n"], sure["flips"] = stats.sure_flips([r["reference_logprobs"] for r in both],
                                                    [r["choice"] for r in both],
                                                    [r["reference_choice"] for r in both], SURE)
    sure["flip_rate"] = sure["flips"] / sure["n"] if sure["n"] else None
    return {"accuracy": acc, "interval": [low, high], "flips": flips, "flip_rate": rate,
            "mcnemar": {"b": b, "c": c, "p": p}, "option_kl_mean": kl_mean, "option_kl_max": kl_max,
            "top1_agreement": top1, "sure": sure}


def fidelity_summary(fidelity: dict) -> dict:
    """The manifest's fidelity report, each check's verdict and its one-line figures only (the full figures stay
    in the bundle's manifest)."""
    checks = {k: {"passed": v["passed"], "measured": v.get("measured"), "threshold": v.get("threshold")}
              for k, v in fidelity.items() if isinstance(v, dict) and "passed" in v}
    return {"all_passed": fidelity.get("all_passed", all(c["passed"] for c in checks.values())),
            "failed": [k for k, c in checks.items() if not c["passed"]],
            "low_fidelity_allowed": bool(fidelity.get("low_fidelity_allowed")), "checks": checks}


def table(summary: dict, markdown: bool = False) -> str:
    """The figures as a table (aligned text, or markdown), with the run and the export's fidelity above it."""
    reference = "reference" in summary["overall"]
    head = ["category", "n", "accuracy [95% CI]", "empty", "unparsed", "errors"]
    if reference:
        head += ["reference [95% CI]", "flips", f"flips where sure (>= {SURE:.0%})", "McNemar b/c p",
                 "option KL mean/max", "top-1"]
    groups = [("overall", summary["overall"])] + list(summary["categories"].items())
    body = [_cells(name, g, reference) for name, g in groups]
    lines = [f"{summary['questions']} questions on {summary['videos']} videos "
             f"(chance {_pct(summary['chance'])}); intervals: bootstrap over videos"]
    choice = (summary.get("settings") or {}).get("choice")
    if choice:
        lines.append("choice: " + ("the option whose text is the likeliest answer" if choice == "text" else
                                   "the option letter the answer gives"))
    if summary.get("machine"):
        lines.append(f"machine: {summary['machine']}")
    sp = summary.get("speed") or {}
    if sp.get("question_s") is not None:
        lines.append(f"speed (medians): decode + encode {sp['video_s'] or 0:.3f} s per video, "
                     f"{sp['question_s']:.3f} s per question")
    if summary["overall"]["errors"]:
        lines.append(f"{summary['overall']['errors']} question(s) not scored: the bundle failed on them (their "
                     f"errors are in results.json)")
    lines.append(_fidelity_line(summary["fidelity"]))
    lines.append("")
    if markdown:
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
    else:
        widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head] + body]
    return "\n".join(lines) + "\n"


def _cells(name: str, g: dict, reference: bool) -> list[str]:
    cells = [name, str(g["n"]), _interval(g["accuracy"], g["interval"]), _pct(g["empty_rate"]),
             _pct(g["unparsed_rate"]), str(g["errors"])]
    if reference:
        r = g["reference"]
        if r is None:
            return cells + ["-"] * 6
        m, sure = r["mcnemar"], r["sure"]
        kl = "-" if r["option_kl_mean"] is None else f"{r['option_kl_mean']:.4f}/{r['option_kl_max']:.4f}"
        cells += [_interval(r["accuracy"], r["interval"]), f"{r['flips']} ({_pct(r['flip_rate'])})",
                  f"{sure['flips']} of {sure['n']} ({_pct(sure['flip_rate'])})", f"{m['b']}/{m['c']} p={m['p']:.3g}",
                  kl, _pct(r["top1_agreement"])]
    return cells


def _fidelity_line(f: dict) -> str:
    if f["failed"]:
        return (f"export fidelity: {', '.join(f['failed'])} MISSED the threshold"
                + (" (written with --allow-low-fidelity)" if f["low_fidelity_allowed"] else "") + "; "
                + "; ".join(f"{k}: {f['checks'][k]['measured']}" for k in f["failed"]))
    llm = f["checks"].get("llm")
    return f"export fidelity: all {len(f['checks'])} checks passed" + (f"; llm: {llm['measured']}" if llm else "")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _interval(acc: float | None, interval: list | None) -> str:
    return "-" if acc is None else f"{_pct(acc)} [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"


def require_matplotlib() -> None:
    """--out draws a plot: say so before the run, not after it."""
    if importlib.util.find_spec("matplotlib") is None:
        raise BackendUnavailable(f"--out draws accuracy.png with matplotlib, which is not installed: {INSTALL}")


def write(out: Path, summary: dict, rows: list[dict]) -> list[Path]:
    """results.json, report.md and accuracy.png in `out`; returns their paths."""
    paths = [out / "results.json", out / "report.md", out / "accuracy.png"]
    paths[0].write_text(json.dumps({"summary": summary, "questions": rows}, indent=1) + "\n", encoding="utf-8")
    paths[1].write_text(f"# sf-eval: {summary['bundle']} on {summary['data']}\n\n" + table(summary, markdown=True),
                        encoding="utf-8")
    _plot(summary, paths[2])
    return paths


def _plot(summary: dict, path: Path) -> None:
    """Accuracy per category with its bootstrap interval, the reference's bars beside the bundle's."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a build machine or a Jetson
    import matplotlib.pyplot as plt

    names = ["overall"] + list(summary["categories"])
    groups = [summary["overall"]] + list(summary["categories"].values())
    sides = [("bundle", groups)]
    if "reference" in summary["overall"]:
        sides.append(("reference", [g["reference"] for g in groups]))
    x, width = np.arange(len(names)), 0.8 / len(sides)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.0 + 0.9 * len(names) * len(sides)), 4.5))
    for i, (label, figures) in enumerate(sides):
        acc = np.array([f["accuracy"] if f and f["accuracy"] is not None else 0.0 for f in figures])
        low = np.array([f["interval"][0] if f and f["interval"] else a for f, a in zip(figures, acc)])
        high = np.array([f["interval"][1] if f and f["interval"] else a for f, a in zip(figures, acc)])
        ax.bar(x + (i - (len(sides) - 1) / 2) * width, acc, width, yerr=[acc - low, high - acc], capsize=3,
               label=label)
    ax.axhline(summary["chance"], linestyle="--", color="gray", label="chance")
    ax.set_xticks(x, names, rotation=30 if len(names) > 4 else 0, ha="right" if len(names) > 4 else "center")
    ax.set_ylim(0, 1.05)  # room for the caps of intervals that reach 1
    ax.set_ylabel("accuracy (95% bootstrap interval over videos)")
    ax.set_title(f"{Path(summary['bundle']).name}: {summary['questions']} questions, {summary['videos']} videos")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
