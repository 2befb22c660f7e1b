"""Resident memory of this process: current, and the peak since start (the kernel's high-water mark)."""
from __future__ import annotations

import sys


def peak_rss() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def current_rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss
