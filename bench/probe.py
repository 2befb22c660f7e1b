"""The machine a report was measured on, and how fast it reads memory (the ceiling of a decode step)."""
from __future__ import annotations

import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def read_bandwidth(gb: float = 0.5) -> float:
    """Bytes per second read from memory by all cores at once (numpy sums, which release the GIL, over parts of
    an array far larger than the caches): what the decoders can use."""
    n = os.cpu_count() or 1
    a = np.ones(int(gb * 1e9 / 8))
    parts = np.array_split(a, n)
    with ThreadPoolExecutor(n) as pool:
        list(pool.map(np.sum, parts))
        t = []
        for _ in range(5):
            t0 = time.perf_counter()
            list(pool.map(np.sum, parts))
            t.append(time.perf_counter() - t0)
    return a.nbytes / min(t)
