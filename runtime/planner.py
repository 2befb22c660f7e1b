"""The memory plan, from the manifest alone: what each part of a question costs, and the settings that fit a
budget. Weights are the bundle's file sizes; activations are estimated from the shapes in the manifest; the
constants were measured on the demo bundle (see README, "Memory planner") and are deliberately on the safe side."""
from __future__ import annotations

from dataclasses import dataclass, field

from . import cpu
from .errors import BadInput, DoesNotFit
from .tokens import kv_bytes_per_token, visual_tokens
from .units import human

RUNTIME_BASE = 80_000_000  # interpreter, numpy, OpenCV, ONNX Runtime and tokenizers imported (75 MB measured)
SESSION_FACTOR = 1.25  # ONNX Runtime holds each graph's weights plus prepacked copies and arena slack
PROMPT_TOKENS = 256  # budget for the chat template and a question around the visual tokens
ENCODE_CHUNKS = (64, 32, 16, 8, 4, 2, 1)
# On a CPU small chunks are both leaner and faster (caches): the int8 ViT-B/16 encoded 17.7 / 17.3 / 16.4 / 15.7
# frames/s in chunks of 4 / 8 / 16 / 32, peaking at 301 / 386 / 582 / 1,054 MB (AMD EPYC, 2 cores). A GPU wants
# the large batches.
CPU_ENCODE_CHUNK = 8
PREFILL_CHUNKS = (512, 256, 128, 64)


@dataclass
class Plan:
    frames: int
    visual_tokens: int
    context: int  # KV slots allocated: visual tokens + prompt + answer
    max_new_tokens: int
    encode_chunk: int
    prefill_chunk: int
    vision_variant: str
    kv_precision: str = "float32"  # the bundle's KV dtype: float32, or int8 if exported with --kv-cache int8
    prefill_twin: bool = False  # prompts go through the decoder's fp32-KV twin graph (a second weights copy)
    pooling: str = "slowfast"  # or "prompt-guided" (PPLLaVA)
    candidates: int = 0  # frames scored per question by CLIP frame selection; 0 = uniform sampling
    device: str = "cpu"  # where the vision graph runs: on a CPU, encode chunks stop at CPU_ENCODE_CHUNK
    parts: dict = field(default_factory=dict)  # name -> bytes
    budget: int | None = None
    sessions: dict = field(default_factory=dict)  # graph (vision, aggregator, llm) -> its share of the parts

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def table(self) -> str:
        rows = [("part", "bytes")] + [(k, human(v)) for k, v in self.parts.items()] + [("total", human(self.total))]
        if self.budget:
            rows.append(("budget", f"{human(self.budget)} ({human(self.budget - self.total)} free)"))
        w = max(len(r[0]) for r in rows)
        body = "\n".join(f"  {a:<{w}}  {b:>12}" for a, b in rows)
        selection = f"CLIP selection among {self.candidates} candidates" if self.candidates else "uniform"
        return (f"frames {self.frames} ({selection}), {self.pooling} pooling, visual tokens {self.visual_tokens}, "
                f"context {self.context} tokens (KV {self.kv_precision}"
                f"{', prefill twin' if self.prefill_twin else ''}), max new tokens {self.max_new_tokens}\n"
                f"vision graph {self.vision_variant}, encode chunk {self.encode_chunk} frames, "
                f"prefill chunk {self.prefill_chunk} tokens\n{body}")


def _size(manifest: dict, *rels: str) -> int:
    return sum(manifest["artifacts"][r]["size"] for r in rels if r in manifest["artifacts"])


def encoder_bytes_per_frame(v: dict) -> int:
    """Peak activations of one frame through the tower: the widest layer (MLP) and the attention scores."""
    dims = v["tower_dims"]
    d, inter, heads = dims["hidden_size"], dims["intermediate_size"], dims["num_heads"]
    gh, gw = v["patch_grid"]
    n = gh * gw + 1
    return 4 * (n * inter * 2 + heads * n * n * 2 + n * d * 6) + 3 * v["image_size"][0] * v["image_size"][1]


def prefill_bytes(llm: dict, chunk: int, context: int) -> int:
    return 4 * chunk * (llm["hidden_size"] * 12 + llm["intermediate_size"] * 3 + llm["num_heads"] * context
                        + llm["vocab_size"] // max(chunk, 1))


def ring_bytes(v: dict, ring_frames: int, queued_frames: int) -> int:
    """One watched source's memory: per-frame features kept for its longest window, and decoded frames waiting
    to be encoded."""
    return (ring_frames * v["tokens_per_frame"] * v["hidden_size"] * 4
            + queued_frames * v["image_size"][0] * v["image_size"][1] * 3)


def make_plan(manifest: dict, budget: int | None = None, frames: int | None = None, max_new_tokens: int = 256,
              vision_variant: str | None = None, rings: dict | None = None, pooling: str = "slowfast",
              candidates: int = 0, device: str = "cpu") -> Plan:
    """The largest encode and prefill chunks that fit `budget`, or DoesNotFit naming what does not.
    `rings`: a watcher's sources, {name: (ring frames, queued frames)}, each with its feature ring and frame queue
    (none for single videos)."""
    plan = fit_plan(manifest, budget, frames, max_new_tokens, vision_variant, rings, pooling, candidates, device)
    if budget is not None and plan.total > budget:
        raise DoesNotFit(_rings_advice(manifest, plan, rings) if rings else _advice(manifest, plan))
    return plan


def fit_plan(manifest: dict, budget: int | None = None, frames: int | None = None, max_new_tokens: int = 256,
             vision_variant: str | None = None, rings: dict | None = None, pooling: str = "slowfast",
             candidates: int = 0, device: str = "cpu") -> Plan:
    """The first plan within `budget` in order of preference (the prefill twin, then the largest encode and prefill
    chunks), or, when none is, the smallest, for the caller to say by how much it overshoots."""
    v, llm = manifest["vision"], manifest["llm"]
    frames = frames or manifest["aggregator"]["num_frames"]
    if frames < 1:
        raise BadInput("the frame count must be at least 1")
    if candidates and candidates < frames:
        raise BadInput(f"{candidates} candidates are fewer than the {frames} frames: frame selection picks among at "
                       f"least as many candidates as it keeps")
    # an older export's full-range int8 vision weights would overflow a CPU without VNNI: fp32 is the default there
    int8_ok = "int8" in v["graphs"] and not cpu.int8_weights_overflow(v.get("int8_weight_limit"))
    variant = vision_variant or ("int8" if int8_ok else "fp32")
    if variant not in v["graphs"]:
        raise BadInput(f"vision variant {variant!r} is not in this bundle (it has {', '.join(v['graphs'])})")
    visual = visual_tokens(manifest, frames, pooling)
    context = _context(manifest, frames, visual, max_new_tokens, pooling)
    # The prefill twin (int8 weights, or an int8-KV bundle's fp32-cache twin) prefills faster but is a second
    # session: planned first, dropped when the budget has no room for it.
    for twin in (True, False) if "prefill_graph" in llm else (False,):
        fixed = _fixed_parts(manifest, variant, frames, visual, context, twin, pooling, candidates)
        for name, (ring_frames, queued_frames) in (rings or {}).items():
            fixed[f"watch {name}: feature ring ({ring_frames} frames) + queue"] = ring_bytes(v, ring_frames,
                                                                                            queued_frames)
        most = CPU_ENCODE_CHUNK if device == "cpu" else max(ENCODE_CHUNKS)
        for enc in [c for c in ENCODE_CHUNKS if c <= min(max(frames, 1), most)] or [1]:
            for pre in PREFILL_CHUNKS:
                parts = {**fixed, f"encoder activations ({enc} frames)": enc * encoder_bytes_per_frame(v),
                         f"prefill activations ({pre} tokens)": prefill_bytes(llm, pre, context)}
                sessions = {"vision": _vision_weights(manifest, variant) + enc * encoder_bytes_per_frame(v),
                            "aggregator": fixed["aggregator"] + fixed["video frames + tokens"],
                            "llm": (_llm_weights(manifest, twin) + fixed["kv cache"]
                                    + prefill_bytes(llm, pre, context))}
                plan = Plan(frames, visual, context, max_new_tokens, enc, pre, variant, llm["kv_dtype"], twin,
                            pooling, candidates, device, parts=parts, budget=budget, sessions=sessions)
                if budget is None or plan.total <= budget:
                    return plan
    return plan


def least_plan(manifest: dict, frames: int | None = None, **settings) -> Plan:
    """The smallest plan of these settings (1-frame encode chunks, the smallest prefill chunk, no prefill twin):
    what they need at the least."""
    return fit_plan(manifest, 0, frames, **settings)


def most_frames(manifest: dict, budget: int, frames: int, **settings) -> int:
    """The most frames, up to `frames`, whose plan fits `budget` (0 when not even one frame does)."""
    for f in range(frames, 0, -1):
        try:
            if fit_plan(manifest, budget, f, **settings).total <= budget:
                return f
        except DoesNotFit:  # over the model's context
            continue
    return 0


def decode_bytes_per_token(manifest: dict, context: int) -> int:
    """What a decode step reads at `context` tokens: every weight of the decoder graph (lm_head included) and the
    KV cache. Memory bandwidth over this is the ceiling of decode speed."""
    return llm_file_bytes(manifest) + context * kv_bytes_per_token(manifest["llm"])


def llm_file_bytes(manifest: dict) -> int:
    """The decoder graph's files: its weights, lm_head included."""
    llm = manifest["llm"]
    return _size(manifest, llm["graph"], *llm.get("external_data", []))


def replan(manifest: dict, plan: Plan, **changes) -> Plan:
    """The same settings as `plan` with some changed (a watcher adds its ring buffer), checked against the same
    budget."""
    kw = dict(budget=plan.budget, frames=plan.frames, max_new_tokens=plan.max_new_tokens,
              vision_variant=plan.vision_variant, pooling=plan.pooling, candidates=plan.candidates,
              device=plan.device)
    return make_plan(manifest, **{**kw, **changes})


def _context(manifest: dict, frames: int, visual: int, max_new_tokens: int, pooling: str) -> int:
    """KV slots: visual tokens + prompt + answer, refused past the model's maximum with the frames that fit."""
    context = visual + PROMPT_TOKENS + max_new_tokens
    limit = manifest["llm"]["max_context"]
    if context > limit:
        room = limit - PROMPT_TOKENS - max_new_tokens
        fit = next((f for f in range(frames, 0, -1) if visual_tokens(manifest, f, pooling) <= room), 0)
        raise DoesNotFit(f"{frames} frames give {visual} visual tokens; with the prompt and {max_new_tokens} new "
                         f"tokens that is {context} tokens, over the model's maximum of {limit}: "
                         f"use at most {fit} frames or fewer new tokens")
    return context


def _fixed_parts(manifest: dict, variant: str, frames: int, visual: int, context: int, twin: bool, pooling: str,
                 candidates: int) -> dict:
    """Everything but the chunk-dependent activations."""
    v, agg, llm = manifest["vision"], manifest["aggregator"], manifest["llm"]
    fixed = {
        "runtime": RUNTIME_BASE,
        f"vision weights ({variant})": _vision_weights(manifest, variant),
        "aggregator": _size(manifest, agg["graph"]),
        f"llm weights ({llm['precision']}{', with its prefill twin' if twin else ''})": _llm_weights(manifest, twin),
        "embedding table": _size(manifest, *llm["embeddings"]["files"].values()),
        "tokenizer": 4 * _size(manifest, manifest["tokenizer"]),
        "kv cache": context * kv_bytes_per_token(llm, resident=twin),
        "video frames + tokens": frames * (v["image_size"][0] * v["image_size"][1] * 3
                                           + v["tokens_per_frame"] * v["hidden_size"] * 4)
                                 + visual * v["hidden_size"] * 4 * 2,
    }
    if "clip" in manifest:
        fixed.update(question_aware_parts(manifest, frames, pooling, candidates))
    return fixed


def _vision_weights(manifest: dict, variant: str) -> int:
    return int(_size(manifest, manifest["vision"]["graphs"][variant]) * SESSION_FACTOR)


def _llm_weights(manifest: dict, twin: bool) -> int:
    """The decoder session, and the prefill twin's: a second session on the same weights (an int8-KV bundle's) or
    on its own int8 weights (read from their file)."""
    llm = manifest["llm"]
    twin_bytes = 0
    if twin:
        twin_bytes = (_size(manifest, *llm["prefill_external_data"]) if llm.get("prefill_weights") == "int8"
                      else llm_file_bytes(manifest))
    return int((llm_file_bytes(manifest) + twin_bytes) * SESSION_FACTOR)


def _rings_advice(manifest: dict, plan: Plan, rings: dict) -> str:
    """Why a watch over these sources does not fit: the model's plan and each source's ring and queue, and how
    many of the sources (in the order given) would."""
    base = fit_plan(manifest, 0, plan.frames, plan.max_new_tokens, plan.vision_variant, None, plan.pooling,
                    plan.candidates)
    if base.total > plan.budget:  # not even the model fits: the sources are not the problem
        return _advice(manifest, base)
    v, room, fit = manifest["vision"], plan.budget - base.total, 0
    each = [ring_bytes(v, *r) for r in rings.values()]
    for cost in each:
        if cost > room:
            break
        room, fit = room - cost, fit + 1
    return (f"{len(rings)} sources need {human(sum(each))} for their feature rings and frame queues "
            f"({', '.join(f'{n} {human(c)}' for n, c in zip(rings, each))}) on top of the {human(base.total)} the "
            f"model needs at its smallest chunks: {human(base.total + sum(each))}, "
            f"{human(base.total + sum(each) - plan.budget)} over the {human(plan.budget)} budget; at most {fit} of "
            f"these sources fit (fewer sources, shorter windows or a lower sample_fps need less)")


def _advice(manifest: dict, plan: Plan) -> str:
    """Why the smallest plan does not fit the budget, and what would."""
    v, agg, llm = manifest["vision"], manifest["aggregator"], manifest["llm"]
    budget = plan.budget
    fixed = {k: n for k, n in plan.parts.items() if "activations" not in k}
    biggest = max(fixed, key=fixed.get)
    advice = []
    if plan.vision_variant != "int8" and "int8" in v["graphs"]:
        advice.append("the int8 vision graph")
    if plan.frames > 8:
        kv_per_frame = kv_bytes_per_token(llm) * agg["fast_grid"][0] * agg["fast_grid"][1]
        advice.append(f"fewer frames (each frame adds {human(kv_per_frame)} of KV cache)")
    if llm["kv_dtype"] != "int8":
        advice.append("a bundle exported with --kv-cache int8 (a quarter of the KV bytes)")
    advice.append("a smaller max_new_tokens")
    return (f"the plan needs {human(plan.total)} even at 1-frame encode chunks and {plan.prefill_chunk}-token "
            f"prefill: {human(plan.total - budget)} over the {human(budget)} budget; the largest part is {biggest} "
            f"({human(fixed[biggest])}); try {', or '.join(advice)}, or a budget of at least {human(plan.total)}")


def question_aware_parts(manifest: dict, frames: int, pooling: str, candidates: int) -> dict:
    """A CLIP bundle's extra memory: the text tower (loaded only when a question-aware mode is on), the vision
    graph's CLIP outputs, and, in question-aware modes, every encoded frame kept until the question picks its
    tokens."""
    v, c = manifest["vision"], manifest["clip"]
    grid = v["patch_grid"][0] * v["patch_grid"][1]
    clip_per_frame = (grid + 1) * c["embed_dim"] * 4
    kept = candidates or frames
    parts = {"clip outputs per frame": frames * clip_per_frame}
    if candidates or pooling != "slowfast":
        per_frame = v["image_size"][0] * v["image_size"][1] * 3 + v["tokens_per_frame"] * v["hidden_size"] * 4
        parts = {"clip text tower": int(_size(manifest, c["text_graph"]) * SESSION_FACTOR)
                 + 4 * _size(manifest, c["tokenizer"]),
                 "kept frames (question-aware)": kept * (per_frame + clip_per_frame) - frames * per_frame}
        if pooling == "prompt-guided":
            parts["prompt pooling graph"] = _size(manifest, manifest["prompt_pooling"]["graph"])
    return parts
