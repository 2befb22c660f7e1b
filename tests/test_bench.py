"""sf-bench's own logic: statistics, ratios, the report, and the skip path for an absent backend."""
import json
import sys

import pytest

from sfedge.export import bench
from sfedge.runtime.errors import BackendUnavailable


def test_summary_and_ratios():
    s = bench.summarize([3.0, 1.0, 2.0, None])
    assert s == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert bench.summarize([None])["median"] is None
    fast, slow = bench.summarize([2.0]), bench.summarize([8.0])
    assert bench.ratio(fast, slow, higher_is_better=False) == 4.0  # times: reference / ours
    assert bench.ratio(slow, fast, higher_is_better=True) == 4.0  # rates: ours / reference
    assert bench.ratio(bench.summarize([]), slow, True) is None


def test_report_markdown_and_json_round_trip(tmp_path):
    report = {"suite": "llm", "machine": bench.machine(), "command": "sf-bench llm",
              "data": {"results": {"ours @ 30": {"decode_tok_s": bench.summarize([100.0, 120.0]),
                                                 "decode_speedup": 5.0}},
                       "skipped": {"llama.cpp Q4_0": "not installed"}}}
    md = bench.markdown(report)
    assert "| ours @ 30 |" in md and "110 [100-120]" in md and "skipped llama.cpp Q4_0: not installed" in md
    assert json.loads(json.dumps(report)) == report
    assert bench.plot(report, tmp_path) is None or (tmp_path / "llm.png").exists()


def test_llama_cpp_absent_is_skipped_with_a_reason(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails as if not installed
    with pytest.raises(BackendUnavailable, match="llama-cpp-python is not installed"):
        bench.worker_llamacpp("Q4_0", tmp_path, 30)


def test_a_failed_worker_becomes_a_skip_reason():
    res = bench._spawn("llamacpp", "Q4_0", "/nonexistent", 30)
    assert "error" in res or "decode_tok_s" in res


def test_memory_bandwidth_is_measured():
    assert bench.read_bandwidth(0.05) > 1e8
