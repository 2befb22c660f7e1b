"""The reference pipeline, the way the official SlowFast-LLaVA code runs: Hugging Face transformers in fp32, the
same frames, SlowFast pooling in PyTorch, the visual tokens between the prompt's prefix and question (built by
`sfedge.runtime.prompt.embeds`, as the runtime builds them), greedy generate. The bench's e2e reference, sf-eval's
--reference and the tests' token-for-token check all run it."""
from __future__ import annotations

import numpy as np
import torch

from sfedge.runtime import prompt

from .aggregator import SlowFastAggregator, reference_tokens
from .vision import reference_features


def visual_tokens(model, vision: dict, agg: dict, frames: np.ndarray, slow: list | None = None,
                  fast: list | None = None) -> torch.Tensor:
    """uint8 frames [T, H, W, 3] -> the SlowFast visual tokens [N, D]: uniform (the slow frames spread over the T,
    every frame fast), or the slow and fast pathways given as positions in `frames` (question-aware selection)."""
    grid, skip = vision["patch_grid"], int(vision["has_cls_token"])
    with torch.no_grad():
        feats = reference_features(model, vision, torch.from_numpy(frames))
        if slow is None:
            return reference_tokens(feats, agg["slow_frames"], grid, skip, agg["slow_pool"], agg["fast_grid"])
        pool = SlowFastAggregator(grid, skip, agg["slow_pool"], agg["fast_grid"])
        return pool(feats, torch.tensor(slow), torch.tensor(fast))


def prompt_embeds(model, tokenizer, manifest: dict, frames: np.ndarray, question: str,
                  options: list | None = None, slow: list | None = None, fast: list | None = None,
                  choice: str = "letter") -> torch.Tensor:
    """prefix + visual tokens + question as embeddings [1, n, D], tokenized by transformers' own tokenizer."""
    table = model.get_input_embeddings().weight
    tokenize = prompt.transformers_tokenize(tokenizer)
    visual = visual_tokens(model, manifest["vision"], manifest["aggregator"], frames, slow, fast)
    with torch.no_grad():
        return prompt.embeds(manifest["prompt"], tokenize, lambda ids: table[ids], torch.cat, visual, question,
                             options=options, choice=choice)[None]


def generate(model, tokenizer, manifest: dict, frames: np.ndarray, question: str, max_new_tokens: int,
             min_new_tokens: int | None = None, streamer=None, embeds: torch.Tensor | None = None) -> list[int]:
    """The generated token ids (EOS included when it came); `embeds`: the prompt, if already built."""
    eos = manifest["prompt"]["eos_token_ids"]
    if embeds is None:
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
