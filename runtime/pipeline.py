"""The Python API: load a bundle once, encode a video once, ask many questions.

    rt = Runtime.load("bundle", memory_budget="6GB")
    video = rt.encode("clip.mp4")
    print(rt.ask(video, "What happens?").text)
    for piece in rt.ask(video, "And then?", stream=True): print(piece, end="")

A follow-up about the same video rewinds the language model's KV cache to the end of the visual prefix and
prefills only the new question.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from . import engines
from . import manifest as manifest_io
from . import prompt as prompts
from .clitools import parse_size
from .errors import BadInput
from .generate import Sampling
from .llm import LanguageModel
from .memory import peak_rss
from .planner import Plan, make_plan
from .question_aware import QuestionAware, check_modes
from .sessions import Graph, provider_name, providers, resolve
from .tokens import slow_indices
from .video import read_frames, resolve_source


@dataclass
class VisualTokens:
    """A video's visual tokens: cache and reuse them across questions. In question-aware modes `tokens` is None
    and `encoded` holds the encoded frames each question picks its tokens from."""
    tokens: np.ndarray | None  # [N, D] float32
    frame_indices: list
    total_frames: int
    source: str
    decode_method: str
    timings: dict
    notes: list = field(default_factory=list)
    key: str = field(default_factory=lambda: uuid.uuid4().hex)
    selected_frames: list = field(default_factory=list)  # the slow pathway's frames, or the frames pooled
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
    prompt_tokens: int
    generated_tokens: int
    reused_prefix: bool
    timings: dict  # seconds per stage: decode, encode, aggregate, prefill, generate
    peak_memory_bytes: int
    decode_method: str
    notes: list

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class AnswerStream:
    """Iterates over text pieces as they are generated; `.answer` holds the full Answer once exhausted."""

    def __init__(self, pieces: Iterator[str], finish):
        self._pieces, self._finish, self.answer, self._text = pieces, finish, None, []

    def __iter__(self):
        for piece in self._pieces:
            self._text.append(piece)
            yield piece
        self.answer = self._finish("".join(self._text))


class Runtime:
    def __init__(self, root: Path, manifest: dict, plan: Plan, device: str, threads: int | None,
                 decoder_factory=None, frame_selection: str = "uniform", pooling: str = "slowfast",
                 pooling_temperature: float | None = None, scorer=None):
        self.root, self.manifest, self.plan = root, manifest, plan
        self.device = resolve(device)
        # How each graph runs and why (an engine, or the ONNX graph and the reason): sf-run prints these.
        self.notes = [f"auto picked {self.device}"] if device == "auto" else []
        shapes = engines.profile_shapes(manifest, plan)
        cache = root / manifest_io.ORT_CACHE_DIR

        def prov(role: str, device: str = self.device) -> list:
            return providers(device, cache, shapes.get(role), plan.sessions.get(role))

        self.provider = provider_name(prov("vision")[0])
        self._device_info = engines.device_info() if self.device == "tensorrt" else None
        v = manifest["vision"]
        self.vision = self._graph("vision", root / v["graphs"][plan.vision_variant], prov("vision"), threads,
                                  plan.encode_chunk)
        self.aggregator = self._graph("aggregator", root / manifest["aggregator"]["graph"], prov("aggregator"),
                                      threads, max(plan.frames, plan.candidates))
        # The 4-bit decoder's MatMulNBits and GroupQueryAttention have CUDA kernels; TensorRT has neither.
        llm_device = "cuda" if self.device == "tensorrt" else self.device
        # The int8-KV twin swaps caches through host memory: CPU only.
        self.llm = LanguageModel(root, manifest, plan.context, prov("llm", llm_device), threads, decoder_factory,
                                 plan.prefill_twin and llm_device == "cpu")
        # The CLIP text tower and the prompt-guided pooling are small and shape-varied: ONNX Runtime, no engines.
        self.qa = (QuestionAware(root, manifest, plan, prov("clip", llm_device), threads, frame_selection, pooling,
                                 pooling_temperature, scorer)
                   if (frame_selection, pooling) != ("uniform", "slowfast") else None)
        self.size = tuple(v["image_size"])
        self._prefix = None  # (video key, KV length after the visual prefix)
        self._last_video = None  # (source identity, VisualTokens) for follow-ups given by path

    def _graph(self, role: str, onnx_path: Path, prov: list, threads: int | None, need_frames: int):
        """A matching TensorRT engine from the bundle when the device is tensorrt, else the ONNX graph."""
        if self.device == "tensorrt":
            entry, reason = engines.choose(self.manifest.get("engines", []), role, self._device_info, self.root,
                                           need_frames)
            self.notes.append(reason)
            if entry:
                return engines.EngineRunner(self.root / entry["file"])
        graph = Graph(onnx_path, prov, threads)
        if graph.provider != provider_name(prov[0]):
            self.notes.append(f"{role}: ONNX Runtime could not start {provider_name(prov[0])} and runs "
                              f"{onnx_path.name} on {graph.provider}")
        return graph

    @classmethod
    def load(cls, bundle, device: str = "cpu", memory_budget=None, frames: int | None = None,
             max_new_tokens: int = 256, vision_variant: str | None = None, threads: int | None = None,
             verify: bool = True, decoder_factory=None, frame_selection: str = "uniform",
             pooling: str = "slowfast", candidates: int = 128, pooling_temperature: float | None = None,
             scorer=None) -> "Runtime":
        """frame_selection "clip" scores `candidates` frames per question (or with `scorer`, a
        selection.FrameScorer); pooling "prompt-guided" is PPLLaVA's. Both need a bundle exported with --clip."""
        root = Path(bundle)
        m = manifest_io.load(root, verify_hashes=verify, hash_cache=manifest_io.HashCache())
        check_modes(root, m, frame_selection, pooling, candidates)
        budget = parse_size(memory_budget) if memory_budget is not None else None
        if vision_variant is None and resolve(device) != "cpu":
            # The bundle's int8 graph is quantized for the CPU kernels; TensorRT and CUDA run fp16/fp32 well.
            vision_variant = "fp16" if "fp16" in m["vision"]["graphs"] else "fp32"
        plan = make_plan(m, budget, frames, max_new_tokens, vision_variant, pooling=pooling,
                         candidates=candidates if frame_selection == "clip" else 0)
        return cls(root, m, plan, device, threads, decoder_factory, frame_selection, pooling, pooling_temperature,
                   scorer)

    @property
    def untrained_note(self) -> str | None:
        return self.manifest["source"].get("note")

    def encode(self, video, frames: int | None = None, progress=None) -> VisualTokens:
        frames = frames or self.plan.frames
        if frames > self.plan.frames:
            raise BadInput(f"{frames} frames exceed the {self.plan.frames} this runtime was planned for; "
                           f"load it with frames={frames}")
        t0 = time.perf_counter()
        got = read_frames(video, self.qa.decode_count(frames) if self.qa else frames, self.size)
        t1 = time.perf_counter()
        outs = self.encode_pixels(got.pixels, progress, all_outputs=self.qa is not None)
        t2 = time.perf_counter()
        notes = list(got.notes)
        if len(got.pixels) < frames:
            notes.append(f"the video has {got.total_frames} frames: used all of them instead of {frames}")
        indices = [int(i) for i in got.indices]
        vt = VisualTokens(None, indices, got.total_frames, str(resolve_source(video)), got.method,
                          {"decode": t1 - t0, "encode": t2 - t1}, notes)
        if self.qa:  # the tokens wait for the question
            vt.encoded = self.qa.encoded(outs, frames)
            return vt
        vt.tokens = self.aggregate(outs)
        vt.timings["aggregate"] = time.perf_counter() - t2
        vt.selected_frames = [indices[i] for i in slow_indices(len(outs), self.manifest["aggregator"]["slow_frames"])]
        return vt

    def encode_pixels(self, pixels: np.ndarray, progress=None, all_outputs: bool = False):
        """uint8 frames [F, H, W, 3] at the tower's size -> per-frame features [F, P, D], in planned chunks; with
        `all_outputs`, every output of the vision graph (a --clip bundle's adds clip_frame and clip_patches)."""
        chunk, outs = self.plan.encode_chunk, []
        for start in range(0, len(pixels), chunk):
            feeds = {"frames": pixels[start:start + chunk]}
            outs.append(self.vision.run_all(feeds) if all_outputs else [self.vision.run(feeds)])
            if progress:
                progress(f"encoded {min(start + chunk, len(pixels))}/{len(pixels)} frames")
        outs = [np.concatenate(o) for o in zip(*outs)]
        return outs if all_outputs else outs[0]

    def aggregate(self, feats: np.ndarray) -> np.ndarray:
        """Per-frame features [T, P, D] -> the SlowFast visual tokens [N, D], every frame in the fast pathway."""
        t, s = len(feats), self.manifest["aggregator"]["slow_frames"]
        feeds = {"features": feats, "slow_index": slow_indices(t, s), "fast_index": np.arange(t)}
        # Bundles exported before fast_index existed pool every frame they get, which is what arange(T) says.
        return self.aggregator.run({k: v for k, v in feeds.items() if k in self.aggregator.inputs})

    def _tokens_for(self, video) -> tuple[VisualTokens, bool]:
        """The video's tokens, and whether they were encoded just now (a repeated path reuses the last ones)."""
        if isinstance(video, VisualTokens):
            return video, False
        path = resolve_source(video)
        try:
            st = path.stat()
            ident = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        except OSError:
            ident = None
        if ident and self._last_video and self._last_video[0] == ident:
            return self._last_video[1], False
        vt = self.encode(video)
        self._last_video = (ident, vt) if ident else None
        return vt, True

    def watch(self, source, rules, sample_fps: float = 2.0, realtime: bool = False, max_outage: float = 600.0,
              max_new_tokens: int | None = None):
        """Standing questions over a camera, stream, file or (t, frame) iterable: an iterator of JSON-ready records
        (see `sfedge.runtime.watch`). `rules`: a YAML file, or a list of Rule objects or dicts (question, every,
        window, optional name and trigger)."""
        from .rules import load_rules, make_rule
        from .watch import Watcher

        if isinstance(rules, (str, Path)):
            rules = load_rules(rules)
        else:
            rules = [r if not isinstance(r, dict) else make_rule(r, i, "rules") for i, r in enumerate(rules)]
        return Watcher(self, source, rules, sample_fps, realtime, max_outage, max_new_tokens)

    def ask(self, video, question: str, max_new_tokens: int | None = None, temperature: float = 0.0,
            top_p: float = 1.0, top_k: int = 0, seed: int | None = None, style: str = "plain",
            options: list[str] | None = None, stream: bool = False, min_new_tokens: int = 0):
        """Answer a question about a video (a path, "demo", or VisualTokens from encode). Greedy by default."""
        max_new_tokens = self.plan.max_new_tokens if max_new_tokens is None else max_new_tokens
        if max_new_tokens < 1:
            raise BadInput("max_new_tokens must be at least 1")
        try:
            sampling = Sampling(temperature, top_k, top_p, seed)
        except ValueError as e:
            raise BadInput(str(e)) from None
        p = prompts.build(self.manifest["prompt"], question, style, options)
        vt, fresh = self._tokens_for(video)
        timings = {k: (v if fresh else 0.0) for k, v in vt.timings.items()}
        if self.qa:
            vt, per_question = self.qa.tokens(vt, question, self.aggregator)
            timings.update(per_question)
        q_ids = self.llm.encode(p.question)
        reused = self._prefix is not None and self._prefix[0] == vt.key
        t0 = time.perf_counter()
        if reused:
            self.llm.rewind(self._prefix[1])
        else:
            self.llm.rewind(0)
            pre = self.llm.embed(self.llm.encode(p.prefix, first=True))
            self._prefix = None
            self.llm.prefill(np.concatenate([pre, vt.tokens]), self.plan.prefill_chunk)
            self._prefix = (vt.key, self.llm.length)
        q_embeds = self.llm.embed(q_ids)
        if self.llm.length + len(q_ids) + 1 > self.plan.context:
            raise BadInput(f"the question is {len(q_ids)} tokens; with {vt.count} visual tokens it does not fit the "
                           f"planned context of {self.plan.context} tokens: shorten it or plan fewer frames")
        logits = self.llm.prefill(q_embeds, self.plan.prefill_chunk)
        timings["prefill"] = time.perf_counter() - t0
        prompt_tokens = self.llm.length
        stats = {}
        pieces = self.llm.generate(logits, max_new_tokens, sampling, stats, min_new_tokens)
        if p.answer_start:
            pieces = _prepend(p.answer_start, pieces)

        def finish(text: str) -> Answer:
            timings["generate"] = stats.get("generate_s", 0.0)
            return Answer(text, question, vt.count, vt.frame_indices, vt.selected_frames, prompt_tokens,
                          stats.get("generated_tokens", 0), reused, timings, peak_rss(), vt.decode_method,
                          vt.notes)

        s = AnswerStream(pieces, finish)
        if stream:
            return s
        for _ in s:
            pass
        return s.answer


def _prepend(first: str, pieces):
    yield first
    yield from pieces
