"""Everything about the prompt, in one place: the checkpoint's chat template rendered at export into a prefix and a
suffix around the user's turn (the manifest's "prompt" section, so the runtime needs no Jinja), its special
tokens, end-of-sequence ids and stop strings, SlowFast-LLaVA's answer prefills, and the assembly of

  prefix + <visual tokens> + "\\n" + question + suffix + answer_start

as embeddings, shared by the runtime, the export's fidelity check, the bench and the tests' reference. The part up
to and including the visual tokens is the same for every question about a video, so its KV cache is reused.
"""
from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Any, Callable

from .errors import BadInput

STYLES = {
    "plain": "",
    "open-ended": "In the video,",  # SlowFast-LLaVA's open-ended prefill
    "multiple-choice": "Best option:(",  # and its multiple-choice one
}
# How a multiple-choice answer is chosen. "letter": the options are listed in the question and the answer is the
# letter of one (SlowFast-LLaVA's and MVBench's format). "text": the question is asked as is and each option's own
# text is scored as the answer (lm-evaluation-harness's cloze form; small language models, which cannot read a
# letter off a list, answer this way).
CHOICES = ("letter", "text")
MAX_QUESTION_CHARS = 20_000
SENTINEL = "\x00USER_TURN\x00"
FALLBACK = ("USER: ", " ASSISTANT:")  # LLaVA-1.5's conversation format, for checkpoints that ship no chat template
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "</s>")

# A tokenizer as the prompt sees it: (text, add_special_tokens) -> ids. The runtime passes the bundle's
# tokenizers.Tokenizer, the export and the reference transformers' tokenizer; both tokenize the same text.
Tokenize = Callable[[str, bool], list]


@dataclass
class Prompt:
    prefix: str  # before the visual tokens
    question: str  # after them: "\n" + question + suffix + answer start
    answer_start: str


@dataclass
class PromptIds:
    prefix: list  # token ids before the visual tokens (with BOS where the template wants it)
    question: list  # token ids after them
    answer_start: str
    option_ids: list  # with options, per option: the answer's tokens that choose it (its letter, or its text)


def transformers_tokenize(tokenizer) -> Tokenize:
    """A transformers tokenizer as a `Tokenize` (export and reference side; duck-typed, no import)."""
    return lambda text, special: tokenizer(text, add_special_tokens=special)["input_ids"]


def spec_from_tokenizer(tokenizer, eos_ids: list[int]) -> dict:
    """The manifest's "prompt" section from a transformers tokenizer (export side; duck-typed, no import)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": SENTINEL}], tokenize=False,
                                             add_generation_prompt=True)
        prefix, suffix = text.split(SENTINEL)
        # As the checkpoint's processor tokenizes the rendered template: with special tokens, so a tokenizer that
        # adds a BOS (Llama/Vicuna's <s>) adds it, unless the template already wrote it (transformers' own rule).
        bos = getattr(tokenizer, "bos_token", None)
        adds_bos = bos is not None and tokenizer("", add_special_tokens=True)["input_ids"][:1] == [
            tokenizer.bos_token_id]
        source, add_special = "chat_template", adds_bos and not prefix.startswith(bos)
    else:
        (prefix, suffix), source, add_special = FALLBACK, "llava-1.5 default", True
    end_of_turn = [t for t in END_OF_TURN if t in suffix or t in prefix]
    ids = set(eos_ids)
    for t in end_of_turn:
        tid = tokenizer.convert_tokens_to_ids(t)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return {"prefix": prefix, "suffix": suffix, "source": source, "add_special_tokens": add_special,
            "eos_token_ids": sorted(ids), "stop_strings": end_of_turn}


def eos_ids(model, tokenizer) -> list[int]:
    """Every end-of-sequence id a checkpoint declares: generation config, model config, text config, tokenizer."""
    found = set()
    for cfg in (getattr(model, "generation_config", None), model.config, getattr(model.config, "text_config", None)):
        eid = getattr(cfg, "eos_token_id", None) if cfg is not None else None
        found.update(eid if isinstance(eid, (list, tuple)) else [eid] if eid is not None else [])
    if tokenizer.eos_token_id is not None:
        found.add(tokenizer.eos_token_id)
    return sorted(found)


def clean_question(question: str) -> str:
    """Control characters (other than newline and tab) are removed; an empty question is refused."""
    if not isinstance(question, str):
        raise BadInput("the question must be text")
    if len(question) > MAX_QUESTION_CHARS:
        raise BadInput(f"the question has {len(question)} characters; at most {MAX_QUESTION_CHARS} are accepted")
    text = "".join(c for c in question if c in "\n\t" or unicodedata.category(c)[0] != "C").strip()
    if not text:
        raise BadInput("the question is empty")
    return text


def build(spec: dict, question: str, style: str = "plain", options: list[str] | None = None,
          choice: str = "letter") -> Prompt:
    """The prompt's text around the visual tokens. With options chosen by letter, the question lists them as
    (A) ... (B) ... and the answer starts with the multiple-choice prefill."""
    if style not in STYLES:
        raise BadInput(f"prompt style {style!r}: choose one of {', '.join(STYLES)}")
    if choice not in CHOICES:
        raise BadInput(f"choice {choice!r}: choose one of {', '.join(CHOICES)}")
    question = clean_question(question)
    if options and choice == "letter":
        listed = "\n".join(f"({l}) {clean_question(o)}" for l, o in zip(letters(len(options)), options))
        question = f"{question}\nOptions:\n{listed}\nAnswer with the option's letter from the given choices directly."
        style = "multiple-choice" if style == "plain" else style
    answer_start = STYLES[style]
    return Prompt(spec["prefix"], "\n" + question + spec["suffix"] + answer_start, answer_start)


def chat(spec: dict, text: str) -> str:
    """A text-only user turn in the template (the export's calibration and fidelity prompts)."""
    return spec["prefix"] + text + spec["suffix"]


def token_ids(spec: dict, tokenize: Tokenize, question: str, style: str = "plain",
              options: list[str] | None = None, choice: str = "letter") -> PromptIds:
    """The prompt as token ids: the prefix with the template's special tokens, the question part without."""
    p = build(spec, question, style, options, choice)
    return PromptIds(list(tokenize(p.prefix, spec["add_special_tokens"])), list(tokenize(p.question, False)),
                     p.answer_start, option_ids(tokenize, p.answer_start, options or [], choice))


def letters(n: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(n)]


def option_ids(tokenize: Tokenize, answer_start: str, options: list[str], choice: str = "letter") -> list[list]:
    """Per option, the tokens that choose it as the answer, right after the prefill: its letter's first token
    ("Best option:(A" less "Best option:("), or all of its text's. Tokenizers that merge or prefix spaces differ
    here, so it is read, not assumed."""
    base = list(tokenize(answer_start, False))
    texts = letters(len(options)) if choice == "letter" else [clean_question(o) for o in options]
    out = []
    for text in texts:
        ids = list(tokenize(answer_start + text, False))
        k = next((i for i, (a, b) in enumerate(zip(base, ids)) if a != b), len(base))
        if k >= len(ids):
            raise BadInput(f"option {text!r} has no token of its own after {answer_start!r}")
        out.append(ids[k:k + 1] if choice == "letter" else ids[k:])
    return out


def embeds(spec: dict, tokenize: Tokenize, embed: Callable[[list], Any], concat: Callable[[list], Any], visual,
           question: str, style: str = "plain", options: list[str] | None = None, choice: str = "letter") -> Any:
    """prefix + visual + question embeddings [n, D] in one array: `embed` maps ids to rows and `concat` joins
    them (numpy's or torch's), so the runtime and the PyTorch reference build the very same sequence."""
    ids = token_ids(spec, tokenize, question, style, options, choice)
    return concat([embed(ids.prefix), visual, embed(ids.question)])
