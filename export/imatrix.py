"""4-bit blocks searched against an importance matrix: the mean square of each MatMul's inputs on calibration
samples (as llama.cpp's imatrix; streamed.Calibration takes it), so that each block's rounding error is weighted by
how much its inputs matter. On ONNX Runtime's MatMulNBits, two formats (decoder_graph.py writes them):

- symmetric (the `imatrix` scheme, the default): w = d * (q - 8), as llama.cpp's Q4_0, for every MatMul including
  lm_head. The same bytes and kernel as plain RTN; only the choice of each block's scale differs.
- affine (the `accurate` scheme): a scale and a float offset per block, as llama.cpp's Q4_1; lm_head 8-bit.
  MatMulNBits is fast on CPU only with integer zero points: float ones fall back to a dequantizing kernel, 30x
  slower per decode step here. So a block is stored as w = d * (q - 8) + c and its offset c goes in a correction
      x @ W = MatMulNBits(x; q, d) + (x @ S) @ C
  where S [K, blocks] sums x over each block (0/1) and C [blocks, N] holds the offsets: 4 bytes per block, a fifth
  more than the codes and scales alone. Symmetric blocks waste a level and pin zero to the middle; a block that
  llama.cpp stored as Q4_1 (the real SmolLM2 ships so) is reproduced exactly, where any symmetric format rounds it
  a second time.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

SHRINK = (0.0, 0.02, 0.05, 0.1)  # affine: fractions of a block's range tried off each end (clipping outliers)
ISCALE = np.linspace(0.8, 1.2, 17)  # symmetric: multiples of the absmax rounding scale tried per block
ROWS = 128  # rows quantized at a time: temporaries stay in cache (several times faster than 1,024)


def by_rows(fn):
    """`fn(w [N, K], ...)` applied to ROWS rows at a time, its outputs stacked: same result, bounded memory."""
    @functools.wraps(fn)
    def wrapped(w, *args, **kw):
        parts = [fn(w[i:i + ROWS], *args, **kw) for i in range(0, len(w), ROWS)]
        return tuple(np.concatenate(p) for p in zip(*parts))
    return wrapped


def _blocks(w: np.ndarray, block: int, pad=0.0) -> np.ndarray:
    """w [N, K] -> [N, blocks, block], the last block padded with `pad`."""
    n, k = w.shape
    blocks = -(-k // block)
    return np.pad(w.astype(np.float32), ((0, 0), (0, blocks * block - k)), constant_values=pad).reshape(n, blocks,
                                                                                                         block)


def _importance_blocks(imp: np.ndarray | None, k: int, block: int) -> np.ndarray:
    """Per-channel importance [K] -> [1, blocks, block]; padding weighs 0."""
    imp = np.ones(k, np.float32) if imp is None else imp.astype(np.float32)
    # A floor keeps channels that were silent in calibration from being rounded anyhow.
    imp = imp + 1e-3 * imp.mean() + np.finfo(np.float32).tiny
    return _blocks(imp[None], block)


@by_rows
def affine_blocks(w: np.ndarray, imp: np.ndarray | None, block: int):
    """w [N, K] -> codes q [N, blocks, block] in 0..15, scales d and offsets c [N, blocks] with
    w ~= d * (q - 8) + c, minimising sum(imp * error^2) in each block over the SHRINK grid, then refining d and the
    minimum by weighted least squares on the chosen codes."""
    wb, ib = _blocks(w, block, pad=np.nan), _importance_blocks(imp, w.shape[1], block)
    mn, mx = np.nanmin(wb, -1, keepdims=True), np.nanmax(wb, -1, keepdims=True)
    wb = np.where(np.isnan(wb), mn, wb)
    span = mx - mn

    def fit(lo, d):
        d = np.maximum(d, 1e-30)
        q = np.clip(np.rint((wb - lo) / d), 0, 15)
        return q, (ib * (wb - lo - d * q) ** 2).sum(-1, keepdims=True)

    best_lo, best_d = mn, span / 15
    best_q, best_err = fit(best_lo, best_d)
    for a in SHRINK:
        for b in SHRINK:
            if a == b == 0:
                continue
            lo, d = mn + a * span, span * (1 - a - b) / 15
            q, err = fit(lo, d)
            better = err < best_err
            best_lo, best_d = np.where(better, lo, best_lo), np.where(better, d, best_d)
            best_q, best_err = np.where(better, q, best_q), np.minimum(err, best_err)
    # Weighted least squares for (lo, d) given the codes.
    def wsum(x):
        return (ib * x).sum(-1, keepdims=True)

    sw, sq, sqq, sx, sqx = wsum(1), wsum(best_q), wsum(best_q ** 2), wsum(wb), wsum(best_q * wb)
    det = sw * sqq - sq * sq
    ok = det > 1e-12 * sw * sqq
    safe = np.where(ok, det, 1)
    d2, lo2 = (sw * sqx - sq * sx) / safe, (sqq * sx - sq * sqx) / safe
    err2 = wsum((wb - lo2 - d2 * best_q) ** 2)
    take = ok & (d2 > 0) & (err2 < best_err)
    lo, d = np.where(take, lo2, best_lo), np.where(take, d2, best_d)
    return best_q.astype(np.uint8), d[..., 0], (lo + 8 * d)[..., 0]


@by_rows
def symmetric4_blocks(w: np.ndarray, imp: np.ndarray | None, block: int, search: bool = True):
    """w [N, K] -> codes q [N, blocks, block] in 0..15 and scales d [N, blocks] with w ~= d * (q - 8), as
    llama.cpp's Q4_0 with an importance matrix: one rounding per ISCALE step, each with its weighted
    least-squares scale, and the one with the least importance-weighted error kept. Without `search`, one rounding at
    the absmax scale (round to nearest) with its least-squares scale. In torch (on all cores): a 7B model's 6.6
    billion weights take about 3 minutes here, against 28 in numpy."""
    wb = torch.from_numpy(_blocks(w, block))
    ib = torch.from_numpy(_importance_blocks(imp, w.shape[1], block))
    # The value of largest magnitude, signed: it maps to -8, the level without a positive twin.
    peak = torch.gather(wb, -1, wb.abs().argmax(-1, keepdim=True))
    step = -8 / torch.where(peak == 0, torch.ones_like(peak), peak)
    weighted = ib * wb
    steps = ISCALE if search else (1.0,)
    gains, scales = [], []
    for m in steps:
        q = (wb * (step * float(m))).round_().clamp_(-8, 7)
        sxq = torch.linalg.vecdot(weighted, q)
        sqq = torch.linalg.vecdot(ib * q, q).clamp_min_(1e-30)
        gains.append(sxq * sxq / sqq)  # the weighted error is sum(imp * w^2) - gain
        scales.append(sxq / sqq)
    best = torch.stack(gains).argmax(0)  # per block, the first step of greatest gain; its rounding redone once
    q = (wb * (step * torch.tensor(np.asarray(steps, np.float32))[best][..., None])).round_().clamp_(-8, 7)
    return (q + 8).to(torch.uint8).numpy(), torch.stack(scales).gather(0, best[None])[0].numpy()


@by_rows
def symmetric8_blocks(w: np.ndarray, block: int):
    """w [N, K] -> uint8 codes [N, blocks, block] (zero point 128) and scales [N, blocks]: absmax / 127, which
    reproduces llama.cpp's Q8_0 exactly."""
    wb = _blocks(w, block)
    scale = np.abs(wb).max(-1) / 127
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(wb / scale[..., None]), -127, 127) + 128
    return q.astype(np.uint8), scale


def quantize_rows(table: np.ndarray, limit: int = 127) -> tuple[np.ndarray, np.ndarray]:
    """int8 codes in [-limit, limit] with a symmetric per-row scale: the embedding table (the runtime's `Embeddings`
    reads it back) and the int8 prefill twin's weights, per output channel (`decoder_graph.TWIN_LIMIT`)."""
    scale = np.abs(table).max(axis=1) / float(limit)
    scale[scale == 0] = 1.0
    q = np.clip(np.round(table / scale[:, None]), -limit, limit).astype(np.int8)
    return q, scale.astype(np.float32)
