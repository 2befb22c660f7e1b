"""Comparing an exported graph with its PyTorch original. Figures go into the manifest's fidelity report."""
from __future__ import annotations

import numpy as np

FP32_REL_MAX_ABS = 1e-4  # fp32 graphs: max abs error relative to the output's scale
INT8_MIN_COSINE = 0.99  # int8 vision: cosine per frame
FP16_MIN_COSINE = 0.999


def compare(reference: np.ndarray, output: np.ndarray, rows_axis: int = 0) -> dict:
    """max abs error (absolute and relative to max |reference|) and the cosine per row (min and mean)."""
    ref = np.asarray(reference, dtype=np.float64)
    out = np.asarray(output, dtype=np.float64)
    if ref.shape != out.shape:
        raise ValueError(f"shape {out.shape} differs from the reference's {ref.shape}")
    r = np.moveaxis(ref, rows_axis, 0).reshape(ref.shape[rows_axis], -1)
    o = np.moveaxis(out, rows_axis, 0).reshape(out.shape[rows_axis], -1)
    cos = (r * o).sum(1) / np.maximum(np.linalg.norm(r, axis=1) * np.linalg.norm(o, axis=1), 1e-30)
    max_abs = float(np.abs(ref - out).max())
    scale = float(np.abs(ref).max()) or 1.0
    return {"max_abs_error": max_abs, "rel_max_abs_error": max_abs / scale, "min_cosine": float(cos.min()),
            "mean_cosine": float(cos.mean())}


def verdict(figures: dict, precision: str) -> dict:
    """Add the threshold and pass/fail for a graph of the given precision."""
    if precision == "fp32":
        ok, rule = figures["rel_max_abs_error"] <= FP32_REL_MAX_ABS, f"rel_max_abs_error <= {FP32_REL_MAX_ABS}"
    elif precision == "fp16":
        ok, rule = figures["min_cosine"] >= FP16_MIN_COSINE, f"min_cosine >= {FP16_MIN_COSINE}"
    else:
        ok, rule = figures["min_cosine"] >= INT8_MIN_COSINE, f"min_cosine >= {INT8_MIN_COSINE}"
    measured = f"min cosine {figures['min_cosine']:.5f}, rel max abs error {figures['rel_max_abs_error']:.2e}"
    return {**figures, "threshold": rule, "measured": measured, "passed": bool(ok)}
