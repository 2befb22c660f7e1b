"""Peak memory of a process tree: a batch job is a driver and its workers (and, on Ray, the cluster's own
processes), so one process's high-water mark says little. Proportional set sizes (PSS) are summed, so libraries
shared between the workers count once; Linux only."""
from __future__ import annotations

import os
import threading
from pathlib import Path


class TreeMemory:
    """`with TreeMemory() as mem: ...` then `mem.peak`: the largest total PSS of this process's descendants (and
    of this process itself with `include_self`), sampled every `interval` seconds."""

    def __init__(self, include_self: bool = False, interval: float = 0.2):
        self.include_self, self.interval, self.peak = include_self, interval, 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> "TreeMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()

    def _sample(self) -> None:
        while True:
            pids = descendants(os.getpid()) + ([os.getpid()] if self.include_self else [])
            self.peak = max(self.peak, sum(pss(p) for p in pids))
            if self._done.wait(self.interval):
                return


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # The command name (field 2) may hold spaces and parentheses: the parent pid follows the last ")".
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # it exited while we looked
        children.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], [root]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def pss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0
