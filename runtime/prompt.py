"""The prompt: the checkpoint's chat template, rendered at export into a prefix and a suffix around the user's
turn (manifest "prompt"), and SlowFast-LLaVA's two answer styles.

  prefix + <image tokens> + "\\n" + question + suffix + answer_start

The part up to and including the visual tokens is the same for every question about a video, so its KV cache is
kept and reused across questions.
"""
from __future__ import annotations

import unicodedata
from dataclasses import dataclass

from .errors import BadInput

STYLES = {
    "plain": "",
    "open-ended": "In the video,",  # SlowFast-LLaVA's open-ended prefill
    "multiple-choice": "Best option:(",  # and its multiple-choice one
}
MAX_QUESTION_CHARS = 20_000


@dataclass
class Prompt:
    prefix: str  # before the visual tokens
    question: str  # after them: "\n" + question + suffix + answer start
    answer_start: str


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


def build(spec: dict, question: str, style: str = "plain", options: list[str] | None = None) -> Prompt:
    if style not in STYLES:
        raise BadInput(f"prompt style {style!r}: choose one of {', '.join(STYLES)}")
    question = clean_question(question)
    if options:
        letters = [chr(ord("A") + i) for i in range(len(options))]
        listed = "\n".join(f"({l}) {clean_question(o)}" for l, o in zip(letters, options))
        question = f"{question}\nOptions:\n{listed}\nAnswer with the option's letter from the given choices directly."
        style = "multiple-choice" if style == "plain" else style
    answer_start = STYLES[style]
    return Prompt(spec["prefix"], "\n" + question + spec["suffix"] + answer_start, answer_start)
