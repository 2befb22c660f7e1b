"""Index and count rules of SlowFast-LLaVA's token layout that the runtime needs without running the graph.
The pooling itself is stated once, in `sfedge.export.aggregator`, and runs as the bundle's aggregator graph."""
from __future__ import annotations

import numpy as np


def slow_indices(t: int, s: int) -> np.ndarray:
    """The slow pathway's frames among T: int(linspace(0, T, S + 1))[:-1] (repeats frames when T < S)."""
    return np.linspace(0, t, s + 1).astype(np.int64)[:-1]


def visual_token_count(t: int, agg: dict, grid) -> int:
    """Tokens the aggregator gives for T frames: known before any frame is encoded or question asked."""
    gh, gw = grid
    per_slow = (gh * gw) // 2 if agg["slow_pool"].endswith("1d") else (gh // 2) * (gw // 2)
    fh, fw = agg["fast_grid"]
    return agg["slow_frames"] * per_slow + t * fh * fw


def prompt_pooled_count(t: int, grid, kernel) -> int:
    """Tokens of PPLLaVA's prompt-guided pooling (`sfedge.export.prompt_pooling`) for T frames: 3-D windows,
    kernel = stride, partial windows at the edges. Depends only on T, the grid and the kernel, not the question."""
    kt, kh, kw = kernel
    return -(-t // kt) * -(-grid[0] // kh) * -(-grid[1] // kw)
