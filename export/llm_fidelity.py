"""The exported decoder against its PyTorch original on the same tokens: perplexity and the KL divergence of the
next-token distribution on English prose (as llama.cpp reports them), and teacher-forced logits (cosine, top-5
overlap, KL) over the exported model's own greedy continuation of chat prompts and of a prompt behind real visual
tokens, with the first position where PyTorch's greedy choice differs (where greedy decoding would diverge).

The exported side runs first (ONNX Runtime), then the reference: one layer-streamed fp32 PyTorch pass over every
sequence (streamed.py), so a 7B model is measured without ever being whole in memory.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch

from sfedge import calibration
from sfedge.runtime.decoder import Decoder
from sfedge.runtime.embeddings import Embeddings
from sfedge.runtime.memory import give_back
from sfedge.runtime.prompt import chat, transformers_tokenize
from sfedge.runtime.prompt import embeds as prompt_embeds
from sfedge.runtime.sessions import open_session

from .streamed import LayerStream

# The int4 gate catches a broken quantization, not a slightly worse one: perplexity within 35% of PyTorch's and a
# mean next-token KL divergence under 0.35 nats, on the prose and behind the prompts. Both hold for any distribution,
# where top-5 overlap is noise on the near-flat logits of random weights (it is reported, not gated). Measured on
# SmolLM2-135M (see tests/test_llm_engine.py): imatrix 0.07 nats, rtn 0.14.
MAX_PPL_RATIO = 1.35
MAX_KL = 0.35
KL_PROSE_POSITIONS = 512  # prose positions whose whole distributions are kept for the KL (a vocab-wide row each)
QUESTION = "Describe what happens in the video."


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def kl(ref_logits: np.ndarray, got_logits: np.ndarray) -> np.ndarray:
    """KL(reference || exported) of the next-token distributions, per position, in nats."""
    p, q = log_softmax(ref_logits), log_softmax(got_logits)
    return (np.exp(p) * (p - q)).sum(-1)


def _top5(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ta, tb = np.argsort(-a, -1)[:, :5], np.argsort(-b, -1)[:, :5]
    return np.array([len(set(x) & set(y)) for x, y in zip(ta, tb)], dtype=np.float64)


def _cos(a, b):
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def prose_ids(tokenizer, count: int) -> np.ndarray:
    """The first `count` tokens of the English prose: the perplexity text of every decoder the export writes."""
    return np.array(tokenizer(calibration.english_text(), add_special_tokens=False)["input_ids"][:count])


def _nll(log_probs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    return -log_probs[np.arange(len(targets)), targets]


def measure(stream: LayerStream, tokenizer, bundle: Path, llm_spec: dict, prompt: dict, *, text_tokens=2048,
            positions=32, visual_tokens: np.ndarray | None = None, log=print, bar=None) -> dict:
    table = stream.embeddings()
    embed = Embeddings(bundle, llm_spec["embeddings"])
    ids = prose_ids(tokenizer, text_tokens)
    log(f"exported decoder: {len(ids)} tokens of English prose, {positions} greedy tokens after each prompt")
    got_prose = _prose_logits(bundle, llm_spec, embed(ids), ids)
    prompts = _prompts(tokenizer, prompt, table, embed, visual_tokens)
    got_tf = _greedy(bundle, llm_spec, embed, [got for _, got in prompts], positions)
    del embed
    give_back()  # the ONNX Runtime sessions' memory, before the reference's layers
    log(f"PyTorch reference, fp32, streamed a layer at a time over {len(prompts) + 1} sequences")
    sequences = [table[ids]] + [torch.cat([ref, table[own[:-1]]]) for (ref, _), (own, _) in zip(prompts, got_tf)]
    progress = bar("reference", stream.num_layers) if bar else None
    finals = stream.forward(sequences, progress=progress)
    if progress:
        progress.close()
    head = stream.lm_head()
    out = {"perplexity": _perplexity(finals[0], head, ids, got_prose)}
    tf = [_compare(finals[1 + j][-positions:] @ head.T, own, got) for j, (own, got) in enumerate(got_tf)]
    n_text = len(calibration.prompts())
    out["teacher_forced"] = _summary(tf[:n_text], positions)
    if visual_tokens is not None:
        out["teacher_forced_video"] = _summary(tf[n_text:], positions)
    return out


def _prompts(tokenizer, prompt: dict, table: torch.Tensor, embed, visual_tokens):
    """(PyTorch embeddings, bundle embeddings) of each chat prompt (the user turn alone, in one piece) and, with
    visual tokens, of the runtime's prompt around them."""
    tokenize = transformers_tokenize(tokenizer)
    out = []
    for text in calibration.prompts():
        p_ids = tokenize(chat(prompt, text), prompt["add_special_tokens"])
        out.append((table[p_ids], embed(p_ids)))
    if visual_tokens is not None:
        out.append((prompt_embeds(prompt, tokenize, lambda i: table[i], torch.cat,
                                  torch.from_numpy(visual_tokens).float(), QUESTION),
                    prompt_embeds(prompt, tokenize, embed, np.concatenate, visual_tokens.astype(np.float32),
                                  QUESTION)))
    return out


def _greedy(bundle: Path, spec: dict, embed, prompts: list[np.ndarray], positions: int):
    """For each prompt, the exported model's greedy continuation and its logits at each step: the prompt in one
    prefill, then one token at a time, as the runtime decodes."""
    max_len = max(len(p) for p in prompts) + positions
    twin = spec.get("prefill_graph")
    decoder = Decoder(bundle / spec["graph"], {**spec, "max_context": max(max_len, spec["max_context"])}, max_len,
                      prefill_graph=bundle / twin if twin else None)
    out = []
    for p in prompts:
        decoder.rewind(0)
        logits, own, steps = decoder.forward(p), [], []
        for _ in range(positions):
            steps.append(logits)
            own.append(int(np.argmax(logits)))
            logits = decoder.forward(embed(own[-1:]))
        out.append((np.array(own), np.stack(steps)))
    return out


def _prose_logits(bundle: Path, spec: dict, embeds: np.ndarray, ids: np.ndarray, chunk: int = 512) -> dict:
    """The exported model's NLL of each next prose token, through a copy of the decoder graph that returns every
    position's logits (the bundle's returns only the last), prefilled in chunks; and the whole log-distributions of
    the first KL_PROSE_POSITIONS."""
    graph = bundle / (spec.get("prefill_graph") or spec["graph"])  # with an int8 cache: the fp32-KV prefill graph
    every = graph.with_name(".every-position.onnx")
    _every_position(graph, every)
    try:
        session = open_session(every)
        past = {i.name: np.zeros((1, spec["num_kv_heads"], 0, spec["head_dim"]), np.float32)
                for i in session.get_inputs() if i.name.startswith("past_key_values.")}
        nll, kept = [], []
        for start in range(0, len(embeds), chunk):
            part = embeds[start:start + chunk].astype(np.float32)[None]
            mask = np.ones((1, start + part.shape[1]), np.int64)
            logits, *present = session.run(None, {"inputs_embeds": part, "attention_mask": mask, **past})
            past = dict(zip(past, present))
            lp = log_softmax(logits[0][:len(ids) - 1 - start])
            nll.append(_nll(lp, ids[start + 1:start + 1 + len(lp)]))
            kept.append(lp[:max(0, KL_PROSE_POSITIONS - start)].astype(np.float32))
        del session
    finally:
        every.unlink(missing_ok=True)
    return {"nll": np.concatenate(nll), "log_probs": np.concatenate(kept)}


def _every_position(src: Path, dst: Path) -> None:
    """The decoder graph with lm_head over every position (its last-position Gather bypassed), reading the same
    external data file."""
    model = onnx.load(src, load_external_data=False)
    gather = next(n for n in model.graph.node if n.name == "/lm_head/prune/Gather")
    for n in model.graph.node:
        n.input[:] = [gather.input[0] if i == gather.output[0] else i for i in n.input]
    index = next(n for n in model.graph.node if n.output[0] == gather.input[1])
    model.graph.node.remove(gather)
    model.graph.node.remove(index)
    logits = next(o for o in model.graph.output if o.name == "logits")
    logits.type.tensor_type.shape.dim[1].dim_param = "sequence_length"
    onnx.save(model, dst)


def _perplexity(final: torch.Tensor, head: torch.Tensor, ids: np.ndarray, got: dict) -> dict:
    """Both perplexities over the prose, and the mean KL over its first positions; the reference's logits are
    made a chunk at a time (a vocab-wide row per token)."""
    nll, kls = [], []
    for start in range(0, len(ids) - 1, 512):
        ref = log_softmax((final[start:start + 512] @ head.T).numpy())[:len(ids) - 1 - start]
        nll.append(_nll(ref, ids[start + 1:start + 1 + len(ref)]))
        keep = got["log_probs"][start:start + len(ref)]
        if len(keep):
            kls.append((np.exp(ref[:len(keep)]) * (ref[:len(keep)] - keep)).sum(-1))
    kls = np.concatenate(kls)
    return {"tokens": int(len(ids)), "reference": float(np.exp(np.concatenate(nll).mean())),
            "exported": float(np.exp(got["nll"].mean())), "kl_positions": int(len(kls)), "mean_kl": float(kls.mean()),
            "max_kl": float(kls.max())}


def _compare(ref: torch.Tensor, own: np.ndarray, got: np.ndarray) -> dict:
    """The reference's logits at each step of the exported model's greedy path against the exported model's."""
    ref = ref.numpy()
    agree = np.argmax(ref, -1) == own
    return {"cos": _cos(ref, got), "top5": _top5(ref, got), "kl": kl(ref, got),
            "first": int(np.argmin(agree)) if not agree.all() else len(own)}


def _summary(parts: list[dict], positions: int) -> dict:
    cos = np.concatenate([p["cos"] for p in parts])
    top5 = np.concatenate([p["top5"] for p in parts])
    kls = np.concatenate([p["kl"] for p in parts])
    return {"positions_per_prompt": positions, "prompts": len(parts), "min_cosine": float(cos.min()),
            "mean_cosine": float(cos.mean()), "mean_top5_overlap": float(top5.mean()),
            "min_top5_overlap": float(top5.min()), "mean_kl": float(kls.mean()), "max_kl": float(kls.max()),
            "greedy_first_divergence": [p["first"] for p in parts]}


def _with_ratio(fig: dict) -> dict:
    ppl = fig["perplexity"]
    return {**fig, "perplexity": {**ppl, "ratio": ppl["exported"] / ppl["reference"]}}


def verdict(fig: dict, precision: str) -> dict:
    """The figures of `measure` with their threshold, a line of what was measured, and whether it passed."""
    fig = _with_ratio(fig)
    tf = [fig["teacher_forced"]] + ([fig["teacher_forced_video"]] if "teacher_forced_video" in fig else [])
    kls = [fig["perplexity"]["mean_kl"]] + [t["mean_kl"] for t in tf]
    if precision == "fp32":
        ok = all(t["min_cosine"] >= 0.9999 for t in tf)
        rule = "teacher-forced min cosine >= 0.9999"
    else:
        ok = fig["perplexity"]["ratio"] <= MAX_PPL_RATIO and max(kls) <= MAX_KL
        rule = (f"perplexity <= {MAX_PPL_RATIO}x PyTorch's and mean next-token KL <= {MAX_KL} nats (prose, "
                f"prompts{', video' if len(tf) > 1 else ''})")
    measured = (f"perplexity {fig['perplexity']['ratio']:.3f}x, KL " + "/".join(f"{k:.3f}" for k in kls)
                + ", top-5 overlap " + "/".join(f"{t['mean_top5_overlap']:.2f}" for t in tf))
    return {**fig, "threshold": rule, "measured": measured, "passed": bool(ok)}


def nf4_verdict(fig: dict) -> dict:
    """The nf4 copy's entry, in the same shape: its perplexity ({"exported", "reference"}: PyTorch's fp32) under
    the int4 gate's ceiling."""
    fig = _with_ratio(fig)
    ratio = fig["perplexity"]["ratio"]
    return {**fig, "threshold": f"perplexity <= {MAX_PPL_RATIO}x PyTorch's", "measured": f"perplexity {ratio:.3f}x",
            "passed": bool(ratio <= MAX_PPL_RATIO)}
