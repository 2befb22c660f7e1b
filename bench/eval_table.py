"""The table to choose a scheme from: the demo model exported with each `--llm-quant` scheme (and with an int8 and
an fp32 language model), each vision variant, the question-aware modes and the letter choice, scored by sf-eval on
held-out synthetic clips against the PyTorch original: accuracy, the needle category, flips (all, and on the
questions the original is sure of), McNemar, option KL, top-1 agreement and speed. The table in docs/benchmarks.md, "Accuracy after export".

    python -m sfedge.bench.eval_table OUT [--seeds 0-49]
        [--schemes imatrix,gptq,gptq-mixed,rtn,rtn-mixed,accurate,int8,fp32]

Bundles, data, each run's sf-eval folder and the PyTorch original's answers (OUT/reference.jsonl, shared by every
run on the same frames) are kept under OUT: a second call reuses what is there.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from .probe import machine

DEFAULT = "imatrix"
PRECISIONS = ("int8", "fp32")  # a language model at this precision, not a 4-bit scheme


def runs(schemes: list[str]) -> list[tuple[str, str, list[str]]]:
    """(name, bundle scheme, sf-eval options): every scheme at int8 vision, then the variants of the default."""
    out = [(f"int8 vision, {s if s in PRECISIONS else 'int4 ' + s} LM", s, ["--vision", "int8"]) for s in schemes]
    if DEFAULT in schemes:
        out += [(f"fp32 vision, int4 {DEFAULT} LM", DEFAULT, ["--vision", "fp32"]),
                (f"fp16 vision, int4 {DEFAULT} LM", DEFAULT, ["--vision", "fp16"]),
                ("default, options by letter", DEFAULT, ["--choice", "letter"]),
                ("default + --frame-selection clip", DEFAULT, ["--frame-selection", "clip"]),
                ("default + --pooling prompt-guided", DEFAULT, ["--pooling", "prompt-guided"]),
                ("default + clip selection + prompt-guided", DEFAULT,
                 ["--frame-selection", "clip", "--pooling", "prompt-guided"])]
    return out


def _run(cmd: list, log: Path) -> None:
    print("$ " + " ".join(map(str, cmd)), file=sys.stderr, flush=True)
    with open(log, "w") as f:
        if subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT).returncode != 0:
            sys.exit(f"failed: see {log}")


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m sfedge.bench.eval_table", description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--seeds", default="0-49", help="held-out generator seeds (the demo trained on 100000 and up)")
    p.add_argument("--schemes", default="imatrix,gptq,gptq-mixed,rtn,rtn-mixed,accurate,int8,fp32")
    a = p.parse_args()
    from sfedge.export.demo import build_demo
    from sfedge.train import synthetic

    a.out.mkdir(parents=True, exist_ok=True)
    data = a.out / "data" / "questions.jsonl"
    if not data.exists():
        synthetic.write_dataset(data.parent, synthetic.seeds(a.seeds))
    checkpoint = a.out / "demo" / "checkpoint"
    if not (checkpoint / "config.json").exists():
        build_demo(a.out / "demo")
    schemes = a.schemes.split(",")
    for s in schemes:
        bundle = a.out / f"bundle-{s}"
        if not (bundle / "manifest.json").exists():
            how = ["--llm-precision", s] if s in PRECISIONS else ["--llm-quant", s]
            # a scheme that misses the export's gate is still scored, and the table says it missed
            _run(["sf-export", "--demo", bundle, "--force", "--vision-variants", "fp32,fp16,int8",
                  "--allow-low-fidelity", *how], a.out / f"export-{s}.log")
    rows = []
    for name, s, options in runs(schemes):
        folder = a.out / "runs" / name.replace(" ", "_").replace(",", "").replace("+", "").replace("-", "")
        if not (folder / "results.json").exists():
            folder.parent.mkdir(exist_ok=True)
            reference = [] if "prompt-guided" in options else ["--reference", checkpoint, "--reference-cache",
                                                                  a.out / "reference.jsonl"]
            _run(["sf-eval", a.out / f"bundle-{s}", "--data", data, "--out", folder, *reference, *options],
                 folder.with_suffix(".log"))
        summary = json.loads((folder / "results.json").read_text())["summary"]
        rows.append(_row(name, summary))
    table = "\n".join([f"machine: {machine()}", f"data: {data} (seeds {a.seeds})", "", *_markdown(rows)]) + "\n"
    (a.out / "table.md").write_text(table)
    print(table)


def _row(name: str, s: dict) -> dict:
    o, ref = s["overall"], s["overall"].get("reference")
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}"
    needle = s["categories"].get("needle", {})
    return {"run": name, "accuracy [95% CI]": f"{pct(o['accuracy'])} [{pct(o['interval'][0])}, "
                                              f"{pct(o['interval'][1])}]",
            "needle": pct(needle.get("accuracy")),
            "reference": pct(ref["accuracy"]) if ref else "-",
            "flips": f"{pct(ref['flip_rate'])}%" if ref else "-",
            "flips where sure": f"{pct(ref['sure']['flip_rate'])}% of {ref['sure']['n']}" if ref else "-",
            "McNemar p": f"{ref['mcnemar']['p']:.3g}" if ref else "-",
            "option KL": f"{ref['option_kl_mean']:.4f}" if ref else "-",
            "top-1": pct(ref["top1_agreement"]) if ref else "-",
            "s/question": f"{s['speed']['question_s']:.3f}", "s/video": f"{s['speed']['video_s']:.3f}",
            "unparsed": pct(o["unparsed_rate"] + o["empty_rate"]),
            "export gate": "passed" if s["fidelity"]["all_passed"] else "MISSED: " + ", ".join(s["fidelity"]["failed"])}


def _markdown(rows: list[dict]) -> list[str]:
    head = list(rows[0])
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + \
        ["| " + " | ".join(str(r[h]) for h in head) + " |" for r in rows]


if __name__ == "__main__":
    main()
