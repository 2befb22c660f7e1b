"""How many tokens a video becomes, and what one token of context costs: the arithmetic the planner, the runtime
and the export share, known from the manifest before any frame is encoded or question asked. The pooling itself
is stated once, in `sfedge.export.aggregator` (SlowFast) and `sfedge.export.prompt_pooling` (PPLLaVA), and runs as
the bundle's graphs."""
from __future__ import annotations

import numpy as np

KV_WIDTH = {"float32": 4, "float16": 2, "int8": 1}


def slow_indices(t: int, s: int) -> np.ndarray:
    """The slow pathway's frames among T: int(linspace(0, T, S + 1))[:-1] (repeats frames when T < S)."""
    return np.linspace(0, t, s + 1).astype(np.int64)[:-1]


def visual_token_count(t: int, agg: dict, grid) -> int:
    """Tokens the SlowFast aggregator gives for T frames."""
    gh, gw = grid
    per_slow = (gh * gw) // 2 if agg["slow_pool"].endswith("1d") else (gh // 2) * (gw // 2)
    fh, fw = agg["fast_grid"]
    return agg["slow_frames"] * per_slow + t * fh * fw


def prompt_pooled_count(t: int, grid, kernel) -> int:
    """Tokens of PPLLaVA's prompt-guided pooling for T frames: 3-D windows, kernel = stride, partial windows at the
    edges. Depends only on T, the grid and the kernel, not the question."""
    kt, kh, kw = kernel
    return -(-t // kt) * -(-grid[0] // kh) * -(-grid[1] // kw)


def visual_tokens(manifest: dict, frames: int, pooling: str = "slowfast") -> int:
    """Visual tokens for T frames of this bundle under either pooling."""
    if pooling == "prompt-guided":
        return prompt_pooled_count(frames, manifest["vision"]["patch_grid"], manifest["prompt_pooling"]["kernel"])
    return visual_token_count(frames, manifest["aggregator"], manifest["vision"]["patch_grid"])


def kv_bytes_per_token(llm: dict, resident: bool = False) -> int:
    """Key + value for every layer (the manifest's "llm" section): what one more token of context adds to a decode
    step's reads or, `resident`, to memory (an int8 cache with its fp32 prefill twin holds both; an fp32 one
    shares its buffers with the twin)."""
    elements = 2 * llm["num_layers"] * llm["num_kv_heads"] * llm["head_dim"]
    twin = KV_WIDTH["float32"] if resident and "prefill_graph" in llm and llm["kv_dtype"] == "int8" else 0
    return elements * (KV_WIDTH[llm["kv_dtype"]] + twin)
