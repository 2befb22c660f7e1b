"""TensorRT engines built by `sf-export --engines`: the optimization profile over the frame count, the decision
whether an engine suits this device, and a runner with the `sessions.Graph` interface.

An engine is valid only on the GPU model, compute capability and TensorRT version it was built with, so the
manifest records those next to each engine and `choose` compares them with this device. `tensorrt` and
`cuda-python` are imported only by the functions that run an engine: the runtime works without them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import BackendUnavailable, GraphFailed

INSTALL = ("on a Jetson use JetPack's TensorRT (sudo apt install python3-libnvinfer) and pip install cuda-python; "
           "on a desktop GPU pip install tensorrt cuda-python")
FRAME_INPUT = {"vision": "frames", "aggregator": "features"}  # the input whose first dimension is the frame count
PRECISIONS = ("int8", "fp16", "fp32")  # preference when a bundle holds several engines for one graph
ONNX_FALLBACK = "using the ONNX graph through ONNX Runtime's TensorRT provider"


def profile_shapes(manifest: dict, plan, max_frames: int | None = None) -> dict:
    """(min, opt, max) shapes of each input of the vision graph and the aggregator: 1 frame at least, the plan's
    encode chunk (vision) or frame count (aggregator) as the shape TensorRT optimizes for, `max_frames` (default:
    the plan's frames) at most. The slow index always has the bundle's slow-frame count; the fast index one entry
    per fast-pathway frame."""
    v = manifest["vision"]
    h, w = v["image_size"]
    p, d = v["tokens_per_frame"], v["hidden_size"]
    s = manifest["aggregator"]["slow_frames"]
    n = max_frames or max(plan.frames, plan.candidates)  # frame selection aggregates among its candidates
    vis, agg = min(plan.encode_chunk, n), min(plan.frames, n)
    return {
        "vision": {"frames": ((1, h, w, 3), (vis, h, w, 3), (n, h, w, 3))},
        "aggregator": {"features": ((1, p, d), (agg, p, d), (n, p, d)), "slow_index": ((s,), (s,), (s,)),
                       "fast_index": ((1,), (agg,), (n,))},
    }


def describe(target: dict) -> str:
    """'Orin (sm_87, TensorRT 10.3.0)' for an engine entry or a device_info."""
    return f"{target['gpu']} (sm_{target['compute_capability'].replace('.', '')}, TensorRT {target['tensorrt']})"


def _unsuitable(entry: dict, role: str, device: dict, root: Path, need_frames: int) -> str | None:
    """Why this engine cannot serve here, or None if it can."""
    keys = ("gpu", "compute_capability", "tensorrt")
    if any(entry[k] != device[k] for k in keys):
        return f"engine {entry['file']} was built for {describe(entry)} but this device is {describe(device)}"
    if not (root / entry["file"]).is_file():
        return f"engine {entry['file']} is listed in the manifest but missing from the bundle"
    try:
        top = int(entry["profile"][FRAME_INPUT[role]][2][0])
    except (KeyError, IndexError, TypeError, ValueError):
        return f"engine {entry['file']} records no frame range for its '{FRAME_INPUT[role]}' input"
    if top < need_frames:
        return (f"engine {entry['file']} takes at most {top} frames but the plan feeds {need_frames} "
                f"(rebuild with sf-export --engines --max-frames {need_frames})")
    return None


def choose(entries: list, role: str, device: dict | None, root: Path, need_frames: int) -> tuple[dict | None, str]:
    """The engine to run for `role` ('vision' or 'aggregator') on `device` (from `device_info`), or None, with the
    reason either way, for the user to read. Of several suitable engines the lowest precision wins (int8 first)."""
    mine = [e for e in entries if e["role"] == role]
    if not mine:
        return None, (f"{role}: the bundle has no TensorRT engine for this graph (build one on this device with "
                      f"sf-export --engines): {ONNX_FALLBACK}")
    if device is None:
        return None, (f"{role}: the bundle's TensorRT engines need the tensorrt and cuda-python packages and a CUDA "
                      f"device, not all present here ({INSTALL}): {ONNX_FALLBACK}")
    rank = {p: i for i, p in enumerate(PRECISIONS)}
    mine.sort(key=lambda e: rank.get(e["precision"], len(rank)))
    reasons = []
    for entry in mine:
        why = _unsuitable(entry, role, device, Path(root), need_frames)
        if why is None:
            return entry, f"{role}: TensorRT engine {entry['file']} ({entry['precision']}, built for {describe(entry)})"
        reasons.append(why)
    more = f" (and {len(reasons) - 1} other engine(s) that do not fit either)" if len(reasons) > 1 else ""
    return None, f"{role}: {reasons[0]}{more}: {ONNX_FALLBACK}"


def _cudart():
    try:
        from cuda.bindings import runtime  # cuda-python >= 12.6
    except ImportError:
        from cuda import cudart as runtime  # older cuda-python
    return runtime


def _call(fn, *args):
    """cuda-python returns (error, *values); turn an error into GraphFailed and return the value."""
    err, *values = fn(*args)
    if int(err) != 0:  # cudaSuccess
        raise GraphFailed(f"CUDA {fn.__name__} failed: {err}")
    return values[0] if values else None


def device_info() -> dict | None:
    """This device as an engine entry records it, or None where tensorrt, cuda-python or a CUDA device is missing."""
    try:
        import tensorrt as trt

        cudart = _cudart()
    except ImportError:
        return None
    try:
        prop = _call(cudart.cudaGetDeviceProperties, _call(cudart.cudaGetDevice))
    except GraphFailed:
        return None
    name = prop.name.split(b"\0")[0].decode() if isinstance(prop.name, bytes) else str(prop.name)
    return {"gpu": name, "compute_capability": f"{prop.major}.{prop.minor}", "tensorrt": trt.__version__}


class DeviceBuffer:
    """CUDA memory that numpy arrays are copied into and out of. From pageable numpy memory an upload returns once
    the array has been staged and a download once it is complete (CUDA's rule), so arrays may go away after."""

    def __init__(self, nbytes: int):
        self._cudart = _cudart()
        self.nbytes = nbytes
        self.ptr = _call(self._cudart.cudaMalloc, max(nbytes, 1))

    def upload(self, array: np.ndarray, stream=0) -> int:
        kind = self._cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        _call(self._cudart.cudaMemcpyAsync, self.ptr, array.ctypes.data, array.nbytes, kind, stream)
        return self.ptr

    def download(self, array: np.ndarray, stream=0) -> np.ndarray:
        kind = self._cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        _call(self._cudart.cudaMemcpyAsync, array.ctypes.data, self.ptr, array.nbytes, kind, stream)
        return array

    def free(self) -> None:
        if self.ptr:
            _call(self._cudart.cudaFree, self.ptr)
            self.ptr = 0


class EngineRunner:
    """A serialized TensorRT engine behind the `sessions.Graph` interface: numpy feeds in, outputs out."""

    def __init__(self, path: Path):
        try:
            import tensorrt as trt
        except ImportError:
            raise BackendUnavailable(f"{path}: running a TensorRT engine needs tensorrt ({INSTALL})") from None
        self.path = Path(path)
        self.provider = "TensorRT engine"
        self._trt, self._cudart = trt, _cudart()
        self._logger = trt.Logger(trt.Logger.ERROR)
        self.engine = trt.Runtime(self._logger).deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise GraphFailed(f"{self.path}: TensorRT cannot deserialize this engine (another TensorRT version or "
                              f"GPU built it?); remove it or rebuild with sf-export --engines")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self.stream = _call(self._cudart.cudaStreamCreate)

    def run(self, feeds: dict) -> np.ndarray:
        return self.run_all(feeds)[0]

    def run_all(self, feeds: dict) -> list[np.ndarray]:
        """Every output, in the engine's order."""
        # Buffers are allocated per call: a video takes a handful of calls, and nothing stays on the device between.
        hosts, buffers = [], []
        try:
            for name in self.inputs:
                if name not in feeds:
                    raise GraphFailed(f"{self.path}: input '{name}' was not given")
                host = np.ascontiguousarray(feeds[name], dtype=self.dtypes[name])
                if not self.context.set_input_shape(name, host.shape):
                    raise GraphFailed(f"{self.path}: input '{name}' of shape {host.shape} is outside the engine's "
                                      f"profile; rebuild with a larger sf-export --engines --max-frames")
                buf = DeviceBuffer(host.nbytes)
                buffers.append(buf)
                hosts.append(host)
                self.context.set_tensor_address(name, buf.upload(host, self.stream))
            results = []
            for name in self.outputs:
                shape = tuple(self.context.get_tensor_shape(name))
                if min(shape, default=0) < 0:
                    raise GraphFailed(f"{self.path}: output '{name}' has no known shape ({shape})")
                host = np.empty(shape, self.dtypes[name])
                buf = DeviceBuffer(host.nbytes)
                buffers.append(buf)
                results.append((host, buf))
                self.context.set_tensor_address(name, buf.ptr)
            if not self.context.execute_async_v3(int(self.stream)):
                raise GraphFailed(f"{self.path}: TensorRT failed to run the engine")
            for host, buf in results:
                buf.download(host, self.stream)
            _call(self._cudart.cudaStreamSynchronize, self.stream)
            return [host for host, _ in results]
        finally:
            for buf in buffers:  # after the stream sync (or an error): the copies no longer need `hosts`
                buf.free()
