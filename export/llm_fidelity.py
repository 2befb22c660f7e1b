"""The exported decoder against its PyTorch original on the same tokens (teacher forcing): perplexity and the KL
divergence of the next-token distribution on English prose (as llama.cpp reports them); and after chat prompts and a
prompt behind real visual tokens, each followed by the same fixed answer, the logits at the answer's positions:
cosine, top-5 overlap, KL, and top-1 agreement with where it first fails (where greedy decoding would diverge).

Both sides stream: the reference through PyTorch's fp32 layers, the export through its graph's layers in ONNX
Runtime (graph_layers.py), in the same pass that writes the graph (llm.py). Here: the sequences, and the comparison
of the final hidden states, turned into logits a chunk of positions at a time (a vocab-wide row each).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sfedge import calibration
from sfedge.runtime.llm import log_softmax
from sfedge.runtime.prompt import chat, transformers_tokenize
from sfedge.runtime.prompt import embeds as prompt_embeds

# The int4 gate catches a broken quantization, not a slightly worse one: perplexity within 35% of PyTorch's, and on
# the prose, the chat prompts and the video prompt a mean next-token KL divergence under a quarter of the reference
# distribution's own entropy (a broken graph loses about all of it). Both hold for any distribution: top-5 overlap
# is noise on random weights' logits (reported, not gated), and an absolute KL bound is not either: a correct int4
# copy of a random-weight 7B (no redundancy to absorb rounding) measures 0.80 nats of an entropy of 9.56, where the
# real SmolLM2 measures 0.25 of 2.68; the largest share measured, 0.18, is `rtn` after the chat prompts (0.43 of
# 2.42). Per scheme on SmolLM2: README, "The language model at 4 bits".
MAX_PPL_RATIO = 1.35
MAX_KL_SHARE = 0.25
TWIN_KL_MARGIN = 0.25
ANSWER_TOKENS = 32  # the fixed answer after each prompt: the first tokens of the prose
CHUNK_VALUES = 1 << 23  # logits made at a time (positions x vocab): 64 MB per float64 copy, whatever the vocab
QUESTION = "Describe what happens in the video."


@dataclass
class Sequence:
    group: str  # "prose", "prompts" or "video"
    ref: torch.Tensor  # [n, hidden] from the checkpoint's fp32 table
    got: np.ndarray  # [n, hidden] from the bundle's embedding file
    targets: np.ndarray  # the token each scored position predicts
    first: int  # the first scored position (the scored ones run to the end, less one)


def prose_ids(tokenizer, count: int) -> np.ndarray:
    """The first `count` tokens of the English prose: the perplexity text of every decoder the export writes."""
    return np.array(tokenizer(calibration.english_text(), add_special_tokens=False)["input_ids"][:count])


def sequences(tokenizer, prompt: dict, table: torch.Tensor, embed, text_tokens: int,
              visual_tokens: np.ndarray | None) -> list[Sequence]:
    """The prose, then each chat prompt (the user turn alone) and, with visual tokens, the runtime's prompt around
    them, each followed by the fixed answer."""
    ids = prose_ids(tokenizer, text_tokens)
    out = [Sequence("prose", table[ids], embed(ids), ids[1:], 0)]
    answer = ids[:ANSWER_TOKENS]
    tokenize = transformers_tokenize(tokenizer)
    for text in calibration.prompts():
        p_ids = np.array(tokenize(chat(prompt, text), prompt["add_special_tokens"]))
        full = np.concatenate([p_ids, answer])
        out.append(Sequence("prompts", table[full], embed(full), answer, len(p_ids) - 1))
    if visual_tokens is not None:
        ref = prompt_embeds(prompt, tokenize, lambda i: table[i], torch.cat, torch.from_numpy(visual_tokens).float(),
                            QUESTION)
        got = prompt_embeds(prompt, tokenize, embed, np.concatenate, visual_tokens.astype(np.float32), QUESTION)
        out.append(Sequence("video", torch.cat([ref, table[answer]]), np.concatenate([got, embed(answer)]), answer,
                            len(ref) - 1))
    return out


def compare(seqs: list[Sequence], ref_final: list[torch.Tensor], head: torch.Tensor, got_final: list, got_logits,
            ) -> dict:
    """The figures, per group, from each sequence's final hidden states: PyTorch's ([n, hidden], times lm_head's
    `head`) and the export's (arrays for `got_logits(arrays, rows)`)."""
    per, chunk = {}, max(1, CHUNK_VALUES // len(head))
    for seq, ref_h, got_h in zip(seqs, ref_final, got_final):
        parts = []
        for start in range(seq.first, len(seq.ref) - 1, chunk):
            rows = slice(start, min(start + chunk, len(seq.ref) - 1))
            ref = (ref_h[rows] @ head.T).numpy()
            parts.append(_positions(ref, got_logits(got_h, rows), seq.targets[rows.start - seq.first:
                                                                               rows.stop - seq.first]))
        per.setdefault(seq.group, []).append({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
    out = {"perplexity": _perplexity(per.pop("prose")[0])}
    out["teacher_forced"] = _summary(per["prompts"])
    if "video" in per:
        out["teacher_forced_video"] = _summary(per["video"])
    return out


def twin(bundle, spec: dict, seqs: list[Sequence], ref_final: list[torch.Tensor], head: torch.Tensor) -> dict:
    """The int8 prefill twin as the runtime uses it: each prompt (chat and video) prefilled through the twin, its
    fixed answer then fed a token at a time through the 4-bit decoder; against PyTorch at the answer positions,
    beside the same with the prompt prefilled by the 4-bit decoder itself (what the twin may cost is the
    difference)."""
    from sfedge.runtime.decoder import Decoder

    scored = [(s, r) for s, r in zip(seqs, ref_final) if s.group != "prose"]
    longest = max(len(s.got) for s, _ in scored)
    dec = Decoder(bundle / spec["graph"], spec, longest, prefill_graph=bundle / spec["prefill_graph"])
    dec.twin_from = 2  # every prompt through the twin, short ones too (the runtime sends it long ones)
    out = {}
    for name in ("twin", "decoder"):
        if name == "decoder" and dec.shared_cache:
            dec.twin_from = longest + 1  # no prompt through the twin: one copy of each graph in memory (GBs at 7B)
        elif name == "decoder":  # an int8-cache decoder sends every prompt to its twin: the decoder alone
            dec = Decoder(bundle / spec["graph"], spec, longest)
        parts = {}
        for seq, ref_h in scored:
            dec.rewind(0)
            logits = [dec.forward(seq.got[:seq.first + 1])]
            logits += [dec.forward(seq.got[j:j + 1]) for j in range(seq.first + 1, len(seq.got) - 1)]
            ref = (ref_h[seq.first:len(seq.got) - 1] @ head.T).numpy()
            parts.setdefault(seq.group, []).append(_positions(ref, np.stack(logits), seq.targets))
        out[name] = {group: _summary(p) for group, p in parts.items()}
    return out


def twin_verdict(fig: dict) -> dict:
    """The twin passes when, on every group, its mean KL to PyTorch is within TWIN_KL_MARGIN of the 4-bit
    decoder's own (int8 weights round 16x finer than int4: the twin should cost next to nothing)."""
    ok = all(fig["twin"][g]["mean_kl"] <= fig["decoder"][g]["mean_kl"] * (1 + TWIN_KL_MARGIN) + 0.01
             for g in fig["decoder"])
    measured = "; ".join(f"{g}: KL {fig['twin'][g]['mean_kl']:.4f} against {fig['decoder'][g]['mean_kl']:.4f}, top-1 "
                         f"{fig['twin'][g]['top1_agreement']:.3f} against {fig['decoder'][g]['top1_agreement']:.3f}"
                         for g in fig["decoder"])
    return {**fig, "threshold": f"mean KL to PyTorch <= {1 + TWIN_KL_MARGIN}x the 4-bit decoder's own + 0.01 nats",
            "measured": measured, "passed": bool(ok)}


def _positions(ref: np.ndarray, got: np.ndarray, targets: np.ndarray) -> dict:
    p, q = log_softmax(ref), log_softmax(got)
    top_r, top_g = np.argpartition(-ref, 5, -1)[:, :5], np.argpartition(-got, 5, -1)[:, :5]
    at = np.arange(len(targets))
    return {"kl": (np.exp(p) * (p - q)).sum(-1), "entropy": -(np.exp(p) * p).sum(-1), "ref_nll": -p[at, targets],
            "got_nll": -q[at, targets],
            "cos": (ref * got).sum(-1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(got, axis=-1)),
            "top5": np.array([len(set(a) & set(b)) for a, b in zip(top_r, top_g)], np.float64),
            "top1": ref.argmax(-1) == got.argmax(-1)}


def _perplexity(f: dict) -> dict:
    return {"tokens": int(len(f["kl"]) + 1), "reference": float(np.exp(f["ref_nll"].mean())),
            "exported": float(np.exp(f["got_nll"].mean())), "mean_kl": float(f["kl"].mean()),
            "mean_entropy": float(f["entropy"].mean()),
            "max_kl": float(f["kl"].max()), "top1_agreement": float(f["top1"].mean())}


def _summary(parts: list[dict]) -> dict:
    cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return {"positions_per_prompt": ANSWER_TOKENS, "prompts": len(parts), "min_cosine": float(cat["cos"].min()),
            "mean_cosine": float(cat["cos"].mean()), "mean_top5_overlap": float(cat["top5"].mean()),
            "min_top5_overlap": float(cat["top5"].min()), "mean_kl": float(cat["kl"].mean()),
            "mean_entropy": float(cat["entropy"].mean()),
            "max_kl": float(cat["kl"].max()), "top1_agreement": float(cat["top1"].mean()),
            "first_top1_disagreement": [int(np.argmin(p["top1"])) if not p["top1"].all() else ANSWER_TOKENS
                                        for p in parts]}


def _with_ratio(fig: dict) -> dict:
    ppl = fig["perplexity"]
    return {**fig, "perplexity": {**ppl, "ratio": ppl["exported"] / ppl["reference"]}}


def verdict(fig: dict, precision: str) -> dict:
    """The figures of `compare` with their threshold, a line of what was measured, and whether it passed."""
    fig = _with_ratio(fig)
    tf = [fig["teacher_forced"]] + ([fig["teacher_forced_video"]] if "teacher_forced_video" in fig else [])
    parts = [fig["perplexity"]] + tf
    if precision == "fp32":
        ok = all(t["min_cosine"] >= 0.9999 for t in tf)
        rule = "teacher-forced min cosine >= 0.9999"
    else:
        ok = (fig["perplexity"]["ratio"] <= MAX_PPL_RATIO
              and all(f["mean_kl"] <= MAX_KL_SHARE * f["mean_entropy"] for f in parts))
        rule = (f"perplexity <= {MAX_PPL_RATIO}x PyTorch's and mean next-token KL <= {MAX_KL_SHARE} x the reference's "
                f"entropy (prose, prompts{', video' if len(tf) > 1 else ''})")
    measured = (f"perplexity {fig['perplexity']['ratio']:.3f}x, KL " + "/".join(f"{f['mean_kl']:.3f}" for f in parts)
                + " of entropy " + "/".join(f"{f['mean_entropy']:.2f}" for f in parts) + " nats, top-5 overlap "
                + "/".join(f"{t['mean_top5_overlap']:.2f}" for t in tf))
    return {**fig, "threshold": rule, "measured": measured, "passed": bool(ok)}


def nf4_verdict(fig: dict) -> dict:
    """The nf4 copy's entry, in the same shape: its perplexity ({"exported", "reference"}: PyTorch's fp32) under
    the int4 gate's ceiling."""
    fig = _with_ratio(fig)
    ratio = fig["perplexity"]["ratio"]
    return {**fig, "threshold": f"perplexity <= {MAX_PPL_RATIO}x PyTorch's", "measured": f"perplexity {ratio:.3f}x",
            "passed": bool(ratio <= MAX_PPL_RATIO)}
