"""sf-bench's own logic: statistics, the collect loop's policy for a failed worker, the worker process's error
path, the report files, and the suites' summaries (on stand-in worker results)."""
import json
import os
import sys

import matplotlib  # noqa: F401  (the bench extra: the report's plots are part of what is tested)
import pytest

from sfedge.bench import report, spawn, stats, suites, workers
from sfedge.bench.probe import machine
from sfedge.runtime.targets import read_bandwidth
from sfedge.bench.suites import Job, collect
from sfedge.runtime.errors import BackendUnavailable

PNG = b"\x89PNG\r\n\x1a\n"


def test_summary_and_ratios():
    s = stats.summarize([3.0, 1.0, 2.0, None])
    assert s == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert stats.summarize([None])["median"] is None
    fast, slow = stats.summarize([2.0]), stats.summarize([8.0])
    assert stats.ratio(fast, slow, higher_is_better=False) == 4.0  # times: reference / ours
    assert stats.ratio(slow, fast, higher_is_better=True) == 4.0  # rates: ours / reference
    assert stats.ratio(stats.summarize([]), slow, True) is None
    assert stats.peak_mb([{"peak_rss": 2e6}, {"peak_rss": 4e6}])["median"] == 3.0


def _report(suite="llm"):
    return {"suite": suite, "machine": machine(), "command": f"sf-bench {suite}",
            "data": {"results": {"ours @ 30": {"decode_tok_s": stats.summarize([100.0, 120.0]),
                                               "decode_speedup": 5.0, "peak_mb": stats.summarize([200.0])},
                                 "transformers-fp32 @ 30": {"decode_tok_s": stats.summarize([20.0])}},
                     "note": 0.25, "skipped": {"llama.cpp Q4_0": "not installed"}}}


def test_report_writes_markdown_json_and_plot(tmp_path):
    rep = _report()
    md = report.markdown(rep)
    lines = md.splitlines()
    assert lines[:4] == ["# sf-bench llm", "", f"machine: {machine()}", "command: `sf-bench llm`"]
    assert lines[5] == "| | decode_speedup | decode_tok_s | peak_mb |"
    assert "| ours @ 30 | 5 | 110 [100-120] | 200 |" in lines  # a range only where there are several runs
    assert "| transformers-fp32 @ 30 | - | 20 | - |" in lines
    assert "note: 0.25" in lines and "skipped llama.cpp Q4_0: not installed" in lines

    written = report.write(rep, tmp_path / "out")
    assert written == [tmp_path / "out" / f"llm.{ext}" for ext in ("json", "md", "png")]
    assert json.loads(written[0].read_text()) == rep
    assert written[1].read_text() == md
    assert written[2].read_bytes().startswith(PNG)


def test_scale_plot_stacks_the_stages(tmp_path):
    row = {f"{k}_s": stats.summarize([0.1 * (i + 1)]) for i, k in enumerate(suites.SCALE_STAGES)}
    rep = {"suite": "scale", "data": {"results": {"8 frames": row, "16 frames": row}}}
    path = report.plot(rep, tmp_path)
    assert path == tmp_path / "scale.png" and path.read_bytes().startswith(PNG)


def test_a_failed_worker_gives_its_reason(tmp_path):
    with pytest.raises(spawn.WorkerFailed, match=r"^BadBundle: .*missing"):
        spawn.run("scale", {"bundle": tmp_path / "missing", "video": "demo", "frames": 8})
    with pytest.raises(spawn.WorkerFailed, match="^KeyError: 'no_such_worker'"):
        spawn.run("no_such_worker", {})


def test_a_worker_reply_survives_native_output_on_stdout(tmp_path, monkeypatch):
    """llama.cpp's quantizer prints a warning from C, flushed at exit after anything Python printed: the reply
    travels in its own file, so a warning is not a failure."""
    def noisy():
        os.write(1, b"llama_model_quantize: 1 of 272 tensor(s) required fallback quantization\n")
        return {"x": 1.0}

    monkeypatch.setitem(workers.WORKERS, "noisy", noisy)
    reply = tmp_path / "reply.json"
    assert spawn.child("noisy", "{}", str(reply)) == 0
    assert json.loads(reply.read_text()) == {"result": {"x": 1.0}}


def test_llama_cpp_absent_is_unavailable_with_a_reason(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails as if not installed
    with pytest.raises(BackendUnavailable, match="llama-cpp-python is not installed"):
        workers.llm_llamacpp("Q4_0", 30)


def _stand_in(results: dict, calls: list):
    """spawn.run for a collect test: each worker name gives a result, or fails with a reason."""
    def run(worker, args):
        calls.append(worker)
        if isinstance(results[worker], str):
            raise spawn.WorkerFailed(results[worker])
        return {**results[worker], **args}
    return run


def test_collect_skips_a_failed_group_with_its_reason(monkeypatch):
    calls, logged = [], []
    monkeypatch.setattr(spawn, "run", _stand_in({"good": {"x": 1.0}, "bad": "BackendUnavailable: not here"}, calls))
    jobs = [Job("good @ 1", "good", {"n": 1}, "good"), Job("bad @ 1", "bad", {}, "bad"),
            Job("good @ 2", "good", {"n": 2}, "good"), Job("bad @ 2", "bad", {}, "bad")]
    runs, skipped = collect("t", jobs, 3, logged.append)
    assert skipped == {"bad": "BackendUnavailable: not here"}
    assert calls.count("bad") == 1 and calls.count("good") == 6  # the group is not tried again
    assert runs["good @ 2"] == [{"x": 1.0, "n": 2}] * 3 and runs["bad @ 1"] == runs["bad @ 2"] == []
    assert "  skipped bad: BackendUnavailable: not here" in logged


def test_collect_ends_a_suite_that_needs_the_failed_worker(monkeypatch):
    monkeypatch.setattr(spawn, "run", _stand_in({"ok": {}, "ref": "RuntimeError: out of memory"}, []))
    with pytest.raises(BackendUnavailable, match="^e2e reference failed: RuntimeError: out of memory$"):
        collect("e2e", [Job("ours", "ok", {}), Job("reference", "ref", {})], 2, lambda m: None, required=True)


def test_e2e_summary_and_ratios(monkeypatch, tmp_path):
    answer = {"ttft_s": 1.0, "total_s": 2.0, "tokens": 32}
    ours = {"first": answer, "follow_up": {**answer, "total_s": 0.5}, "peak_rss": 1e9}
    ref = {"first": {**answer, "total_s": 8.0}, "follow_up": {**answer, "total_s": 8.0}, "peak_rss": 2e9}
    monkeypatch.setattr(spawn, "run", _stand_in({"e2e_ours": ours, "e2e_reference": ref}, []))
    out = suites.e2e(tmp_path / "b", tmp_path / "c", 2, lambda m: None)
    assert out["ours"]["first_total_s"] == {"median": 2.0, "min": 2.0, "max": 2.0, "n": 2}
    assert out["speedup"]["first_total_s"] == 4.0 and out["speedup"]["follow_up_total_s"] == 16.0
    assert out["memory_ratio"] == 0.5


def test_kernels_measure_every_variant_and_compare_with_the_decoders(monkeypatch, tmp_path):
    """The real kernels, once (the CPU-kind comparison behind the int8 prefill twin), then the suite's ratios."""
    from sfedge.bench import kernels

    got = kernels.measure(rounds=1)
    assert set(got) == {f"{v} @ {m} rows" for v in kernels.VARIANTS for m in kernels.ROWS}
    assert all(g > 0 for g in got.values())
    monkeypatch.setattr(spawn, "run", _stand_in({"kernels": {"gmacs": got, "peak_rss": 1e8}}, []))
    out = suites.kernels(None, None, 2, lambda m: None)["results"]
    for name, row in out.items():
        rows = name.rsplit(" @ ", 1)[1]
        assert row["vs_decoder"] == pytest.approx(got[name] / got[f"{kernels.DECODER} @ {rows}"])
    assert report.plot({"suite": "kernels", "data": {"results": out}}, tmp_path).read_bytes().startswith(PNG)


def test_scale_reports_only_what_fits(monkeypatch, tmp_path):
    def run(worker, args):
        if args["frames"] > 50:
            raise spawn.WorkerFailed("BackendUnavailable: does not fit")
        return {**{k: 0.1 for k in suites.SCALE_STAGES}, "visual_tokens": args["frames"], "per_token_s": 0.01,
                "peak_rss": 1e8}
    monkeypatch.setattr(spawn, "run", run)
    out = suites.scale(tmp_path / "b", None, 1, lambda m: None, video="clip.mp4")
    assert list(out["results"]) == ["8 frames", "16 frames", "32 frames", "50 frames"]
    assert out["skipped"] == {f"{n} frames": "BackendUnavailable: does not fit" for n in (100, 200)}
    assert out["results"]["50 frames"]["visual_tokens"] == 50


def test_memory_bandwidth_is_measured():
    assert read_bandwidth(50 * 10**6) > 1e8
