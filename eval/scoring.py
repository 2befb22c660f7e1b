"""Which option an answer chose. The runtime's multiple-choice answers start with the prefill "Best option:(" and
go on with what the model generated, "B) red" say; models that wander get a few more chances to be understood, and
an answer that names no option is counted wrong (it stays in the denominator; its rate is reported). Under the
"text" choice (prompt.CHOICES) the answer's text is not read: the option the model finds likeliest is its choice."""
from __future__ import annotations

import re
from typing import NamedTuple

from sfedge.runtime.prompt import STYLES, letters

PREFILL = STYLES["multiple-choice"]


class Choice(NamedTuple):
    index: int | None  # into the options; None when the answer names none
    kind: str  # how it was read: "letter", "text", "likeliest", or why not: "empty", "unparsed"


def choose(text: str | None, options: list[str], logprobs: list[float] | None = None) -> Choice:
    """The option an answer chose. Given the options' log-probabilities as the answer (the "text" choice), the
    likeliest. Otherwise, read from the text by these rules in order: a leading option letter (not the start of a
    word); a letter written "(C)" or "answer is C"; the one option whose text the answer contains as whole words."""
    if logprobs is not None:
        return Choice(max(range(len(options)), key=logprobs.__getitem__), "likeliest")
    body = (text or "").strip()
    if body.startswith(PREFILL):
        body = body[len(PREFILL):].strip()
    if not body:
        return Choice(None, "empty")
    valid = letters(len(options))
    # Upper case only: a leading "a" is far more often the article than option A.
    lead = re.match(r"\(?([A-Z])(?![A-Za-z])", body)
    if lead and lead.group(1) in valid:
        return Choice(valid.index(lead.group(1)), "letter")
    for m in re.finditer(r"\(([A-Z])\)|answer is:?\s*\(?([A-Z])(?![A-Za-z])", body, re.IGNORECASE):
        letter = m.group(1) or m.group(2)
        if letter in valid:  # the pattern ignores case; the letter itself must be upper case
            return Choice(valid.index(letter), "letter")
    lowered = body.lower()
    named = [i for i, o in enumerate(options)
             if re.search(r"(?<!\w)" + re.escape(o.strip().lower()) + r"(?!\w)", lowered)]
    if len(named) == 1:
        return Choice(named[0], "text")
    return Choice(None, "unparsed")
