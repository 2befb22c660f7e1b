"""The reference pipeline, the way the official SlowFast-LLaVA code runs: Hugging Face transformers in fp32, the
same frames, SlowFast pooling in PyTorch, the visual tokens between the prompt's prefix and question (built by
`sfedge.runtime.prompt.embeds`, as the runtime builds them), greedy generate. The bench's e2e reference and the
tests' token-for-token check both run it."""
from __future__ import annotations

import numpy as np
import torch

from sfedge.export.aggregator import reference_tokens
from sfedge.export.vision import reference_features
from sfedge.runtime import prompt


def visual_tokens(model, vision: dict, agg: dict, frames: np.ndarray) -> torch.Tensor:
    """uint8 frames [T, H, W, 3] -> the SlowFast visual tokens [N, D]."""
    with torch.no_grad():
        feats = reference_features(model, vision, torch.from_numpy(frames))
        return reference_tokens(feats, agg["slow_frames"], vision["patch_grid"], int(vision["has_cls_token"]),
                                agg["slow_pool"], agg["fast_grid"])


def prompt_embeds(model, tokenizer, manifest: dict, frames: np.ndarray, question: str) -> torch.Tensor:
    """prefix + visual tokens + question as embeddings [1, n, D], tokenized by transformers' own tokenizer."""
    table = model.get_input_embeddings().weight
    tokenize = prompt.transformers_tokenize(tokenizer)
    visual = visual_tokens(model, manifest["vision"], manifest["aggregator"], frames)
    with torch.no_grad():
        return prompt.embeds(manifest["prompt"], tokenize, lambda ids: table[ids], torch.cat, visual, question)[None]


def generate(model, tokenizer, manifest: dict, frames: np.ndarray, question: str, max_new_tokens: int,
             min_new_tokens: int | None = None, streamer=None) -> list[int]:
    """The generated token ids (EOS included when it came)."""
    eos = manifest["prompt"]["eos_token_ids"]
    embeds = prompt_embeds(model, tokenizer, manifest, frames, question)
    with torch.no_grad():
        out = model.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                             max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=False,
                             streamer=streamer, eos_token_id=eos, pad_token_id=eos[0])
    return out[0].tolist()  # generate() on inputs_embeds returns only the new tokens


def answer_ids(model, tokenizer, manifest: dict, frames: np.ndarray, question: str, max_new_tokens: int) -> list[int]:
    """The answer's token ids, EOS left out."""
    eos = manifest["prompt"]["eos_token_ids"]
    return [t for t in generate(model, tokenizer, manifest, frames, question, max_new_tokens) if t not in eos]
