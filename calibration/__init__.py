"""Calibration data for export: chat prompts and technical prose for the language model's statistics, English prose
for its perplexity check, frames from videos for the vision graph's fidelity checks (`frames`). Videos are read
through the runtime's decoder."""
from __future__ import annotations

from importlib.resources import files


def prompts() -> list[str]:
    return [p for p in files(__package__).joinpath("data/prompts.txt").read_text().splitlines() if p.strip()]


def english_text() -> str:
    """~2,000 tokens of English prose (the GNU GPL v3 text) for perplexity."""
    return files(__package__).joinpath("data/english.txt").read_text()


def prose(tokenize, tokens: int, piece: int = 512) -> list[list[int]]:
    """About `tokens` tokens of varied technical English for the language model's calibration: the first `piece`
    tokens of each topic of Python's own reference manual (the standard library's pydoc_data, on every machine
    Python is), in order. Kept apart from `english_text`, which the perplexity check reads."""
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # some distributions split the standard library
        raise RuntimeError("calibration prose comes from Python's pydoc_data module, which this Python lacks; "
                           "install its full standard library (Debian: libpython3-stdlib)") from e
    out, total = [], 0
    for name in sorted(topics):
        if total >= tokens:
            break
        ids = tokenize(topics[name])[:min(piece, tokens - total)]
        out.append(ids)
        total += len(ids)
    return out
