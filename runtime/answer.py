"""What the runtime hands back: a video's visual tokens (encode once, ask many), an answer, and an answer being
streamed."""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Callable, Generator

import numpy as np


@dataclass
class VisualTokens:
    """A video's visual tokens: cache and reuse them across questions. In question-aware modes `tokens` is None
    and `encoded` holds the encoded frames each question picks its tokens from."""
    tokens: np.ndarray | None  # [N, D] float32
    frame_indices: list  # source frames (or stream times) whose tokens reach the model
    total_frames: int
    decode_method: str  # "seek", "scan", "image" or "stream"
    timings: dict  # seconds: decode, encode, aggregate
    notes: list = field(default_factory=list)
    key: str = field(default_factory=lambda: uuid.uuid4().hex)  # identifies the KV prefix these tokens fill
    selected_frames: list = field(default_factory=list)  # the slow pathway's frames, or the frames pooled
    fast_frames: list = field(default_factory=list)  # the fast pathway's frames (SlowFast), source numbering
    encoded: object = None  # question_aware.EncodedFrames

    @property
    def count(self) -> int:
        return len(self.tokens) if self.tokens is not None else self.encoded.token_count


@dataclass
class Answer:
    text: str
    question: str
    visual_tokens: int
    frames_used: list
    selected_frames: list  # slow-pathway frames (SlowFast) or pooled frames (prompt-guided), source numbering
    fast_frames: list  # fast-pathway frames (SlowFast; empty under prompt-guided pooling), source numbering
    prompt_tokens: int
    generated_tokens: int
    reused_prefix: bool
    timings: dict  # seconds per stage: decode, encode, aggregate, (question,) prefill, generate
    peak_memory_bytes: int
    decode_method: str
    notes: list
    # With options: each option's log-probability as the answer (over the whole vocabulary): its letter's as the
    # first token, or its text's summed over its tokens (prompt.CHOICES). sf-eval compares these with the reference's.
    option_logprobs: list | None = None

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class AnswerStream:
    """Iterates over text pieces as they are generated; `.answer` holds the full Answer once exhausted.
    `pieces` returns the generation's statistics, which `finish(text, statistics)` turns into the Answer."""

    def __init__(self, pieces: Generator, finish: Callable):
        self._pieces, self._finish, self.answer = pieces, finish, None

    def __iter__(self):
        text = []
        while True:
            try:
                piece = next(self._pieces)
            except StopIteration as done:
                self.answer = self._finish("".join(text), done.value)
                return
            text.append(piece)
            yield piece
