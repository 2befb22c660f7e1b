"""PPLLaVA's prompt-guided pooling, stated once in PyTorch and traced to ONNX (the bundle's second aggregator).

Inputs: projected per-frame features [T, P, D] (a kept CLS token is skipped), the same frames' per-patch CLIP-space
embeddings [T, G, C] (G = H*W, row-major), the question's CLIP text embedding [C] and the window temperature.
  relevance: softmax over all T*H*W tokens of (logit_scale * cosine(patch embedding, text embedding));
  pooling:   3-D windows over [T, H, W], kernel = stride, ceil mode (windows at the far edges are partial and hold
             only real tokens); inside a window the weights are softmax(relevance / temperature).
Output: tokens [T' * H' * W', D], row-major over (t, h, w), with T' = ceil(T / kt) and so on
(`sfedge.runtime.tokens.prompt_pooled_count`). Equal relevances give plain average pooling; temperature -> 0 picks
each window's most relevant token.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def relevance(clip_patches: torch.Tensor, text: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """[T, G, C], [C] -> [T, G]: softmax over every token of the video."""
    cos = F.normalize(clip_patches, dim=-1) @ F.normalize(text, dim=-1)
    return torch.softmax((logit_scale * cos).reshape(-1), 0).reshape(cos.shape)


class PromptGuidedPooling(torch.nn.Module):
    def __init__(self, grid, skip_tokens: int, logit_scale: float, kernel=(2, 3, 3)):
        super().__init__()
        self.grid, self.skip, self.kernel = tuple(grid), skip_tokens, tuple(kernel)
        self.logit_scale = float(logit_scale)

    def forward(self, features, clip_patches, text, temperature):
        gh, gw = self.grid
        kt, kh, kw = self.kernel
        x = features[:, self.skip:, :]
        t, d = x.shape[0], x.shape[-1]
        logits = relevance(clip_patches, text, self.logit_scale).reshape(t, gh, gw) / temperature
        # Pad every axis up to whole windows: padded tokens get weight exp(-inf) = 0, so edge windows are partial.
        tp = (t + kt - 1) // kt * kt
        hp, wp = math.ceil(gh / kh) * kh, math.ceil(gw / kw) * kw
        x = F.pad(x.reshape(t, gh, gw, d), (0, 0, 0, wp - gw, 0, hp - gh, 0, tp - t))
        logits = F.pad(logits, (0, wp - gw, 0, hp - gh, 0, tp - t), value=float("-inf"))
        nt, nh, nw = tp // kt, hp // kh, wp // kw
        w = logits.reshape(nt, kt, nh, kh, nw, kw).permute(0, 2, 4, 1, 3, 5).reshape(nt, nh, nw, kt * kh * kw)
        w = torch.softmax(w, -1)
        x = x.reshape(nt, kt, nh, kh, nw, kw, d).permute(0, 2, 4, 1, 3, 5, 6).reshape(nt, nh, nw, kt * kh * kw, d)
        return (w.unsqueeze(-1) * x).sum(-2).reshape(-1, d)


def reference_pooling(features, clip_patches, text, logit_scale: float, grid, skip_tokens: int, kernel,
                      temperature: float) -> torch.Tensor:
    """The same rules stated window by window: the fidelity reference for the graph."""
    gh, gw = grid
    kt, kh, kw = kernel
    x = features[:, skip_tokens:, :]
    t, d = x.shape[0], x.shape[-1]
    x = x.reshape(t, gh, gw, d)
    cos = torch.stack([torch.stack([F.cosine_similarity(p, text, dim=0) for p in frame]) for frame in clip_patches])
    rel = torch.softmax((logit_scale * cos).flatten(), 0).reshape(t, gh, gw)
    out = []
    for t0 in range(0, t, kt):
        for h0 in range(0, gh, kh):
            for w0 in range(0, gw, kw):
                r = rel[t0:t0 + kt, h0:h0 + kh, w0:w0 + kw].flatten()
                v = x[t0:t0 + kt, h0:h0 + kh, w0:w0 + kw].reshape(-1, d)
                out.append(torch.softmax(r / temperature, 0) @ v)
    return torch.stack(out)
