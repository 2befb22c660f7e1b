"""A suite's report as a markdown table, a PNG plot and JSON. A report is {"suite", "machine", "command", "data"};
data holds either "results" (rows by name) and "skipped", or the rows themselves."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .suites import SCALE_STAGES

PLOTTED = {"llm": "decode_tok_s", "kernels": "gmac_s", "vision": "fps", "e2e": "first_total_s", "watch": "first_s",
           "question-aware": "per_question_s", "batch": "questions_per_min"}


def _fmt(v):
    if isinstance(v, dict) and "median" in v:
        if v["median"] is None:
            return "-"
        rng = f" [{v['min']:.3g}-{v['max']:.3g}]" if v.get("n", 1) > 1 else ""
        return f"{v['median']:.3g}{rng}"
    if isinstance(v, float):
        return f"{v:.3g}"
    return "-" if v is None else str(v)


def _rows(report: dict) -> dict:
    return report["data"].get("results", report["data"])


def markdown(report: dict) -> str:
    lines = [f"# sf-bench {report['suite']}", "", f"machine: {report['machine']}", f"command: `{report['command']}`",
             ""]
    rows = {k: v for k, v in _rows(report).items() if isinstance(v, dict)}
    cols = sorted({c for v in rows.values() for c in v})
    lines.append("| | " + " | ".join(cols) + " |")
    lines.append("|---" * (len(cols) + 1) + "|")
    for name, v in rows.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(v.get(c)) for c in cols) + " |")
    for k, v in report["data"].items():  # the figures that are not rows, e.g. e2e's memory_ratio
        if k != "results" and not isinstance(v, dict):
            lines.append(f"\n{k}: {_fmt(v)}")
    for k, why in report["data"].get("skipped", {}).items():
        lines.append(f"\nskipped {k}: {why}")
    return "\n".join(lines) + "\n"


def plot(report: dict, out: Path) -> Path:
    """The suite's headline figure as a bar chart: out/<suite>.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = _rows(report)
    fig, ax = plt.subplots(figsize=(8, 4))
    if report["suite"] == "scale":  # where the time goes, stage by stage, as frames grow
        names = list(res)
        left = np.zeros(len(names))
        for stage in SCALE_STAGES:
            vals = np.array([res[n][f"{stage}_s"]["median"] or 0 for n in names])
            ax.barh(names, vals, left=left, label=stage)
            left += vals
        ax.set_xlabel("seconds (median)")
        ax.legend()
    else:
        key = PLOTTED[report["suite"]]
        names = [k for k, v in res.items() if isinstance(v, dict) and isinstance(v.get(key), dict)
                 and v[key].get("median")]
        ax.barh(names, [res[n][key]["median"] for n in names])
        ax.set_xlabel(key)
    ax.set_title(f"sf-bench {report['suite']}")
    fig.tight_layout()
    path = out / f"{report['suite']}.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def write(report: dict, out: Path) -> list[Path]:
    """out/<suite>.json, .md and .png."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{report['suite']}.json", out / f"{report['suite']}.md"]
    paths[0].write_text(json.dumps(report, indent=2))
    paths[1].write_text(markdown(report))
    return [*paths, plot(report, out)]
