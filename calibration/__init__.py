"""Calibration data for export: chat prompts and English prose for the language model, frames from videos for the
vision graph's fidelity checks (`frames`). Videos are read through the runtime's decoder."""
from __future__ import annotations

from importlib.resources import files


def prompts() -> list[str]:
    return [p for p in files(__package__).joinpath("data/prompts.txt").read_text().splitlines() if p.strip()]


def english_text() -> str:
    """~2,000 tokens of English prose (the GNU GPL v3 text) for perplexity."""
    return files(__package__).joinpath("data/english.txt").read_text()
