"""GPTQ (Frantar et al., 2022, "Accurate Post-Training Quantization for Generative Pre-trained Transformers"): 4-bit
blocks in the symmetric format of the `imatrix` scheme (llama.cpp's Q4_0, the same bytes and kernel), but each
weight's rounding error is compensated on the weights not yet rounded, through the inverse of the calibration
inputs' second moment H = E[x x^T]: the layer's output error on those inputs is minimised, not each weight's own.

Each block's scale is fixed first, by the importance search of imatrix.py on the original weights; then the columns
are rounded loudest input channel first (the paper's "act order": the weights that matter most are rounded while
the most others can still absorb their error), 128 at a time (its lazy batch update), in runs of 32 within. On SmolLM2 act order with
these static scales beat rounding in place with each block's scale searched as its turn came: next-token KL on
prose 0.154 against 0.183 (bench/schemes.py). Rows are independent and go ROWS at a time, so a 152k-row lm_head
needs only a slice of scratch.

Each layer is calibrated on the fp32 model's activations. The paper's sequential order (on the inputs the rounded
layers before it give) was measured and not kept: no better here (the demo's chat-prompt KL 0.196 against 0.175,
SmolLM2's prose 0.161 against 0.154), for one more calibration pass a layer.

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
WIDTH, INNER = 128, 32  # columns per lazy batch update, and per rank-1 run within one
ROWS = 8192


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
    order = torch.from_numpy(np.argsort(-np.diag(h), kind="stable"))
    hinv = inverse_factor(torch.from_numpy(h).float()[order][:, order])
    codes = torch.full((blocks * block, n), 8, dtype=torch.uint8)  # a ragged last block's padding: code 8 is 0
    for r in range(0, n, ROWS):
        columns = torch.from_numpy(w[r:r + ROWS]).float().T[order].contiguous()  # [K, rows]: a column a row
        codes[order, r:r + ROWS] = _round(columns, torch.from_numpy(scales[r:r + ROWS]).T.contiguous(),
                                          order // block, hinv)
    return codes.T.numpy().reshape(n, blocks, block), scales


def _round(w: torch.Tensor, scales: torch.Tensor, block_of: torch.Tensor, hinv: torch.Tensor) -> torch.Tensor:
    """Codes of wT [K, rows] (the weights' columns as rows, in the order of hinv), column c at its block's scales
    `scales[block_of[c]]`, each one's error spread over the later ones: one at a time within INNER columns, by
    matrix products beyond (within the WIDTH columns of a lazy batch, then over the rest), so most of the
    arithmetic is GEMMs."""
    k = w.shape[0]
    safe = torch.where(scales == 0, torch.ones_like(scales), scales)
    codes = torch.empty(w.shape, dtype=torch.uint8)
    for c0 in range(0, k, WIDTH):
        c1 = min(c0 + WIDTH, k)
        part, errors, hpart = w[c0:c1].clone(), torch.empty(c1 - c0, w.shape[1]), hinv[c0:c1, c0:c1]
        for b0 in range(0, c1 - c0, INNER):
            b1 = min(b0 + INNER, c1 - c0)
            for j in range(b0, b1):
                b = int(block_of[c0 + j])
                q = (part[j] / safe[b]).round_().clamp_(-8, 7)
                codes[c0 + j] = (q + 8).to(torch.uint8)
                errors[j] = (part[j] - q * scales[b]) / hpart[j, j]
                part[j + 1:b1].addr_(hpart[j, j + 1:b1], errors[j], alpha=-1)
            part[b1:].sub_(hpart[b0:b1, b1:].T @ errors[b0:b1])
        w[c1:].sub_(hinv[c0:c1, c1:].T @ errors)
    return codes
