"""`sf-export --engines BUNDLE`: TensorRT engines for the vision graph and the aggregator, built on the device that
will run them, from the bundle's ONNX, and recorded in its manifest (GPU, compute capability, TensorRT version).

The naming, profile and manifest-entry logic are plain functions, tested without a GPU; `build_engine` holds the
TensorRT calls. Engines go to `engines/` in the bundle with a timing cache per device, so a rebuild is quick."""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from sfedge.runtime import engines as runtime_engines
from sfedge.runtime import manifest as manifest_io
from sfedge.runtime.errors import BackendUnavailable, BadInput, ExportFailed
from sfedge.runtime.planner import make_plan
from sfedge.runtime.units import parse_size

from .calibration_reader import FrameReader

try:
    import tensorrt as trt
except ImportError:
    trt = None

DEFAULT_WORKSPACE = "2GB"


def gpu_slug(device: dict) -> str:
    """'NVIDIA GeForce RTX 4090', 8.9 -> 'geforce-rtx-4090-sm89': the device part of engine file names."""
    name = re.sub(r"[^a-z0-9]+", "-", device["gpu"].lower().replace("nvidia", "")).strip("-") or "gpu"
    return f"{name}-sm{device['compute_capability'].replace('.', '')}"


def engine_file(role: str, precision: str, device: dict) -> str:
    return f"{manifest_io.ENGINES_DIR}/{role}.{precision}.{gpu_slug(device)}.plan"


def timing_cache_file(device: dict) -> str:
    return f"{manifest_io.ENGINES_DIR}/timing.{gpu_slug(device)}.cache"


def builds(manifest: dict, fp16: bool, int8: bool) -> list[tuple[str, str, str]]:
    """(role, ONNX graph, precision) for each engine. Both come from fp32 graphs: TensorRT picks its own kernels per
    precision, and the bundle's dynamic int8 graph has operators TensorRT lacks. The aggregator is pooling only, so
    int8 would buy nothing there."""
    vision = "int8" if int8 else "fp16" if fp16 else "fp32"
    return [("vision", manifest["vision"]["graphs"]["fp32"], vision),
            ("aggregator", manifest["aggregator"]["graph"], "fp16" if fp16 else "fp32")]


def engine_entry(role: str, graph: str, file: str, precision: str, profile: dict, device: dict) -> dict:
    """The manifest's record of one engine (schema: `sfedge.runtime.manifest.ENGINE`)."""
    return {"role": role, "graph": graph, "file": file, "precision": precision,
            "profile": {name: [list(s) for s in shapes] for name, shapes in profile.items()},
            "gpu": device["gpu"], "compute_capability": device["compute_capability"],
            "tensorrt": device["tensorrt"]}


def merge_entries(old: list, new: list) -> list:
    """Engines built now replace those of the same file; engines built for other devices stay."""
    files = {e["file"] for e in new}
    return [e for e in old if e["file"] not in files] + new


def calibration_batches(reader, batch: int) -> list[np.ndarray]:
    """uint8 frame batches of exactly `batch` frames from a FrameReader: TensorRT calibrates at the profile's opt
    shape, so a short last batch is dropped."""
    out = [b["frames"] for b in iter(reader.get_next, None) if len(b["frames"]) == batch]
    if not out:
        raise BadInput(f"the calibration videos gave fewer than {batch} frames, the engine's opt shape: give more "
                       f"or longer videos")
    return out


_Calibrator = trt.IInt8EntropyCalibrator2 if trt else object


class FrameCalibrator(_Calibrator):
    """TensorRT's entropy calibrator fed with frames from the calibration videos. `to_device(array)` copies a batch
    to GPU memory and returns the pointer (a `runtime.engines.DeviceBuffer` upload)."""

    def __init__(self, batches: list[np.ndarray], to_device):
        if trt:
            trt.IInt8EntropyCalibrator2.__init__(self)
        self._batches, self._to_device = iter(batches), to_device
        self._batch = len(batches[0])

    def get_batch_size(self) -> int:
        return self._batch

    def get_batch(self, names):
        frames = next(self._batches, None)
        return None if frames is None else [self._to_device(np.ascontiguousarray(frames, dtype=np.uint8))]

    def read_calibration_cache(self):
        return None  # calibrate afresh on the videos given each time

    def write_calibration_cache(self, cache) -> None:
        pass


def require_tensorrt():
    if trt is None:
        raise BackendUnavailable(f"sf-export --engines needs TensorRT's Python package 'tensorrt', which is not "
                                 f"installed: {runtime_engines.INSTALL}")
    device = runtime_engines.device_info()
    if device is None:
        raise BackendUnavailable(f"sf-export --engines needs cuda-python and a CUDA device to build on, and found "
                                 f"none: {runtime_engines.INSTALL}")
    return device


def build_engine(onnx_path: Path, profile: dict, precision: str, workspace: int, timing_cache: Path,
                 calibrator=None) -> bytes:
    """One serialized engine. Errors name the graph; the timing cache file is read and written back."""

    class Logger(trt.ILogger):  # keeps TensorRT's last error for our one-line message
        def __init__(self):
            trt.ILogger.__init__(self)
            self.last = ""

        def log(self, severity, msg):
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.last = msg

    logger = Logger()
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is TensorRT 10's only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportFailed(f"{onnx_path}: TensorRT's ONNX parser refused this graph: {errors or logger.last}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    opt_profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile.items():
        opt_profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(opt_profile)
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)  # with int8: fp16 for the layers int8 does not speed up
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
        config.int8_calibrator = calibrator
        config.set_calibration_profile(opt_profile)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise ExportFailed(f"{onnx_path}: TensorRT could not build an engine ({precision}): "
                           f"{logger.last or 'see the TensorRT log'}")
    _write_atomic(timing_cache, bytes(config.get_timing_cache().serialize()))
    return bytes(blob)


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def build_engines(bundle, fp16: bool = False, int8: bool = False, calibration_videos=(), max_frames: int | None = None,
                  workspace: str = DEFAULT_WORKSPACE, memory_budget: str | None = None, log=print) -> list[dict]:
    """Build, write and record the engines; returns their manifest entries."""
    root = Path(bundle)
    m = manifest_io.load(root)
    plan = make_plan(m, parse_size(memory_budget) if memory_budget else None, device="tensorrt")
    if max_frames is not None and max_frames < 1:
        raise BadInput("--max-frames must be at least 1")
    if int8 and not calibration_videos:
        raise BadInput("--int8 needs --calibration-videos: TensorRT calibrates int8 ranges on real frames")
    work_bytes = parse_size(workspace)
    device = require_tensorrt()
    shapes = runtime_engines.profile_shapes(m, plan, max_frames)
    cache = root / timing_cache_file(device)
    entries = []
    for role, graph, precision in builds(m, fp16, int8):
        file = engine_file(role, precision, device)
        log(f"building {file} from {graph} on {runtime_engines.describe(device)}")
        calibrator = buffer = None
        if precision == "int8":
            opt = shapes[role]["frames"][1]
            reader = FrameReader(calibration_videos, tuple(m["vision"]["image_size"]),
                                 frames_per_video=max(16, opt[0]), batch=opt[0])
            batches = calibration_batches(reader, opt[0])
            buffer = runtime_engines.DeviceBuffer(batches[0].nbytes)
            calibrator = FrameCalibrator(batches, buffer.upload)
        try:
            blob = build_engine(root / graph, shapes[role], precision, work_bytes, cache, calibrator)
        finally:
            if buffer:
                buffer.free()
        _write_atomic(root / file, blob)
        entries.append(engine_entry(role, graph, file, precision, shapes[role], device))
    m["engines"] = merge_entries(m.get("engines", []), entries)
    manifest_io.write(root, m)  # re-hashes every file, the engines and timing cache included
    manifest_io.load(root)
    return entries
