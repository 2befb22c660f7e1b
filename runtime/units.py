"""Sizes as people write them and read them: '6GB' -> bytes, bytes -> '6.0 GB' (GB = 10^9, GiB = 2^30)."""
from __future__ import annotations

from .errors import BadInput


def parse_size(text: str) -> int:
    """'6GB', '512MB', '1.5GiB', '2000000' -> bytes (GB = 10^9, GiB = 2^30)."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
             "GIB": 2**30, "TIB": 2**40, "K": 10**3, "M": 10**6, "G": 10**9}
    s = str(text).strip().upper().replace(" ", "")
    num = s.rstrip("KMGTIB")
    unit = s[len(num):]
    try:
        value = float(num)
    except ValueError:
        raise BadInput(f"size {text!r}: expected a number with a unit such as 512MB or 6GB") from None
    if unit not in units or value <= 0:
        raise BadInput(f"size {text!r}: expected a positive number with a unit such as 512MB or 6GB")
    return int(value * units[unit])


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
