"""The token embedding table, looked up in numpy: fp16, fp32, or int8 with one scale per row. Memory-mapped, so only the
rows a prompt touches are read."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import BadBundle


class Embeddings:
    def __init__(self, root: Path, spec: dict):
        self.dtype = spec["dtype"]
        files = spec["files"]
        try:
            self.table = np.load(root / files["table"], mmap_mode="r", allow_pickle=False)
            self.scale = (np.load(root / files["scale"], allow_pickle=False) if self.dtype == "int8" else None)
        except (ValueError, OSError) as e:
            raise BadBundle(f"{root / files['table']}: cannot read the embedding table ({e})") from None
        if self.dtype not in ("float16", "float32", "int8") or self.table.ndim != 2:
            raise BadBundle(f"{root / files['table']}: expected a 2-D float16, float32 or int8 table, got "
                            f"{self.table.dtype} {self.table.shape}")

    def __call__(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        rows = self.table[ids].astype(np.float32)
        return rows * self.scale[ids, None] if self.scale is not None else rows
