"""The built-in demo, end to end, as README's first command runs it."""
import json
import subprocess
import sys

import pytest

from sfedge.runtime import manifest
from sfedge.runtime.planner import make_plan


def ask(bundle, *args):
    return subprocess.run([sys.executable, "-m", "sfedge.runtime.cli", "ask", str(bundle), "--video", "demo", *args],
                          capture_output=True, text=True)


@pytest.mark.slow
def test_demo_answers_with_timings_and_says_the_tower_is_untrained(demo_bundle):
    run = ask(demo_bundle, "-q", "Describe the video.", "--style", "open-ended", "--max-new-tokens", "24")  # README's
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("In the video,") and len(run.stdout.split()) > 4
    assert "not grounded in the pictures" in run.stderr
    assert "prefill" in run.stderr and "peak memory" in run.stderr
    # Plain style: on the untrained tower's tokens fp32 SmolLM2 itself ends at once. An empty answer is said so.
    run = ask(demo_bundle, "-q", "Describe the video.", "--max-new-tokens", "24")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() or "ended its answer at once" in run.stderr


@pytest.mark.slow
def test_peak_memory_of_a_full_question_is_within_20_percent_of_the_plan(demo_bundle):
    run = ask(demo_bundle, "-q", "Describe the video.", "-q", "What happens next?", "--max-new-tokens", "128",
              "--json")
    assert run.returncode == 0, run.stderr
    answers = [json.loads(x) for x in run.stdout.strip().splitlines()]
    assert answers[1]["reused_prefix"]
    plan = make_plan(manifest.load(demo_bundle), max_new_tokens=128)
    peak = max(a["peak_memory_bytes"] for a in answers)
    assert abs(peak - plan.total) <= 0.2 * plan.total, (peak, plan.table())


@pytest.mark.slow
def test_sf_eval_scores_the_demo_on_generated_clips(demo_bundle, tmp_path):
    """sf-eval end to end on 20 generated questions (4 clips x 5 categories). The demo's tower is untrained, so
    this checks the run and the report, not an accuracy."""
    from sfedge.train import synthetic

    data = synthetic.write_dataset(tmp_path / "data", range(4))
    run = subprocess.run([sys.executable, "-m", "sfedge.eval.cli", str(demo_bundle), "--data", str(data), "--out",
                          str(tmp_path / "eval")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    s, rows = results["summary"], results["questions"]
    assert s["questions"] == 20 and s["overall"]["errors"] == 0 and set(s["categories"]) == set(synthetic.CATEGORIES)
    assert all(len(r["option_logprobs"]) == 4 and max(r["option_logprobs"]) < 0 for r in rows)
    assert sum(r["timings"].get("encode", 0) > 0 for r in rows) == 4  # each video encoded once
    assert "overall" in run.stdout and (tmp_path / "eval" / "accuracy.png").exists()
