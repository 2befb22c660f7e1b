"""The exported decoder against its PyTorch original, on the same tokens (teacher forcing):
perplexity on English prose, logits cosine and top-5 overlap at each generated position of chat prompts (and of a
prompt whose prefix is real visual tokens), and where greedy decoding first diverges."""
from __future__ import annotations

import numpy as np
import torch

from sfedge import calibration
from sfedge.runtime.decoder import Decoder
from sfedge.runtime.embeddings import Embeddings
from sfedge.runtime.prompt import chat, transformers_tokenize
from sfedge.runtime.prompt import embeds as prompt_embeds

# The export gate for int4 catches a broken quantization, not a slightly worse one: perplexity within 35% of
# PyTorch's and a mean top-5 overlap of 3. How each scheme compares with llama.cpp is measured, not gated
# (see QUANT_SCHEMES in llm.py and tests/test_llm_engine.py).
MAX_PPL_RATIO = 1.35
MIN_TOP5 = 3.0


def _nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    return lse - z[np.arange(len(targets)), targets]


def _stepwise(decoder: Decoder, embeds: np.ndarray) -> np.ndarray:
    """Logits at every position: the graph computes only the last position's, so feed one token at a time."""
    decoder.rewind(0)
    return np.stack([decoder.forward(embeds[i:i + 1]) for i in range(len(embeds))])


def _top5(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ta, tb = np.argsort(-a, -1)[:, :5], np.argsort(-b, -1)[:, :5]
    return np.array([len(set(x) & set(y)) for x, y in zip(ta, tb)], dtype=np.float64)


def _cos(a, b):
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def prose_ids(tokenizer, count: int) -> np.ndarray:
    """The first `count` tokens of the English prose: the perplexity text of every decoder the export writes."""
    return np.array(tokenizer(calibration.english_text(), add_special_tokens=False)["input_ids"][:count])


def measure(lm, tokenizer, bundle, llm_spec: dict, prompt: dict, *, text_tokens=2048, positions=32,
            visual_tokens: np.ndarray | None = None, log=print) -> dict:
    table = lm.get_input_embeddings().weight.detach()
    embed = Embeddings(bundle, llm_spec["embeddings"])
    max_len = max(text_tokens, 4096 if visual_tokens is None else len(visual_tokens) + 512)
    twin = llm_spec.get("prefill_graph")  # measured as the runtime runs it: prompts through the fp32-KV twin
    decoder = Decoder(bundle / llm_spec["graph"], {**llm_spec, "max_context": max(max_len, llm_spec["max_context"])},
                      max_len, prefill_graph=bundle / twin if twin else None)
    out = {}

    log(f"perplexity on {text_tokens} tokens of English prose")
    ids = prose_ids(tokenizer, text_tokens)
    with torch.no_grad():
        ref = lm(input_ids=torch.tensor(ids)[None]).logits[0].numpy()
    got = _stepwise(decoder, embed(ids))
    out["perplexity"] = {"tokens": int(len(ids)), "reference": float(np.exp(_nll(ref[:-1], ids[1:]).mean())),
                         "exported": float(np.exp(_nll(got[:-1], ids[1:]).mean()))}

    log(f"teacher-forced logits on {len(calibration.prompts())} chat prompts, {positions} positions each")
    cos, top5, diverge = [], [], []
    for text in calibration.prompts():  # the user turn alone, in one piece: no visual tokens to split it around
        p_ids = transformers_tokenize(tokenizer)(chat(prompt, text), prompt["add_special_tokens"])
        c, t, d = _teacher_forced(lm, decoder, embed, table[p_ids], embed(p_ids), positions)
        cos.append(c), top5.append(t), diverge.append(d)
    out["teacher_forced"] = _summary(cos, top5, diverge, positions)

    if visual_tokens is not None:
        log(f"teacher-forced logits after {len(visual_tokens)} visual tokens")
        ref_embeds, got_embeds = _video_prompt(tokenizer, prompt, table, embed, visual_tokens)
        c, t, d = _teacher_forced(lm, decoder, embed, ref_embeds, got_embeds, positions)
        out["teacher_forced_video"] = _summary([c], [t], [d], positions)
    return out


def _video_prompt(tokenizer, prompt: dict, table, embed, visual_tokens: np.ndarray):
    """The runtime's prompt around real visual tokens, as PyTorch embeddings (from the checkpoint's table) and as
    the bundle's (from its embedding file)."""
    question = "Describe what happens in the video."
    tokenize = transformers_tokenize(tokenizer)
    ref = prompt_embeds(prompt, tokenize, lambda ids: table[ids], torch.cat,
                        torch.from_numpy(visual_tokens).float(), question)
    got = prompt_embeds(prompt, tokenize, embed, np.concatenate, visual_tokens.astype(np.float32), question)
    return ref, got


def _teacher_forced(lm, decoder, embed, ref_embeds: torch.Tensor, got_embeds: np.ndarray, positions):
    """Reference greedy continuation from PyTorch, then both models scored on prompt + that continuation."""
    table = lm.get_input_embeddings().weight.detach()
    with torch.no_grad():
        gen = lm.generate(inputs_embeds=ref_embeds[None], max_new_tokens=positions, do_sample=False,
                          min_new_tokens=positions, pad_token_id=0)[0, -positions:]
        full = torch.cat([ref_embeds, table[gen]])[None]
        ref = lm(inputs_embeds=full).logits[0, -positions - 1:-1].numpy()
    decoder.rewind(0)
    # The prompt in one prefill (as the runtime does), then the continuation one token at a time.
    got = [decoder.forward(got_embeds)]
    for tok in gen[:-1].tolist():
        got.append(decoder.forward(embed([tok])))
    got = np.stack(got)
    # greedy from the exported model's own choices
    decoder.rewind(len(got_embeds))
    logits, own = got[0], []
    for _ in range(positions):
        tok = int(np.argmax(logits))
        own.append(tok)
        logits = decoder.forward(embed([tok]))
    ref_ids = gen.tolist()
    first = next((i for i, (a, b) in enumerate(zip(own, ref_ids)) if a != b), positions)
    return _cos(ref, got), _top5(ref, got), first


def _summary(cos, top5, diverge, positions):
    cos, top5 = np.concatenate(cos), np.concatenate(top5)
    return {"positions_per_prompt": positions, "prompts": len(diverge), "min_cosine": float(cos.min()),
            "mean_cosine": float(cos.mean()), "mean_top5_overlap": float(top5.mean()),
            "min_top5_overlap": float(top5.min()), "greedy_first_divergence": [int(d) for d in diverge]}


def _with_ratio(fig: dict) -> dict:
    ppl = fig["perplexity"]
    return {**fig, "perplexity": {**ppl, "ratio": ppl["exported"] / ppl["reference"]}}


def verdict(fig: dict, precision: str) -> dict:
    """The figures of `measure` with their threshold, a line of what was measured, and whether it passed."""
    fig = _with_ratio(fig)
    tf = [fig["teacher_forced"]] + ([fig["teacher_forced_video"]] if "teacher_forced_video" in fig else [])
    if precision == "fp32":
        ok = fig["teacher_forced"]["min_cosine"] >= 0.9999
        rule = "teacher-forced min cosine >= 0.9999"
    else:
        ok = fig["perplexity"]["ratio"] <= MAX_PPL_RATIO and all(t["mean_top5_overlap"] >= MIN_TOP5 for t in tf)
        rule = f"perplexity <= {MAX_PPL_RATIO}x PyTorch's and teacher-forced mean top-5 overlap >= {MIN_TOP5}"
    measured = (f"perplexity {fig['perplexity']['ratio']:.3f}x, top-5 overlap "
                + "/".join(f"{t['mean_top5_overlap']:.2f}" for t in tf))
    return {**fig, "threshold": rule, "measured": measured, "passed": bool(ok)}


def nf4_verdict(fig: dict) -> dict:
    """The nf4 copy's entry, in the same shape: its perplexity ({"exported", "reference"}: PyTorch's fp32) under
    the int4 gate's ceiling."""
    fig = _with_ratio(fig)
    ratio = fig["perplexity"]["ratio"]
    return {**fig, "threshold": f"perplexity <= {MAX_PPL_RATIO}x PyTorch's", "measured": f"perplexity {ratio:.3f}x",
            "passed": bool(ratio <= MAX_PPL_RATIO)}
