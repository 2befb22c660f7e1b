"""Visual tokens that depend on the question: CLIP frame selection (M-LLM, Hu et al.) and PPLLaVA's prompt-guided
pooling, on a bundle exported with `sf-export --clip`.

A video is encoded once per video: n frames (the candidates for frame selection, else the T uniform frames) through
the vision graph, which also gives each frame's CLIP-space embedding and per-patch embeddings. Each question then
picks its tokens:
  selection "clip":  the question's CLIP text embedding scores the candidates (`selection.ClipScorer`, or any
                     `FrameScorer`); greedy NMS keeps k of them, in temporal order. With SlowFast pooling k = S and
                     they feed the slow pathway; the fast pathway stays uniform over the video: its T frames are the
                     candidates nearest the uniform sample positions, so no frame is encoded twice. With
                     prompt-guided pooling k = T and the kept frames are the ones pooled.
  pooling "prompt-guided": the bundle's prompt_pooling graph weights each token by its relevance to the question.
Tokens are cached per (video, question); two questions that select the same frames under SlowFast pooling get the
same tokens, so the language model's KV prefix is reused.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .clip_text import ClipText
from .errors import BadBundle, BadInput
from .selection import ClipScorer, FrameScorer, nms_select
from .sessions import Graph
from .tokens import slow_indices, visual_tokens
from .video import sample_indices

SELECTIONS = ("uniform", "clip")
POOLINGS = ("slowfast", "prompt-guided")
CACHE_QUESTIONS = 8


@dataclass
class EncodedFrames:
    """A video's encoded frames, kept so each question can choose its tokens."""
    features: np.ndarray  # [n, P, D] projected features
    clip_frame: np.ndarray  # [n, C]
    clip_patches: np.ndarray  # [n, G, C]
    frames: int  # T: the fast pathway's frames, or the frames pooled
    token_count: int  # known before any question


def check_modes(root: Path, manifest: dict, selection: str, pooling: str, candidates: int = 128) -> None:
    if selection not in SELECTIONS:
        raise BadInput(f"frame selection {selection!r}: choose one of {', '.join(SELECTIONS)}")
    if pooling not in POOLINGS:
        raise BadInput(f"pooling {pooling!r}: choose one of {', '.join(POOLINGS)}")
    if (selection, pooling) != ("uniform", "slowfast") and "clip" not in manifest:
        raise BadBundle(f"{root}: this bundle has no CLIP text side, so it cannot do {selection} frame selection "
                        f"with {pooling} pooling; export it with sf-export --clip CLIP_DIR")
    if pooling == "prompt-guided" and "prompt_pooling" not in manifest:
        raise BadBundle(f"{root}: this bundle has no prompt_pooling graph; export it with sf-export --clip CLIP_DIR")
    if selection == "clip" and candidates < 1:
        raise BadInput(f"{candidates} candidates: frame selection needs at least one")


class QuestionAware:
    def __init__(self, root: Path, manifest: dict, plan, providers, threads: int | None, selection: str,
                 pooling: str, temperature: float | None = None, scorer: FrameScorer | None = None):
        self.manifest, self.plan, self.selection, self.pooling = manifest, plan, selection, pooling
        self.text = ClipText(root, manifest["clip"], providers, threads)
        self.scorer = scorer or ClipScorer(self.text)
        self.pooler = self.temperature = None
        if pooling == "prompt-guided":
            spec = manifest["prompt_pooling"]
            self.temperature = np.array(spec["temperature"] if temperature is None else temperature, np.float32)
            if self.temperature <= 0:
                raise BadInput("the pooling temperature must be positive")
            self.pooler = Graph(root / spec["graph"], providers, threads)
        self._cache: OrderedDict = OrderedDict()

    def decode_count(self, frames: int) -> int:
        return self.plan.candidates if self.selection == "clip" else frames

    def encoded(self, outputs: list, frames: int) -> EncodedFrames:
        features, clip_frame, clip_patches = outputs
        t = min(frames, len(features))  # a video shorter than T gives all its frames
        return EncodedFrames(features, clip_frame, clip_patches, t, visual_tokens(self.manifest, t, self.pooling))

    def tokens(self, vt, question: str, aggregator: Graph):
        """(VisualTokens for this question, per-question timings)."""
        key = (vt.key, question)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key], {"question": 0.0, "aggregate": 0.0}
        enc: EncodedFrames = vt.encoded
        if enc is None:
            raise BadInput("these VisualTokens hold finished tokens, not encoded frames: encode the video with the "
                           "runtime that asks (its frame selection and pooling decide what is kept)")
        n, t = len(enc.features), enc.frames
        t0 = time.perf_counter()
        if self.selection == "clip":
            k = self.manifest["aggregator"]["slow_frames"] if self.pooling == "slowfast" else t
            picked = nms_select(self.scorer.score(enc.clip_frame, question), k) if k <= n else slow_indices(n, k)
        else:  # uniform frames under prompt-guided pooling (uniform SlowFast never comes here): pool them all
            picked = np.arange(n)
        text = self.text.embed(question) if self.pooling == "prompt-guided" else None
        t1 = time.perf_counter()
        if self.pooling == "prompt-guided":
            tokens = self.pooler.run({"features": enc.features[picked], "clip_patches": enc.clip_patches[picked],
                                      "text": text, "temperature": self.temperature})
            fast, token_key = picked, f"{vt.key}/{question}"
        else:
            fast = fast_positions(vt.frame_indices, vt.total_frames, t)
            tokens = aggregator.run({"features": enc.features, "slow_index": picked, "fast_index": fast})
            token_key = f"{vt.key}/{','.join(map(str, picked))}"  # same frames, same tokens: the KV prefix is reused
        t2 = time.perf_counter()
        src = np.asarray(vt.frame_indices)
        out = replace(vt, tokens=tokens, encoded=None, key=token_key, selected_frames=src[picked].tolist(),
                      fast_frames=[] if self.pooling == "prompt-guided" else src[fast].tolist(),
                      frame_indices=sorted(set(src[picked].tolist()) | set(src[fast].tolist())))
        self._cache[key] = out
        if len(self._cache) > CACHE_QUESTIONS:
            self._cache.popitem(last=False)
        return out, {"question": t1 - t0, "aggregate": t2 - t1}


def fast_positions(candidates, total_frames: int, t: int) -> np.ndarray:
    """For each of the T uniform sample positions over the video, the candidate frame nearest to it."""
    cand = np.asarray(candidates)
    want = sample_indices(total_frames, t)
    right = np.clip(np.searchsorted(cand, want), 1, len(cand) - 1) if len(cand) > 1 else np.zeros(len(want), int)
    left = np.maximum(right - 1, 0)
    nearer_left = np.abs(cand[left] - want) <= np.abs(cand[right] - want)
    return np.where(nearer_left, left, right).astype(np.int64)
