"""ONNX Runtime sessions: execution providers per device, and graph runs whose failures name the graph.

The provider lists are built by pure functions from the device, the memory plan's share for the graph and its
TensorRT profile, so the option dictionaries are tested on machines without a GPU."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from .errors import BackendUnavailable, GraphFailed

DEVICES = ("cpu", "cuda", "tensorrt", "auto")
CPU, CUDA, TENSORRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
NEEDS = {"cuda": CUDA, "tensorrt": TENSORRT}


def resolve(device: str, available: list[str] | None = None) -> str:
    """The concrete device: 'auto' becomes the best one this onnxruntime build offers; a GPU device whose provider
    the build lacks is refused."""
    available = ort.get_available_providers() if available is None else available
    if device == "auto":
        return "tensorrt" if TENSORRT in available else "cuda" if CUDA in available else "cpu"
    if device not in DEVICES:
        raise BackendUnavailable(f"device {device!r}: choose one of {', '.join(DEVICES)}")
    if device in NEEDS and NEEDS[device] not in available:
        raise BackendUnavailable(
            f"device {device!r} needs ONNX Runtime's {NEEDS[device]}, which this onnxruntime build does not have "
            f"(available: {', '.join(available)}); install onnxruntime-gpu instead of onnxruntime on a GPU host")
    return device


def shape_string(shapes: dict) -> str:
    """{'frames': (1, 336, 336, 3)} -> 'frames:1x336x336x3', the TensorRT provider's profile format."""
    return ",".join(f"{name}:{'x'.join(str(int(d)) for d in shape)}" for name, shape in shapes.items())


def tensorrt_options(cache_dir: Path | None, profile: dict | None = None, workspace: int | None = None,
                     fp16: bool = True) -> dict:
    """TensorRT provider options. `profile` maps each input to its (min, opt, max) shapes; with it the cached
    engine covers every frame count the plan feeds, instead of being rebuilt whenever a new shape arrives."""
    opts = {"trt_fp16_enable": fp16, "trt_engine_cache_enable": True, "trt_timing_cache_enable": True}
    if cache_dir:
        opts["trt_engine_cache_path"] = str(cache_dir)
        opts["trt_timing_cache_path"] = str(cache_dir)
    if profile:
        for i, key in enumerate(("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes")):
            opts[key] = shape_string({name: shapes[i] for name, shapes in profile.items()})
    if workspace:
        opts["trt_max_workspace_size"] = int(workspace)
    return opts


def cuda_options(mem_limit: int | None = None) -> dict:
    """CUDA provider options: the session's arena is capped at its share of the memory plan."""
    return {"gpu_mem_limit": int(mem_limit), "arena_extend_strategy": "kSameAsRequested"} if mem_limit else {}


def providers(device: str, cache_dir: Path | None = None, profile: dict | None = None, mem_limit: int | None = None,
              workspace: int | None = None) -> list:
    """Provider list for a device, best first, CPU last as the fallback for nodes a GPU provider lacks."""
    device = resolve(device)
    if device == "cpu":
        return [CPU]
    cuda = (CUDA, cuda_options(mem_limit))
    if device == "cuda":
        return [cuda, CPU]
    return [(TENSORRT, tensorrt_options(cache_dir, profile, workspace)), cuda, CPU]


def provider_name(entry) -> str:
    return entry if isinstance(entry, str) else entry[0]


def open_session(path, providers=None, threads: int | None = None, spinning: bool = True) -> ort.InferenceSession:
    """The one way this project opens an ONNX graph: a load failure names the file instead of ONNX Runtime's
    traceback. CPU when no providers are given. `spinning=False`: its threads sleep as soon as a run ends, instead
    of spinning a while on the cores the next session's run needs."""
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), opts, providers=providers or [CPU])
    except Exception as e:  # onnxruntime raises its own untyped errors
        raise GraphFailed(f"{path}: ONNX Runtime cannot load this graph: {e}") from None


class Graph:
    """A graph that takes numpy feeds and gives numpy outputs; a run failure names the graph."""

    def __init__(self, path: Path, provider_list=None, threads: int | None = None):
        self.path = Path(path)
        self.session = open_session(path, provider_list, threads)
        self.inputs = {i.name for i in self.session.get_inputs()}
        # What really runs: ONNX Runtime drops a GPU provider whose libraries fail to load (with a warning only).
        self.provider = self.session.get_providers()[0]

    def run(self, feeds: dict) -> np.ndarray:
        return self.run_all(feeds)[0]

    def run_all(self, feeds: dict) -> list[np.ndarray]:
        """Every output, in the graph's order."""
        try:
            return self.session.run(None, feeds)
        except Exception as e:
            raise GraphFailed(f"{self.path}: ONNX Runtime failed: {e}") from None

    def outputs(self, feeds: dict) -> dict:
        """Every output by name."""
        return dict(zip([o.name for o in self.session.get_outputs()], self.run_all(feeds)))


def open_graph(role: str, root: Path, onnx_rel: str, provider_list: list, threads: int | None,
               engines: list | None = None, need_frames: int = 0) -> tuple:
    """One of the bundle's graphs on its device, and notes for sf-run on what runs when it is not what was asked
    for. `engines` (the manifest's TensorRT engines, on the tensorrt device only): a matching engine runs instead of
    the ONNX graph; a note says which, or why none does."""
    from . import engines as trt

    notes = []
    if engines is not None:
        entry, reason = trt.choose(engines, role, trt.device_info(), root, need_frames)
        notes.append(reason)
        if entry:
            return trt.EngineRunner(root / entry["file"]), notes
    graph = Graph(root / onnx_rel, provider_list, threads)
    wanted = provider_name(provider_list[0])
    if graph.provider != wanted:
        notes.append(f"{role}: ONNX Runtime could not start {wanted} and runs {Path(onnx_rel).name} on "
                     f"{graph.provider}")
    return graph, notes
