"""The machine a report was measured on, and how fast it reads memory (the ceiling of a decode step)."""
from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor

import numpy as np


FLAGS = ("avx512f", "avx512_vnni", "amx_tile")  # what decides which int8/int4 kernels run fast


def cpu_model() -> str:
    """'AMD EPYC (avx512f, avx512_vnni)': figures differ by CPU kind, so every report names it (Linux)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown CPU"
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = [f for f in FLAGS if f in fields.get("flags", "").split()]
    return f"{fields.get('model name', 'unknown CPU')} ({', '.join(flags) or 'no AVX-512'})"


def machine() -> str:
    return f"{cpu_model()}, {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


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
