"""The Python API: load a bundle once, encode a video once, ask many questions.

    rt = Runtime.load("bundle", memory_budget="6GB")
    video = rt.encode("clip.mp4")
    print(rt.ask(video, "What happens?").text)
    for piece in rt.ask(video, "And then?", stream=True): print(piece, end="")

A follow-up about the same video rewinds the language model's KV cache to the end of the visual prefix and
prefills only the new question.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np

from . import engines
from . import manifest as manifest_io
from . import prompt as prompts
from .answer import Answer, AnswerStream, VisualTokens
from .errors import BadInput
from .llm import LanguageModel, generate, score_options, text_pieces
from .memory import peak_rss
from .planner import Plan, make_plan, replan
from .question_aware import QuestionAware, check_modes
from .rules import as_rules
from .sampling import Sampling
from .sessions import open_graph, providers, resolve
from .tokens import slow_indices
from .units import parse_size
from .video import read_frames, resolve_source
from .watch import Watcher


@dataclass(frozen=True)
class Settings:
    """How a bundle is run: everything `Runtime.load` takes besides the bundle."""
    device: str = "cpu"  # cpu, cuda, tensorrt or auto
    memory_budget: int | str | None = None  # bytes or "6GB": plan chunk sizes to fit, or refuse with the reason
    frames: int | None = None  # default: the bundle's
    max_new_tokens: int = 256
    vision_variant: str | None = None  # int8 on the CPU, fp16 (or fp32) on a GPU
    threads: int | None = None
    verify: bool = True  # check every artifact's sha256 (cached per file)
    decoder_factory: object = None  # another decoder with the Decoder interface (sfedge.export.nf4.NF4Decoder)
    frame_selection: str = "uniform"  # or "clip": score `candidates` frames per question (needs --clip at export)
    pooling: str = "slowfast"  # or "prompt-guided" (PPLLaVA; needs --clip at export)
    candidates: int = 128
    pooling_temperature: float | None = None  # default: the bundle's
    scorer: object = None  # a selection.FrameScorer in place of CLIP similarity

    @property
    def budget(self) -> int | None:
        return parse_size(self.memory_budget) if self.memory_budget is not None else None


def plan_for(manifest: dict, s: Settings) -> Plan:
    """The memory plan a runtime with these settings runs under (refused with the reason when it does not fit)."""
    variant, device = s.vision_variant, resolve(s.device)
    if variant is None and device != "cpu":
        # The bundle's int8 graph is quantized for the CPU kernels; TensorRT and CUDA run fp16/fp32 well.
        variant = "fp16" if "fp16" in manifest["vision"]["graphs"] else "fp32"
    return make_plan(manifest, s.budget, s.frames, s.max_new_tokens, variant, pooling=s.pooling,
                     candidates=s.candidates if s.frame_selection == "clip" else 0, device=device)


class Runtime:
    def __init__(self, root: Path, manifest: dict, plan: Plan, settings: Settings):
        self.root, self.manifest, self.plan, self.settings = root, manifest, plan, settings
        self.device = resolve(settings.device)
        # How each graph runs and why (an engine, or the ONNX graph and the reason): sf-run prints these.
        self.notes = [f"auto picked {self.device}"] if settings.device == "auto" else []
        v = manifest["vision"]
        self.vision = self._graph("vision", v["graphs"][plan.vision_variant], plan.encode_chunk)
        self.aggregator = self._graph("aggregator", manifest["aggregator"]["graph"],
                                      max(plan.frames, plan.candidates))
        self.provider = self.vision.provider
        # The 4-bit decoder's MatMulNBits and GroupQueryAttention have CUDA kernels; TensorRT has neither.
        llm_device = "cuda" if self.device == "tensorrt" else self.device
        # The int8-KV twin swaps caches through host memory: CPU only.
        self.llm = LanguageModel(root, manifest, plan.context, self._providers("llm", llm_device), settings.threads,
                                 settings.decoder_factory, plan.prefill_twin and llm_device == "cpu")
        if self.llm.prefill_note:
            self.notes.append(self.llm.prefill_note)
        # The CLIP text tower and the prompt-guided pooling are small and shape-varied: ONNX Runtime, no engines.
        self.qa = (QuestionAware(root, manifest, plan, self._providers("clip", llm_device), settings.threads,
                                 settings.frame_selection, settings.pooling, settings.pooling_temperature,
                                 settings.scorer)
                   if (settings.frame_selection, settings.pooling) != ("uniform", "slowfast") else None)
        self.size = tuple(v["image_size"])
        self._last_video = None  # (source identity, VisualTokens) for follow-ups given by path

    @classmethod
    def load(cls, bundle, settings: Settings | None = None, **changes) -> "Runtime":
        """`Runtime.load(bundle, memory_budget="2GB", frames=32, ...)`: any field of `Settings` by name."""
        unknown = set(changes) - {f.name for f in fields(Settings)}
        if unknown:
            raise BadInput(f"Runtime.load: unknown setting(s) {', '.join(sorted(unknown))}")
        s = replace(settings or Settings(), **changes)
        root = Path(bundle)
        m = manifest_io.load(root, verify_hashes=s.verify, hash_cache=manifest_io.HashCache())
        check_modes(root, m, s.frame_selection, s.pooling, s.candidates)
        return cls(root, m, plan_for(m, s), s)

    def _providers(self, role: str, device: str | None = None) -> list:
        shapes = engines.profile_shapes(self.manifest, self.plan).get(role)
        return providers(device or self.device, self.root / manifest_io.ORT_CACHE_DIR, shapes,
                         self.plan.sessions.get(role))

    def _graph(self, role: str, onnx_rel: str, need_frames: int):
        on_trt = self.device == "tensorrt"
        graph, notes = open_graph(role, self.root, onnx_rel, self._providers(role), self.settings.threads,
                                  self.manifest.get("engines", []) if on_trt else None, need_frames)
        self.notes += notes
        return graph

    def replanned(self, **changes) -> "Runtime":
        """This runtime, sharing its sessions and language model, under a plan with some settings changed (a
        watcher's ring buffer), checked against the same budget; `self` is left as it is."""
        other = copy.copy(self)
        other.plan = replan(self.manifest, self.plan, **changes)
        return other

    @property
    def source_note(self) -> str | None:
        return self.manifest["source"].get("note")

    def encode(self, video, frames: int | None = None, progress=None) -> VisualTokens:
        """Decode and encode a video (a path, or "demo") once; ask about it many times."""
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
        vt = VisualTokens(None, indices, got.total_frames, got.method, {"decode": t1 - t0, "encode": t2 - t1},
                          notes)
        if self.qa:  # the tokens wait for the question
            vt.encoded = self.qa.encoded(outs, frames)
            return vt
        vt.tokens = self.aggregate(outs)
        vt.timings["aggregate"] = time.perf_counter() - t2
        vt.selected_frames = [indices[i] for i in slow_indices(len(outs), self.manifest["aggregator"]["slow_frames"])]
        vt.fast_frames = indices
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

    def watch(self, source, rules=None, sample_fps: float = 2.0, realtime: bool = False,
              max_outage: float = 600.0, max_new_tokens: int | None = None, rtsp_transport: str = "tcp"):
        """Standing questions over a camera, stream, file or (t, frame) iterable, or over many at once
        ({name: source, ...}, each answered by this one runtime): an iterator of JSON-ready records, each with its
        `source` (see `sfedge.runtime.watch`). `rules`: a YAML file, or a list of Rule objects or dicts (question,
        every, window, optional name and trigger), for the sources that bring none of their own."""
        return Watcher(self, source, as_rules(rules) if rules else [], sample_fps, realtime, max_outage,
                       max_new_tokens, rtsp_transport)

    def ask(self, video, question: str, max_new_tokens: int | None = None, temperature: float = 0.0,
            top_p: float = 1.0, top_k: int = 0, seed: int | None = None, style: str = "plain",
            options: list[str] | None = None, stream: bool = False, min_new_tokens: int = 0,
            choice: str | None = None):
        """Answer a question about a video (a path, "demo", or VisualTokens from encode). Greedy by default.
        With options, the answer carries each option's log-probability; `choice` (prompt.CHOICES, default the
        bundle's) says whether the options are listed and answered by letter, or each scored as the answer."""
        sampling, max_new_tokens = self._sampling(temperature, top_k, top_p, seed, max_new_tokens)
        choice = choice or self.manifest["prompt"].get("choice", "letter")
        ids = prompts.token_ids(self.manifest["prompt"], self.llm.tokenize, question, style, options, choice)
        vt, timings = self._video(video)
        self._check_fits(vt, ids)
        if self.qa:
            vt, per_question = self.qa.tokens(vt, question, self.aggregator)
            timings.update(per_question)
        t0 = time.perf_counter()
        reused = self._prefill_video(vt, ids.prefix)
        logits = self.llm.decoder.forward(self.llm.embed(ids.question), self.plan.prefill_chunk)
        timings["prefill"] = time.perf_counter() - t0
        prompt_tokens = self.llm.decoder.length
        option_logprobs = score_options(self.llm, logits, ids.option_ids) if options else None
        tokens = generate(self.llm, logits, max_new_tokens, sampling, min_new_tokens)

        def finish(text: str, generated) -> Answer:
            timings["generate"] = generated.seconds
            return Answer(text, question, vt.count, vt.frame_indices, vt.selected_frames, vt.fast_frames,
                          prompt_tokens, len(generated.tokens), reused, timings, peak_rss(), vt.decode_method,
                          vt.notes, option_logprobs)

        s = AnswerStream(_starting_with(ids.answer_start, text_pieces(self.llm, tokens)), finish)
        if stream:
            return s
        for _ in s:
            pass
        return s.answer

    def _sampling(self, temperature, top_k, top_p, seed, max_new_tokens) -> tuple[Sampling, int]:
        max_new_tokens = self.plan.max_new_tokens if max_new_tokens is None else max_new_tokens
        if max_new_tokens < 1:
            raise BadInput("max_new_tokens must be at least 1")
        try:
            return Sampling(temperature, top_k, top_p, seed), max_new_tokens
        except ValueError as e:
            raise BadInput(str(e)) from None

    def _video(self, video) -> tuple[VisualTokens, dict]:
        """The video's tokens and the timings this question pays for them: a repeated path reuses the last ones."""
        if isinstance(video, VisualTokens):
            return video, {k: 0.0 for k in video.timings}
        path = resolve_source(video)
        try:
            st = path.stat()
            ident = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        except OSError:
            ident = None
        if ident and self._last_video and self._last_video[0] == ident:
            return self._last_video[1], {k: 0.0 for k in self._last_video[1].timings}
        vt = self.encode(video)
        self._last_video = (ident, vt) if ident else None
        return vt, dict(vt.timings)

    def _check_fits(self, vt: VisualTokens, ids: prompts.PromptIds) -> None:
        """Refuse an over-long question before anything is prefilled."""
        need = len(ids.prefix) + vt.count + len(ids.question) + max(map(len, ids.option_ids), default=1)
        if need > self.plan.context:
            raise BadInput(f"the question is {len(ids.question)} tokens; with {vt.count} visual tokens it does not "
                           f"fit the planned context of {self.plan.context} tokens: shorten it or plan fewer frames")

    def _prefill_video(self, vt: VisualTokens, prefix_ids: list) -> bool:
        """Bring the KV cache to the end of this video's visual prefix; True when it was already there."""
        lm = self.llm
        if lm.prefix is not None and lm.prefix[0] == vt.key:
            lm.decoder.rewind(lm.prefix[1])
            return True
        lm.decoder.rewind(0)
        lm.prefix = None
        lm.decoder.forward(np.concatenate([lm.embed(prefix_ids), vt.tokens]), self.plan.prefill_chunk)
        lm.prefix = (vt.key, lm.decoder.length)
        return False


def _starting_with(first: str, pieces):
    """The answer prefill (e.g. "In the video,") as the first piece; returns the pieces' statistics."""
    if first:
        yield first
    return (yield from pieces)
