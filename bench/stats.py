"""Medians with their ranges, and ratios against the reference."""
from __future__ import annotations

import statistics


def summarize(values: list[float]) -> dict:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def ratio(ours: dict, ref: dict, higher_is_better: bool) -> float | None:
    """How many times better ours is: ours / reference for rates, reference / ours for times."""
    if not ours["median"] or not ref["median"]:
        return None
    return ours["median"] / ref["median"] if higher_is_better else ref["median"] / ours["median"]


def peak_mb(runs: list[dict]) -> dict:
    """The workers' peak resident memory, in MB."""
    return summarize([x["peak_rss"] / 1e6 for x in runs])
