"""The machine a report was measured on: the CPU kind, its cores, and its measured read bandwidth."""
from __future__ import annotations

import platform

from sfedge.runtime import cpu
from sfedge.runtime.memory import total_memory
from sfedge.runtime.targets import cached_bandwidth


def machine() -> str:
    bandwidth = cached_bandwidth(total_memory() or 0)
    python = platform.python_version()
    return f"{cpu.describe()}, {platform.machine()}, {bandwidth / 1e9:.1f} GB/s read, Python {python}"
