"""GPTQ (Frantar et al., 2022, "Accurate Post-Training Quantization for Generative Pre-trained Transformers"): 4-bit
blocks in the symmetric format of the `imatrix` scheme (llama.cpp's Q4_0, the same bytes and kernel), but each
weight's rounding error is compensated on the weights not yet rounded, through the inverse of the calibration
inputs' second moment H = E[x x^T]: the layer's output error on those inputs, not each weight's own, is minimised.

Columns are rounded in order, 128 at a time (the paper's lazy batch update); each block of 32 gets its scale when its
first column comes up, by the importance search of imatrix.py on the weights as the earlier errors left them. Rows
are independent and go ROWS at a time, so a 152k-row lm_head never needs more than a slice of scratch.

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


def inverse_factor(h: np.ndarray, k: int) -> torch.Tensor:
    """The upper Cholesky factor of H^-1 (damped; channels silent in calibration get 1 on the diagonal), padded to
    `k` columns with the identity."""
    h = torch.from_numpy(h).double()
    full = torch.eye(k, dtype=torch.float64)
    full[:len(h), :len(h)] = h
    diag = full.diagonal()
    diag[diag == 0] = 1.0
    diag += DAMP * diag.mean()
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(full)), upper=True).float()


def symmetric4(w: np.ndarray, h: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """w [N, K], H [K, K] -> codes [N, blocks, block] in 0..15 and scales [N, blocks] with w ~= d * (q - 8), as
    `imatrix.symmetric4_blocks` returns them."""
    n, k = w.shape
    blocks = -(-k // block)
    hinv = inverse_factor(h, blocks * block)
    importance = np.zeros(blocks * block, np.float32)
    importance[:k] = np.diag(h)
    codes, scales = np.empty((n, blocks * block), np.uint8), np.empty((n, blocks), np.float32)
    for r in range(0, n, ROWS):
        part = np.zeros((min(ROWS, n - r), blocks * block), np.float32)
        part[:, :k] = w[r:r + ROWS]
        codes[r:r + ROWS], scales[r:r + ROWS] = _rows(torch.from_numpy(part), hinv, importance, block)
    return codes.reshape(n, blocks, block), scales


def _rows(w: torch.Tensor, hinv: torch.Tensor, importance: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    k = w.shape[1]
    codes, scales = torch.empty(w.shape, dtype=torch.uint8), torch.empty(len(w), k // block)
    width = max(block, WIDTH // block * block)  # a lazy batch holds whole blocks
    for c0 in range(0, k, width):
        c1 = min(c0 + width, k)
        part, errors, hpart = w[:, c0:c1].clone(), torch.empty(len(w), c1 - c0), hinv[c0:c1, c0:c1]
        for j in range(c1 - c0):
            if j % block == 0:  # the block's scale, searched on its weights as compensated so far
                lo = c0 + j
                _, d = symmetric4_blocks(part[:, j:j + block].numpy(), importance[lo:lo + block], block)
                d = torch.from_numpy(d[:, 0])
                scales[:, lo // block] = d
                safe = torch.where(d == 0, torch.ones_like(d), d)
            q = (part[:, j] / safe).round_().clamp_(-8, 7)
            codes[:, c0 + j] = (q + 8).to(torch.uint8)
            errors[:, j] = (part[:, j] - q * d) / hpart[j, j]
            part[:, j:].sub_(errors[:, j:j + 1] * hpart[j, j:])
        w[:, c1:].sub_(errors @ hinv[c0:c1, c1:])
    return codes.numpy(), scales.numpy()
