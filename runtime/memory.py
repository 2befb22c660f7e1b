"""This process's memory (peak and now) and the machine's memory available, from /proc on Linux."""
from __future__ import annotations

import os
import sys


def peak_rss() -> int:
    """The high-water mark of this program's memory. Linux: VmHWM, which starts afresh at exec (ru_maxrss would
    carry over the parent's peak into a worker process)."""
    peak = _proc_kib("/proc/self/status", "VmHWM:")
    if peak is not None:
        return peak
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def current_rss() -> int:
    """Resident memory now (Linux; 0 where /proc is missing): what a long-running watch reports to show it does not
    grow."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def total_memory() -> int | None:
    """MemTotal (Linux; None elsewhere)."""
    return _proc_kib("/proc/meminfo", "MemTotal:")


def give_back() -> None:
    """Return freed heap memory to the system (glibc keeps it otherwise, so a stage's peak would stay resident for
    the rest of a long export)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def available_memory() -> int | None:
    """MemAvailable: what new processes can use without swapping (Linux; None elsewhere)."""
    return _proc_kib("/proc/meminfo", "MemAvailable:")


def _proc_kib(path: str, key: str) -> int | None:
    """A "Key: N kB" line of a /proc file, in bytes."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
