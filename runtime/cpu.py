"""Which CPU this is. Speed differs by CPU kind (AMD EPYC against Intel Xeon with AMX, at the same core count), so
benchmark reports name it and per-machine caches (bandwidth, tuned settings) are keyed by it."""
from __future__ import annotations

import os
import platform
from functools import lru_cache
from pathlib import Path

FLAGS = ("avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8")  # picks the int8/int4 kernels
VNNI = ("avx512_vnni", "avx_vnni", "amx_int8")  # int8 dot products without an int16 step that saturates
INT8_SAFE_LIMIT = 64  # int8 weights within +-64 never saturate it: 255 * 64 * 2 = 32640 < 32767


@lru_cache(maxsize=1)
def info() -> tuple[str, tuple[str, ...]]:
    """(model name, the flags of interest it has); from /proc/cpuinfo on Linux."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown CPU", ()
    fields = {}
    for line in text.splitlines():  # the first processor's block is enough: the cores are alike
        if ":" in line:
            k, v = line.split(":", 1)
            fields.setdefault(k.strip(), v.strip())
    have = set(fields.get("flags", "").split())
    return fields.get("model name", "unknown CPU"), tuple(f for f in FLAGS if f in have)


def describe() -> str:
    """'AMD EPYC (avx512f, avx512_vnni, avx512_bf16), 2 cores': what every figure is measured on."""
    name, flags = info()
    return f"{name} ({', '.join(flags) or 'no AVX-512'}), {os.cpu_count()} cores"


def saturates_int8() -> bool:
    """Whether ONNX Runtime's int8 GEMM adds uint8 x int8 product pairs in int16 with saturation here (x86 without
    VNNI): int8 weights beyond INT8_SAFE_LIMIT then overflow it."""
    return platform.machine().lower() in ("x86_64", "amd64") and not set(VNNI) & set(info()[1])


def int8_weights_overflow(limit: int | None) -> bool:
    """Whether int8 weights within +-limit (None: a bundle exported before the limit, full range) overflow here."""
    return (limit or 127) > INT8_SAFE_LIMIT and saturates_int8()
