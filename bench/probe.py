"""The machine a report was measured on."""
from __future__ import annotations

import os
import platform
from pathlib import Path


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
