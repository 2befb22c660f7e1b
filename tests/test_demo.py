"""The built-in demo, end to end, as README's first command runs it."""
import json
import subprocess
import sys

import pytest

from sfedge.runtime import manifest
from sfedge.runtime.planner import make_plan


@pytest.mark.slow
def test_demo_answers_with_timings_and_says_the_tower_is_untrained(demo_bundle):
    run = subprocess.run([sys.executable, "-m", "sfedge.runtime.cli", "ask", str(demo_bundle), "--video", "demo",
                          "-q", "Describe the video.", "--max-new-tokens", "24"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip()
    assert "not grounded in the pictures" in run.stderr
    assert "prefill" in run.stderr and "peak memory" in run.stderr


@pytest.mark.slow
def test_peak_memory_of_a_full_question_is_within_20_percent_of_the_plan(demo_bundle):
    run = subprocess.run([sys.executable, "-m", "sfedge.runtime.cli", "ask", str(demo_bundle), "--video", "demo",
                          "-q", "Describe the video.", "-q", "What happens next?", "--max-new-tokens", "128",
                          "--json"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    answers = [json.loads(x) for x in run.stdout.strip().splitlines()]
    assert answers[1]["reused_prefix"]
    plan = make_plan(manifest.load(demo_bundle), max_new_tokens=128)
    peak = max(a["peak_memory_bytes"] for a in answers)
    assert abs(peak - plan.total) <= 0.2 * plan.total, (peak, plan.table())
