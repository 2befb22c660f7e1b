"""Tracing the visual half to ONNX (torch.onnx, dynamo exporter) and deriving the fp16 and int8 variants."""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from sfedge.runtime.sessions import Graph

from .aggregator import SlowFastAggregator
from .vision import VisionGraph


def export_onnx(module: torch.nn.Module, args: tuple, path: Path, input_names, output_names, dynamic_shapes):
    """One call for every graph we trace. The exporter's chatter is swallowed; its errors are not."""
    module.eval()
    quiet = io.StringIO()
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(quiet):
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        program = torch.onnx.export(module, args, dynamo=True, input_names=input_names,
                                    output_names=output_names, dynamic_shapes=dynamic_shapes, verbose=False,
                                    optimize=True)
        big = sum(p.numel() * 4 for p in module.parameters()) > 1_500_000_000  # protobuf stops at 2 GB
        program.save(str(path), external_data=big)
    return path


def export_vision(model, vision: dict, path: Path, sample_frames: torch.Tensor) -> Path:
    f = torch.export.Dim("frames", min=1, max=4096)
    return export_onnx(VisionGraph(model, vision), (sample_frames,), path, ["frames"], ["features"],
                       {"frames": {0: f}})


def export_aggregator(vision: dict, agg: dict, path: Path) -> Path:
    module = SlowFastAggregator(vision["patch_grid"], int(vision["has_cls_token"]), agg["slow_pool"],
                                agg["fast_grid"])
    t = 4
    feats = torch.randn(t, vision["tokens_per_frame"], vision["hidden_size"])
    slow, fast = torch.arange(2, dtype=torch.int64), torch.arange(3, dtype=torch.int64)
    tdim, sdim = torch.export.Dim("frames", min=1, max=4096), torch.export.Dim("slow", min=1, max=4096)
    fdim = torch.export.Dim("fast", min=1, max=4096)
    return export_onnx(module, (feats, slow, fast), path, ["features", "slow_index", "fast_index"], ["tokens"],
                       {"features": {0: tdim}, "slow_index": {0: sdim}, "fast_index": {0: fdim}})


def quantize_int8_dynamic(src: Path, dst: Path) -> Path:
    """Weights within +-64 (`reduce_range`): ONNX Runtime's int8 GEMM on x86 CPUs without VNNI adds uint8 x int8
    product pairs in int16 with saturation, which full-range weights overflow (a tiny SigLIP tower: min cosine 0.92
    on an AVX2-only AMD EPYC; decoder_graph.TWIN_LIMIT has the same cause)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True, reduce_range=True,
                     op_types_to_quantize=["MatMul", "Gemm"])
    return dst


def quantize_int8_static(src: Path, dst: Path, reader) -> Path:
    """QDQ int8 calibrated on real frames (`reader`: a `calibration_reader.FrameReader`); weights within +-64, as
    `quantize_int8_dynamic`'s."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(str(src), str(dst), reader, quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=["MatMul", "Gemm", "Conv"])
    return dst


def convert_fp16(src: Path, dst: Path) -> Path:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(model, str(dst))
    return dst


def run_graph(path: Path, feeds: dict) -> np.ndarray:
    """The graph's first output, on CPU: how the export checks each graph it writes."""
    return Graph(path).run(feeds)

