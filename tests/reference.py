"""The reference pipeline, the way the official SlowFast-LLaVA code runs: Hugging Face transformers in fp32, the
same frames, SlowFast pooling in PyTorch, the visual tokens spliced at the image placeholder, greedy generate."""
from __future__ import annotations

import torch

from sfedge.export.aggregator import reference_tokens
from sfedge.export.vision import reference_features
from sfedge.runtime.prompt import build


def visual_tokens(model, vision: dict, agg: dict, frames) -> torch.Tensor:
    with torch.no_grad():
        feats = reference_features(model, vision, torch.from_numpy(frames))
        return reference_tokens(feats, agg["slow_frames"], vision["patch_grid"], int(vision["has_cls_token"]),
                                agg["slow_pool"], agg["fast_grid"])


def answer_ids(model, tokenizer, manifest: dict, frames, question: str, max_new_tokens: int) -> list[int]:
    p = manifest["prompt"]
    text = build(p, question)  # the template's text; tokenized here by transformers' own tokenizer
    tokens = visual_tokens(model, manifest["vision"], manifest["aggregator"], frames)
    pre = tokenizer(text.prefix, add_special_tokens=p["add_special_tokens"])["input_ids"]
    post = tokenizer(text.question, add_special_tokens=False)["input_ids"]
    table = model.get_input_embeddings().weight
    with torch.no_grad():
        embeds = torch.cat([table[pre], tokens, table[post]])[None]
        out = model.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=p["eos_token_ids"],
                             pad_token_id=p["eos_token_ids"][0])
    ids = out[0].tolist()
    return [t for t in ids if t not in p["eos_token_ids"]]
