"""The SlowFast aggregator (PyTorch module and its ONNX graph) against an independent numpy statement of
SlowFast-LLaVA's rules (the slow and fast pathways the README describes), written here loop by loop."""
import math

import numpy as np
import pytest
import torch

from sfedge.export.aggregator import SlowFastAggregator, reference_tokens
from sfedge.export.graphs import export_aggregator, run_graph
from sfedge.runtime.tokens import slow_indices, visual_token_count


def plain_slowfast(feats, s, grid, skip, pool, fast):
    """feats [T, P, D] -> tokens, by hand: no torch pooling at all."""
    t, _, d = feats.shape
    gh, gw = grid
    x = feats[:, skip:, :]
    out = []
    for i in [int(v) for v in np.linspace(0, t, s + 1)[:-1]]:
        f = x[i]
        if pool.endswith("1d"):
            pairs = f[: (len(f) // 2) * 2].reshape(-1, 2, d)
            out.append(pairs.max(1) if pool == "max1d" else pairs.mean(1))
        else:
            g = f.reshape(gh, gw, d)[: gh // 2 * 2, : gw // 2 * 2].reshape(gh // 2, 2, gw // 2, 2, d)
            r = g.max((1, 3)) if pool == "max2d" else g.mean((1, 3))
            out.append(r.reshape(-1, d))
    fh, fw = fast
    for i in range(t):
        g = x[i].reshape(gh, gw, d)
        for a in range(fh):
            for b in range(fw):
                h0, h1 = (a * gh) // fh, math.ceil((a + 1) * gh / fh)
                w0, w1 = (b * gw) // fw, math.ceil((b + 1) * gw / fw)
                out.append(g[h0:h1, w0:w1].mean((0, 1))[None])
    return np.concatenate(out)


CASES = [  # T, S, grid, skip (CLS kept), slow pool, fast grid
    (50, 10, (24, 24), 0, "max1d", (4, 4)),
    (7, 10, (27, 27), 0, "max1d", (4, 4)),  # SigLIP-384: non-divisible grid; T < S repeats slow frames
    (9, 4, (5, 6), 1, "avg2d", (3, 4)),
    (3, 2, (7, 7), 0, "max2d", (3, 3)),
    (1, 10, (6, 6), 0, "avg1d", (4, 4)),
    (13, 5, (9, 9), 1, "max1d", (2, 2)),
]


@pytest.mark.parametrize("t,s,grid,skip,pool,fast", CASES)
def test_module_matches_plain_rules(t, s, grid, skip, pool, fast):
    feats = np.random.default_rng(t).standard_normal((t, grid[0] * grid[1] + skip, 8)).astype(np.float32)
    want = plain_slowfast(feats.astype(np.float64), s, grid, skip, pool, fast)
    module = SlowFastAggregator(grid, skip, pool, fast)
    got = module(torch.from_numpy(feats), torch.from_numpy(slow_indices(t, s)), torch.arange(t)).numpy()
    assert got.shape == want.shape == (visual_token_count(t, dict(slow_frames=s, slow_pool=pool,
                                                                  fast_grid=fast), grid), 8)
    np.testing.assert_allclose(got, want, atol=1e-5)
    ref = reference_tokens(torch.from_numpy(feats), s, grid, skip, pool, fast).numpy()
    np.testing.assert_allclose(ref, want, atol=1e-5)


def test_onnx_graph_matches_plain_rules_for_any_frame_count(tmp_path):
    grid, skip, pool, fast = (27, 27), 0, "max1d", (4, 4)
    vision = {"patch_grid": list(grid), "has_cls_token": False, "tokens_per_frame": 729, "hidden_size": 16}
    path = export_aggregator(vision, {"slow_pool": pool, "fast_grid": list(fast)}, tmp_path / "agg.onnx")
    for t in (1, 4, 10, 50):
        feats = np.random.default_rng(t).standard_normal((t, 729, 16)).astype(np.float32)
        got = run_graph(path, {"features": feats, "slow_index": slow_indices(t, 10), "fast_index": np.arange(t)})
        np.testing.assert_allclose(got, plain_slowfast(feats, 10, grid, skip, pool, fast), atol=1e-5)


def test_default_layout_gives_3680_tokens():
    agg = {"slow_frames": 10, "slow_pool": "max1d", "fast_grid": [4, 4]}
    assert visual_token_count(50, agg, (24, 24)) == 10 * 288 + 50 * 16 == 3680
    np.testing.assert_array_equal(slow_indices(50, 10), np.arange(0, 50, 5))
