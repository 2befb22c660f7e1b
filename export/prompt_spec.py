"""Rendering the checkpoint's chat template into the manifest's prompt section (prefix / suffix around the user
turn), so the runtime needs no Jinja and no transformers."""
from __future__ import annotations

SENTINEL = "\x00USER_TURN\x00"
# LLaVA-1.5's conversation format, for checkpoints that ship no chat template.
FALLBACK = ("USER: ", " ASSISTANT:")


def prompt_spec(tokenizer, image_token: str, eos_ids: list[int]) -> dict:
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": SENTINEL}], tokenize=False,
                                             add_generation_prompt=True)
        prefix, suffix = text.split(SENTINEL)
        source, add_special = "chat_template", False  # templates carry their own BOS, as in transformers
    else:
        (prefix, suffix), source, add_special = FALLBACK, "llava-1.5 default", True
    end_of_turn = [t for t in ("<|im_end|>", "<|eot_id|>", "<|end|>", "</s>") if t in suffix or t in prefix]
    ids = set(eos_ids)
    for t in end_of_turn:
        tid = tokenizer.convert_tokens_to_ids(t)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return {"prefix": prefix, "suffix": suffix, "image_token": image_token, "source": source,
            "add_special_tokens": add_special, "eos_token_ids": sorted(ids), "stop_strings": end_of_turn}


def eos_ids(model, tokenizer) -> list[int]:
    found = set()
    for cfg in (getattr(model, "generation_config", None), model.config, getattr(model.config, "text_config", None)):
        eid = getattr(cfg, "eos_token_id", None) if cfg is not None else None
        found.update(eid if isinstance(eid, (list, tuple)) else [eid] if eid is not None else [])
    if tokenizer.eos_token_id is not None:
        found.add(tokenizer.eos_token_id)
    return sorted(found)
