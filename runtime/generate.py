"""Token selection and streaming text: greedy or sampled (temperature, top-k, top-p, seed), stop on EOS ids and
stop strings, and text pieces that never split a UTF-8 character or show part of a stop string."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError("temperature >= 0, 0 < top_p <= 1 and top_k >= 0 are required")


def pick(logits: np.ndarray, s: Sampling, rng: np.random.Generator) -> int:
    if s.temperature == 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / s.temperature
    if s.top_k:
        kth = np.partition(z, -s.top_k)[-s.top_k]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max())
    p /= p.sum()
    if s.top_p < 1:
        order = np.argsort(-p)
        keep = np.cumsum(p[order]) - p[order] < s.top_p  # the smallest set whose mass reaches top_p
        mask = np.zeros_like(p, dtype=bool)
        mask[order[keep]] = True
        p = np.where(mask, p, 0)
        p /= p.sum()
    return int(rng.choice(len(p), p=p))


class TextStream:
    """Turns generated token ids into text pieces. Holds back a piece while it ends in an incomplete UTF-8
    sequence (decoded as U+FFFD) or could be the start of a stop string."""

    def __init__(self, tokenizer, stop_strings=()):
        self.tok, self.stops = tokenizer, [s for s in stop_strings if s]
        self.ids: list[int] = []
        self.sent = 0  # characters already emitted
        self.stopped = False

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        for stop in self.stops:
            at = text.find(stop)
            if at >= 0:
                self.stopped = True
                return self._emit(text[:at])
        if text.endswith("\ufffd"):
            return ""
        hold = max((k for stop in self.stops for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)
        return self._emit(text[:len(text) - hold])

    def finish(self) -> str:
        if self.stopped:
            return ""
        return self._emit(self.tok.decode(self.ids, skip_special_tokens=True))

    def _emit(self, upto: str) -> str:
        piece = upto[self.sent:]
        self.sent = max(self.sent, len(upto))
        return piece
