"""The bundle manifest: the one contract between export and runtime.

This module is the only place that knows the schema. Export builds a dict with `new_manifest`-shaped content and
writes it with `write`; the runtime reads it with `load`, which refuses anything it cannot trust: an unknown schema
version, a missing field, a path that leaves the bundle, an artifact whose size or sha256 does not match.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .errors import BadBundle
from .prompt import CHOICES

SCHEMA_VERSION = 1
TOOLKIT_VERSION = "0.1.0"
MANIFEST = "manifest.json"
ENGINES_DIR = "engines"  # TensorRT engines and timing caches: device-specific, optional (see `load`)
ORT_CACHE_DIR = ".engine-cache"  # ONNX Runtime's TensorRT engine cache: rewritten at run time, never hashed


class Maybe:
    """A field a bundle may leave out; checked like any other when present."""

    def __init__(self, kind):
        self.kind = kind


# field -> type, for every field the runtime reads. Nested dicts are checked recursively.
SCHEMA = {
    "schema_version": int,
    "toolkit_version": str,
    # repo_id and revision (the commit): a checkpoint named by its Hugging Face hub id
    "source": {"checkpoint": str, "architecture": str, "note": Maybe(str), "repo_id": Maybe(str),
               "revision": Maybe(str)},
    "vision": {
        "image_size": list, "patch_grid": list, "mean": list, "std": list, "select_layer": (int, list),
        "select_strategy": str, "has_cls_token": bool, "tokens_per_frame": int, "hidden_size": int,
        "graphs": dict, "int8_weight_limit": Maybe(int),
        "tower_dims": {"hidden_size": int, "intermediate_size": int, "num_heads": int, "num_layers": int},
    },
    "aggregator": {"graph": str, "num_frames": int, "slow_frames": int, "slow_pool": str, "fast_grid": list},
    "llm": {
        "graph": str, "external_data": Maybe(list), "precision": str, "num_layers": int, "num_heads": int,
        "num_kv_heads": int, "head_dim": int, "hidden_size": int, "intermediate_size": int, "vocab_size": int,
        "max_context": int, "embeddings": {"dtype": str, "files": dict}, "kv_dtype": str,
        # the decoder's prefill twin, with an fp32 cache, for prompts: an int8-KV bundle's (with the per-layer
        # scales that move caches between them), and with int8 weights (`prefill_weights`, in their own file)
        "prefill_graph": Maybe(str), "kv_scales": Maybe({"k_scales": list, "v_scales": list}),
        "prefill_weights": Maybe(str), "prefill_weight_limit": Maybe(int), "prefill_external_data": Maybe(list),
    },
    "tokenizer": str,
    # choice: how this model answers multiple choice unless told (prompt.CHOICES; "letter" when absent)
    "prompt": {"prefix": str, "suffix": str, "add_special_tokens": bool, "eos_token_ids": list,
               "stop_strings": list, "choice": Maybe(str)},
    "artifacts": dict,
    "fidelity": dict,
}
# Sections a bundle may have; checked like SCHEMA when present. `clip` and `prompt_pooling` come from
# sf-export --clip: question-aware frame selection and PPLLaVA's prompt-guided pooling.
OPTIONAL = {
    "clip": {
        "source": str, "model_type": str, "text_graph": str, "tokenizer": str, "context_length": int,
        "pad_token_id": int, "eos_token_id": int, "pad_to_context": bool, "embed_dim": int,
        "logit_scale": (int, float), "logit_bias": (int, float), "tower_match": bool, "tower_checksum": str,
    },
    "prompt_pooling": {"graph": str, "kernel": list, "temperature": (int, float)},
}
# One entry of the optional "engines" list: a TensorRT engine built by `sf-export --engines` on a target device.
ENGINE = {"role": str, "graph": str, "file": str, "precision": str, "profile": dict, "gpu": str,
          "compute_capability": str, "tensorrt": str}
ENGINE_ROLES = ("vision", "aggregator")
KV_DTYPES = ("float32", "int8")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def artifact_entries(root: Path) -> dict:
    """Size and sha256 of every file in the bundle folder except the manifest itself."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST and ORT_CACHE_DIR not in p.relative_to(root).parts:
            out[p.relative_to(root).as_posix()] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    return out


def write(root: Path, manifest: dict) -> None:
    manifest = {**manifest, "schema_version": SCHEMA_VERSION, "toolkit_version": TOOLKIT_VERSION,
                "artifacts": artifact_entries(root)}
    _check_fields(manifest, SCHEMA, root / MANIFEST, "")
    _check_optional(manifest, root / MANIFEST)
    _check_engines(manifest, root / MANIFEST)
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2))


def _check_fields(obj: dict, schema: dict, where: Path, prefix: str) -> None:
    for key, kind in schema.items():
        if isinstance(kind, Maybe):
            if key not in obj:
                continue
            kind = kind.kind
        if key not in obj:
            raise BadBundle(f"{where}: field '{prefix}{key}' is missing")
        if isinstance(kind, dict):
            if not isinstance(obj[key], dict):
                raise BadBundle(f"{where}: field '{prefix}{key}' must be an object")
            _check_fields(obj[key], kind, where, f"{prefix}{key}.")
        elif not isinstance(obj[key], kind) or (kind is int and isinstance(obj[key], bool)):
            raise BadBundle(f"{where}: field '{prefix}{key}' has the wrong type ({type(obj[key]).__name__})")
    if prefix == "llm.":
        if obj["kv_dtype"] not in KV_DTYPES:
            raise BadBundle(f"{where}: field 'llm.kv_dtype' must be one of {', '.join(KV_DTYPES)}")
        if obj["kv_dtype"] == "int8" and "prefill_graph" in obj and "kv_scales" not in obj:
            raise BadBundle(f"{where}: 'llm.prefill_graph' needs 'llm.kv_scales' (the int8 cache's scales)")
        twin_weights = obj.get("prefill_weights")
        if twin_weights not in (None, "int8") or (twin_weights and "prefill_graph" not in obj):
            raise BadBundle(f"{where}: 'llm.prefill_weights' must be 'int8', beside a 'llm.prefill_graph'")
        if "prefill_graph" in obj and obj["kv_dtype"] != "int8" and not twin_weights:
            raise BadBundle(f"{where}: 'llm.prefill_graph' of an fp32-cache decoder needs 'llm.prefill_weights'")
    if prefix == "prompt." and obj.get("choice", "letter") not in CHOICES:
        raise BadBundle(f"{where}: field 'prompt.choice' must be one of {', '.join(CHOICES)}")


def _check_optional(obj: dict, where: Path) -> None:
    present = {k: v for k, v in OPTIONAL.items() if k in obj}
    _check_fields(obj, present, where, "")
    if "prompt_pooling" in obj and "clip" not in obj:
        raise BadBundle(f"{where}: 'prompt_pooling' needs the 'clip' section (its text tower)")


def _check_engines(manifest: dict, where: Path) -> None:
    engines = manifest.get("engines", [])
    if not isinstance(engines, list):
        raise BadBundle(f"{where}: field 'engines' must be a list")
    for i, entry in enumerate(engines):
        if not isinstance(entry, dict):
            raise BadBundle(f"{where}: field 'engines.{i}' must be an object")
        _check_fields(entry, ENGINE, where, f"engines.{i}.")
        if entry["role"] not in ENGINE_ROLES:
            raise BadBundle(f"{where}: field 'engines.{i}.role' must be one of {', '.join(ENGINE_ROLES)}")
        if not entry["file"].startswith(f"{ENGINES_DIR}/"):
            raise BadBundle(f"{where}: field 'engines.{i}.file' must lie in the bundle's {ENGINES_DIR}/ folder")


def resolve_inside(root: Path, rel: str, where: Path) -> Path:
    """A manifest path, refused if it is absolute, climbs out with '..', or is a symlink leading outside."""
    if not isinstance(rel, str) or not rel or os.path.isabs(rel) or ".." in Path(rel).parts or "\\" in rel:
        raise BadBundle(f"{where}: artifact path {rel!r} must be a relative path inside the bundle")
    real = (root / rel).resolve()
    if not real.is_relative_to(root.resolve()):
        raise BadBundle(f"{where}: artifact path {rel!r} leads outside the bundle folder")
    return root / rel


def load(root: Path, verify_hashes: bool = True, hash_cache: "HashCache | None" = None) -> dict:
    root = Path(root)
    where = root / MANIFEST
    if not root.is_dir():
        raise BadBundle(f"{root}: no such bundle folder")
    try:
        manifest = json.loads(where.read_text())
    except FileNotFoundError:
        raise BadBundle(f"{where}: missing; this folder is not a bundle (make one with sf-export)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadBundle(f"{where}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise BadBundle(f"{where}: must hold a JSON object")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BadBundle(f"{where}: bundle schema version {version!r} (written by toolkit "
                        f"{manifest.get('toolkit_version', '?')}); this toolkit ({TOOLKIT_VERSION}) reads schema "
                        f"version {SCHEMA_VERSION} only: re-export the bundle, or use the toolkit that wrote it")
    _check_fields(manifest, SCHEMA, where, "")
    _check_optional(manifest, where)
    _check_engines(manifest, where)
    artifacts = manifest["artifacts"]
    for rel, entry in artifacts.items():
        path = resolve_inside(root, rel, where)
        if not isinstance(entry, dict) or not isinstance(entry.get("size"), int) or not isinstance(
                entry.get("sha256"), str):
            raise BadBundle(f"{where}: artifact {rel!r} needs an integer size and a sha256")
        if not path.is_file():
            if rel.startswith(f"{ENGINES_DIR}/"):
                continue  # engines are optional: a copy without them runs the ONNX graphs (runtime.engines says so)
            raise BadBundle(f"{path}: listed in the manifest but missing (incomplete copy?)")
        if path.stat().st_size != entry["size"]:
            raise BadBundle(f"{path}: size {path.stat().st_size} differs from the manifest's {entry['size']} "
                            f"(truncated or tampered)")
        if verify_hashes:
            digest = hash_cache.sha256(path) if hash_cache else sha256_file(path)
            if digest != entry["sha256"]:
                raise BadBundle(f"{path}: sha256 differs from the manifest (tampered or corrupted); refusing to load")
    try:
        used = referenced_paths(manifest)
    except BadBundle as e:
        raise BadBundle(f"{where}: {e}") from None
    for rel in used:
        resolve_inside(root, rel, where)
        if rel not in artifacts:
            raise BadBundle(f"{where}: {rel!r} is used but not listed (with its hash) among the artifacts")
    return manifest


def referenced_paths(manifest: dict) -> list[str]:
    """Every file the runtime opens, so that each is hash-checked."""
    llm = manifest["llm"]
    nf4 = manifest.get("llm_nf4", {})
    parts = {"vision.graphs": manifest["vision"]["graphs"], "llm.embeddings.files": llm["embeddings"].get("files"),
             "llm.external_data": llm.get("external_data", []),
             "llm.prefill_external_data": llm.get("prefill_external_data", []),
             "llm_nf4.files": nf4.get("files", []) if isinstance(nf4, dict) else None,
             "engines": [e["file"] for e in manifest.get("engines", [])]}
    paths = [manifest["aggregator"]["graph"], llm["graph"], manifest["tokenizer"]]
    if "prefill_graph" in llm:
        paths.append(llm["prefill_graph"])
    if "clip" in manifest:
        paths += [manifest["clip"]["text_graph"], manifest["clip"]["tokenizer"]]
    if "prompt_pooling" in manifest:
        paths.append(manifest["prompt_pooling"]["graph"])
    for name, value in parts.items():
        if isinstance(value, dict):
            value = list(value.values())
        if not isinstance(value, list):
            raise BadBundle(f"manifest field '{name}' must be a list or object of paths")
        paths += value
    return paths


class HashCache:
    """Remembers files already verified, keyed by path, size, mtime and inode, so start-up skips re-hashing an
    unchanged bundle. A changed file (different size or mtime) is hashed again."""

    def __init__(self, path: Path | None = None):
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        self.path = path or base / "sfedge" / "verified-hashes.json"
        try:
            self._known = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self._known = {}

    def sha256(self, file: Path) -> str:
        st = file.stat()
        key = f"{file.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
        if key not in self._known:
            self._known[key] = sha256_file(file)
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(self._known))
                os.replace(tmp, self.path)
            except OSError:
                pass  # a read-only home only costs re-hashing next time
        return self._known[key]
