"""ONNX Runtime sessions: execution providers per device, and graph runs whose failures name the graph."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from .errors import BackendUnavailable, GraphFailed

DEVICES = ("cpu", "cuda", "tensorrt", "auto")


def providers(device: str, cache_dir: Path | None = None) -> list:
    """Provider list for a device, best first, CPU last as the fallback for nodes a GPU provider lacks."""
    available = ort.get_available_providers()
    if device == "auto":
        device = "tensorrt" if "TensorrtExecutionProvider" in available else (
            "cuda" if "CUDAExecutionProvider" in available else "cpu")
    if device not in DEVICES:
        raise BackendUnavailable(f"device {device!r}: choose one of {', '.join(DEVICES)}")
    cuda = "CUDAExecutionProvider"
    if device == "cpu":
        return ["CPUExecutionProvider"]
    need = "CUDAExecutionProvider" if device == "cuda" else "TensorrtExecutionProvider"
    if need not in available:
        raise BackendUnavailable(
            f"device {device!r} needs ONNX Runtime's {need}, which this onnxruntime build does not have "
            f"(available: {', '.join(available)}); install onnxruntime-gpu instead of onnxruntime on a GPU host")
    if device == "cuda":
        return [cuda, "CPUExecutionProvider"]
    trt = {"trt_fp16_enable": True, "trt_engine_cache_enable": True, "trt_timing_cache_enable": True}
    if cache_dir:
        trt["trt_engine_cache_path"] = str(cache_dir)
        trt["trt_timing_cache_path"] = str(cache_dir)
    return [("TensorrtExecutionProvider", trt), cuda, "CPUExecutionProvider"]


class Graph:
    def __init__(self, path: Path, provider_list, threads: int | None = None):
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.path = Path(path)
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=provider_list)
        except Exception as e:
            raise GraphFailed(f"{path}: ONNX Runtime cannot load this graph: {e}") from None
        self.inputs = {i.name for i in self.session.get_inputs()}

    def run(self, feeds: dict) -> np.ndarray:
        return self.run_all(feeds)[0]

    def run_all(self, feeds: dict) -> list[np.ndarray]:
        """Every output, in the graph's order."""
        try:
            return self.session.run(None, feeds)
        except Exception as e:
            raise GraphFailed(f"{self.path}: ONNX Runtime failed: {e}") from None
