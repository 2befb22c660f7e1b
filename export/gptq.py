"""GPTQ (Frantar et al., 2022, "Accurate Post-Training Quantization for Generative Pre-trained Transformers"): 4-bit
blocks in the symmetric format of the `imatrix` scheme (llama.cpp's Q4_0, the same bytes and kernel), but each
weight's rounding error is compensated on the weights not yet rounded, through the inverse of the calibration
inputs' second moment H = E[x x^T]: the layer's output error on those inputs is minimised, not each weight's own.

Each block's scale is fixed first, by the importance search of imatrix.py on the original weights; then the columns
are rounded loudest input channel first (the paper's "act order": the weights that matter most are rounded while
the most others can still absorb their error), 128 at a time (its lazy batch update). On SmolLM2 act order with
these static scales beat rounding in place with each block's scale searched as its turn came: next-token KL on
prose 0.154 against 0.183 (bench/schemes.py). Rows are independent and go ROWS at a time, so a 152k-row lm_head
needs only a slice of scratch.

Why by hand: the libraries that implement it (AutoGPTQ, GPTQModel, Intel Neural Compressor through ONNX Runtime's
MatMulNBits quantizer) take the whole model in memory or on a GPU; the export holds one decoder layer at a time.
"""
from __future__ import annotations

import numpy as np
import torch

from .imatrix import symmetric4_blocks

# Added to H's diagonal, as a fraction of its mean. The paper's 0.01 fits a few thousand calibration tokens and errs
# more off them than imatrix on SmolLM2's early down projections (K = 1,536); 0.1 errs less there, and 2.5x less
# than imatrix elsewhere.
DAMP = 0.1
WIDTH = 128  # columns per lazy batch update
ROWS = 4096


def inverse_factor(h: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factor of the damped H^-1; channels silent in calibration get 1 on H's diagonal. In
    float32, as the paper's code: the damping keeps H well conditioned, and float64 takes 5x as long (about 4
    minutes for a 7B down projection's K = 11,008 here)."""
    h = h.clone()
    diag = h.diagonal()
    diag[diag == 0] = 1.0
    diag += DAMP * diag.mean()
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


def symmetric4(w: np.ndarray, h: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """w [N, K], H [K, K] -> codes [N, blocks, block] in 0..15 and scales [N, blocks] with w ~= d * (q - 8), as
    `imatrix.symmetric4_blocks` returns them."""
    n, k = w.shape
    blocks = -(-k // block)
    _, scales = symmetric4_blocks(w, np.diag(h), block)
    order = np.argsort(-np.diag(h), kind="stable")
    hinv = inverse_factor(torch.from_numpy(h).float()[order][:, order])
    codes = np.full((n, blocks * block), 8, np.uint8)  # a ragged last block's padding: code 8 is 0
    for r in range(0, n, ROWS):
        part = torch.from_numpy(np.ascontiguousarray(w[r:r + ROWS][:, order], np.float32))
        steps = torch.from_numpy(np.ascontiguousarray(scales[r:r + ROWS][:, order // block]))
        codes[r:r + ROWS, order] = _round(part, steps, hinv)
    return codes.reshape(n, blocks, block), scales


def _round(w: torch.Tensor, steps: torch.Tensor, hinv: torch.Tensor) -> np.ndarray:
    """Codes of w [rows, K] at each column's scale `steps` [rows, K], columns in order, each one's error spread
    over the later ones."""
    k = w.shape[1]
    safe = torch.where(steps == 0, torch.ones_like(steps), steps)
    codes = torch.empty(w.shape, dtype=torch.uint8)
    for c0 in range(0, k, WIDTH):
        c1 = min(c0 + WIDTH, k)
        part, errors, hpart = w[:, c0:c1].clone(), torch.empty(len(w), c1 - c0), hinv[c0:c1, c0:c1]
        for j in range(c1 - c0):
            q = (part[:, j] / safe[:, c0 + j]).round_().clamp_(-8, 7)
            codes[:, c0 + j] = (q + 8).to(torch.uint8)
            errors[:, j] = (part[:, j] - q * steps[:, c0 + j]) / hpart[j, j]
            part[:, j:].sub_(errors[:, j:j + 1] * hpart[j, j:])
        w[:, c1:].sub_(errors @ hinv[c0:c1, c1:])
    return codes.numpy()
