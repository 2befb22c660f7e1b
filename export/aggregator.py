"""SlowFast-LLaVA's token aggregation, stated once in PyTorch and traced to ONNX.

Input: projected per-frame features [T, P, D], the slow-pathway frame indices and the fast-pathway frame indices
(computed by the runtime, so dynamic T needs no index arithmetic in the graph: uniform sampling passes
`sfedge.runtime.tokens.slow_indices` and every frame; question-aware selection passes the frames it chose among
more candidates). Output: the visual tokens [N, D], slow pathway first, then fast, no separators.
  slow: the S chosen frames, each pooled over its row-major flattened tokens by a 1-D pool (kernel 2, stride 2),
        or over its grid by a 2-D pool (kernel 2, stride 2); max or average.
  fast: every fast-pathway frame, adaptive average pooling of the grid to fast_grid, with PyTorch's bins
        (start = floor(i*n/o), end = ceil((i+1)*n/o)), so a 27x27 grid pools as torch does.
"""
from __future__ import annotations

import math

import numpy as np

import torch
import torch.nn.functional as F

POOLS = ("max1d", "avg1d", "max2d", "avg2d")


def adaptive_matrix(n: int, out: int) -> torch.Tensor:
    """[out, n] averaging matrix with adaptive_avg_pool's bins: pooling becomes a matmul, which exports cleanly
    for any grid."""
    m = torch.zeros(out, n)
    for i in range(out):
        start, end = (i * n) // out, math.ceil((i + 1) * n / out)
        m[i, start:end] = 1.0 / (end - start)
    return m


class SlowFastAggregator(torch.nn.Module):
    def __init__(self, grid, skip_tokens: int, slow_pool: str = "max1d", fast_grid=(4, 4)):
        super().__init__()
        if slow_pool not in POOLS:
            raise ValueError(f"slow pool {slow_pool!r}: choose one of {', '.join(POOLS)}")
        self.grid, self.skip, self.slow_pool, self.fast_grid = tuple(grid), skip_tokens, slow_pool, tuple(fast_grid)
        self.register_buffer("pool_h", adaptive_matrix(grid[0], fast_grid[0]))
        self.register_buffer("pool_w", adaptive_matrix(grid[1], fast_grid[1]))

    def forward(self, features: torch.Tensor, slow_index: torch.Tensor, fast_index: torch.Tensor) -> torch.Tensor:
        gh, gw = self.grid
        x = features[:, self.skip:, :]  # drop a kept CLS token: pooling works on the patch grid
        d = x.shape[-1]
        slow = x.index_select(0, slow_index)
        pool = F.max_pool1d if self.slow_pool == "max1d" else F.avg_pool1d
        if self.slow_pool.endswith("1d"):
            slow = pool(slow.transpose(1, 2), 2, 2).transpose(1, 2).reshape(-1, d)
        else:
            pool = F.max_pool2d if self.slow_pool == "max2d" else F.avg_pool2d
            s = slow.reshape(-1, gh, gw, d).permute(0, 3, 1, 2)
            slow = pool(s, 2, 2).permute(0, 2, 3, 1).reshape(-1, d)
        grid = x.index_select(0, fast_index).reshape(-1, gh, gw, d)
        fast = torch.einsum("oh,thwd,pw->topd", self.pool_h, grid, self.pool_w).reshape(-1, d)
        return torch.cat([slow, fast], 0)


def reference_tokens(features: torch.Tensor, slow_frames: int, grid, skip_tokens: int, slow_pool: str,
                     fast_grid) -> torch.Tensor:
    """The same rules stated plainly with PyTorch's own pools, frame by frame: the fidelity reference."""
    t, d = features.shape[0], features.shape[-1]
    gh, gw = grid
    x = features[:, skip_tokens:, :]
    idx = [int(i) for i in np.linspace(0, t, slow_frames + 1)[:-1]]
    slow = []
    for i in idx:
        f = x[i]  # [L, D]
        if slow_pool.endswith("1d"):
            pool = F.max_pool1d if slow_pool == "max1d" else F.avg_pool1d
            slow.append(pool(f.T[None], kernel_size=2, stride=2)[0].T)
        else:
            pool = F.max_pool2d if slow_pool == "max2d" else F.avg_pool2d
            g = f.T.reshape(1, d, gh, gw)
            slow.append(pool(g, kernel_size=2, stride=2)[0].reshape(d, -1).T)
    fast = [F.adaptive_avg_pool2d(x[i].T.reshape(1, d, gh, gw), tuple(fast_grid))[0].reshape(d, -1).T
            for i in range(t)]
    return torch.cat(slow + fast, 0)
