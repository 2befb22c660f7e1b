"""A checkpoint's weights, one tensor at a time, straight from its files in the dtype they are stored in (bf16 or
fp16 on the hub): the export never holds a whole language model.

Names are the model's own module names (`model.language_model.layers.0...`, `lm_head.weight`,
`model.vision_tower...`), translated from the files' layout (the hub's `language_model.model.layers.0...`,
`vision_tower.vision_model...`) by the renames transformers' own loading applies.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from sfedge.runtime.errors import BadCheckpoint

LANGUAGE = "model.language_model."


def renamer(model):
    """Checkpoint key -> `model`'s parameter name, by the conversion mapping from_pretrained applies to `model`'s
    class (a meta-device model is enough)."""
    from transformers import conversion_mapping, core_model_loading

    transforms = conversion_mapping.get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, core_model_loading.WeightRenaming)]
    if len(renamings) != len(transforms):  # converters merge or split tensors: not a per-tensor read
        raise BadCheckpoint(f"{type(model).__name__}: its checkpoint layout needs tensor conversions that a "
                            f"streamed export does not do")
    names = model.state_dict()
    return lambda key: core_model_loading.rename_source_key(key, renamings, [], model.base_model_prefix, names)[0]


class Shards:
    """Every tensor name of the checkpoint -> the file holding it; `get` reads one tensor."""

    def __init__(self, folder: Path, rename=lambda key: key):
        self.folder, self.rename = Path(folder), rename
        self.where = {rename(name): path for name, path in _locate(self.folder).items()}
        self._open = {}

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def names(self, prefix: str = "") -> list[str]:
        return [n for n in self.where if n.startswith(prefix)]

    def get(self, name: str, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """One tensor, converted to `dtype` (None: as stored)."""
        path = self.where.get(name)
        if path is None:
            raise BadCheckpoint(f"{self.folder}: no tensor {name} in the checkpoint's weights")
        try:
            tensor = self._file(path)[name]
            return tensor if dtype is None else tensor.to(dtype)
        except (OSError, RuntimeError, ValueError) as e:
            raise BadCheckpoint(f"{path}: cannot read {name} ({e})") from None

    def state_dict(self, prefix: str, dtype=torch.float32) -> dict[str, torch.Tensor]:
        """The tensors under `prefix`, keyed by the rest of their name."""
        return {n[len(prefix):]: self.get(n, dtype) for n in self.names(prefix)}

    def close(self) -> None:
        """Unmap the files read so far: mapped pages a read touched count as this process's resident memory until
        then, so a pass over a 14 GB checkpoint would otherwise look like 14 GB resident."""
        self._open.clear()

    def _file(self, path: Path):
        if path not in self._open:
            self._open[path] = _Reader(path, self.rename)
        return self._open[path]


class _Reader:
    """Tensors of one file by their model name: safetensors through safe_open, a PyTorch .bin memory-mapped."""

    def __init__(self, path: Path, rename):
        self.path = path
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            self.handle = safe_open(path, "pt")
            self.stored = {rename(n): n for n in self.handle.keys()}
        else:
            self.handle = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            self.stored = {rename(n): n for n in self.handle}

    def __getitem__(self, name: str) -> torch.Tensor:
        stored = self.stored[name]
        if isinstance(self.handle, dict):
            return self.handle[stored]
        return self.handle.get_tensor(stored)


def _locate(folder: Path) -> dict[str, Path]:
    """Stored tensor name -> file, from the shard index if there is one, checking every shard it names."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.exists():
            return _from_index(index)
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise BadCheckpoint(f"{folder}: no weights (*.safetensors or pytorch_model*.bin) next to config.json")
    where = {}
    for f in files:
        where.update(dict.fromkeys(_tensor_names(f), f))
    return where


def _from_index(index: Path) -> dict[str, Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise BadCheckpoint(f"{index}: broken shard index ({e})") from None
    where = {}
    for shard in sorted(set(weight_map.values())):
        path = index.parent / shard
        if not path.exists():
            raise BadCheckpoint(f"{index}: names shard {shard}, which is missing from {index.parent}")
        stored = set(_tensor_names(path))
        absent = [n for n, s in weight_map.items() if s == shard and n not in stored]
        if absent:
            raise BadCheckpoint(f"{path}: lacks {absent[0]} (and {len(absent) - 1} more) that {index.name} "
                                f"places there")
    for name, shard in weight_map.items():
        where[name] = index.parent / shard
    return where


def _tensor_names(path: Path) -> list[str]:
    """The names a file holds, after checking it is whole: a truncated download is the usual broken checkpoint."""
    if path.suffix != ".safetensors":
        try:
            return list(torch.load(path, map_location="cpu", mmap=True, weights_only=True))
        except Exception as e:  # torch raises RuntimeError, pickle errors, EOFError... for a broken file
            raise BadCheckpoint(f"{path}: not a readable PyTorch weights file ({type(e).__name__}: {e})") from None
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n)) if 8 + n <= size else None
    except (struct.error, ValueError, UnicodeDecodeError):
        header = None
    if not isinstance(header, dict):
        raise BadCheckpoint(f"{path}: not a safetensors file (unreadable header)")
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise BadCheckpoint(f"{path}: truncated ({size:,} bytes, its header needs {8 + n + end:,}); download it "
                            f"again")
    return [k for k in header if k != "__metadata__"]
