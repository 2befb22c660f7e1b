"""Question-aware frame selection (Hu et al., CVPR 2025, "M-LLM Based Video Frame Selection"): score n candidate
frames against the question, then pick k with greedy non-maximum suppression so the picks spread over the video.

The scorer is an interface: `ClipScorer` is the paper's training-free baseline (CLIP image-text similarity); a
trained selector plugs in by implementing `FrameScorer.score`.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np


class FrameScorer(Protocol):
    def score(self, candidates: np.ndarray, question: str) -> np.ndarray:
        """candidates: the n candidate frames' CLIP-space embeddings [n, C], in temporal order -> scores [n]
        (higher = more useful for answering the question)."""


class ClipScorer:
    """logit_scale * cosine(frame embedding, question embedding), from the bundle's CLIP text tower."""

    def __init__(self, text_tower):
        self.text = text_tower  # sfedge.runtime.clip_text.ClipText

    def score(self, candidates: np.ndarray, question: str) -> np.ndarray:
        q = self.text.embed(question)
        c = candidates / np.maximum(np.linalg.norm(candidates, axis=-1, keepdims=True), 1e-12)
        return self.text.logit_scale * (c @ (q / max(np.linalg.norm(q), 1e-12)))


def nms_select(scores: np.ndarray, k: int, radius: float | None = None) -> np.ndarray:
    """k distinct candidate positions, in temporal order: repeatedly take the best-scoring frame still allowed and
    suppress every frame within `radius` positions of it (the paper's n/(4k) by default); if suppression leaves
    fewer than k, fill with the best-scoring frames not yet taken. Ties go to the earlier frame. (With n/(4k) the
    greedy pass always finds k: k-1 picks suppress at most n/2 + k - 1 < n frames; a wider radius may need the fill.)"""
    scores = np.asarray(scores, dtype=np.float64)
    n = len(scores)
    if not 1 <= k <= n:
        raise ValueError(f"cannot select {k} of {n} frames")
    radius = n / (4 * k) if radius is None else radius
    order = np.argsort(-scores, kind="stable")
    allowed = np.ones(n, dtype=bool)
    picked = []
    for i in order:
        if len(picked) == k:
            break
        if allowed[i]:
            picked.append(int(i))
            allowed[np.abs(np.arange(n) - i) <= radius] = False
    if len(picked) < k:
        taken = set(picked)
        picked += [int(i) for i in order if int(i) not in taken][:k - len(picked)]
    return np.sort(np.array(picked, dtype=np.int64))
