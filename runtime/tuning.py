"""Measurements that depend on the machine, taken once per CPU kind and kept in ~/.cache/sfedge/machine.json: the
read bandwidth (targets.py), and whether the int8 prefill twin beats the 4-bit decoder (llm.py). A constant tuned
on one CPU kind is wrong on another (AMD EPYC against Intel Xeon with AMX, at the same core count), so the keys
name the CPU kind (cpu.describe)."""
from __future__ import annotations

import json
import os
from pathlib import Path


def _path() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sfedge" / "machine.json"


def _read() -> dict:
    try:
        known = json.loads(_path().read_text())
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


def lookup(name: str, key: str):
    """The value measured for `key` under `name`, or None."""
    section = _read().get(name)
    return section.get(key) if isinstance(section, dict) else None


def store(name: str, key: str, value) -> None:
    known = _read()
    section = known.get(name) if isinstance(known.get(name), dict) else {}
    known[name] = {**section, key: value}
    try:
        _path().parent.mkdir(parents=True, exist_ok=True)
        tmp = _path().with_suffix(".tmp")
        tmp.write_text(json.dumps(known, indent=1))
        tmp.replace(_path())  # whole or not at all: two runtimes may start at once
    except OSError:
        pass  # a read-only home only costs measuring again next time
