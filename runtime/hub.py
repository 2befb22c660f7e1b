"""Checkpoints named by a Hugging Face hub id (owner/name): resolved to a snapshot folder in huggingface_hub's cache,
downloading what is missing unless HF_HUB_OFFLINE is set. huggingface_hub (no torch) is imported only here, and
only for a hub id; it reads HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE when imported."""
from __future__ import annotations

import re
from pathlib import Path

from .errors import BadCheckpoint, BadInput

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
# What sf-export reads from a checkpoint: configs, safetensors weights, tokenizer files and the chat template.
CHECKPOINT_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]


def is_hub_id(source: str) -> bool:
    """An owner/name that is not a file or folder here."""
    return not Path(source).exists() and HUB_ID.fullmatch(source) is not None


def resolve(source: str, revision: str | None = None, file: str | None = None) -> tuple[Path, dict | None]:
    """A local path as it is (with no hub record), or a hub id's snapshot folder and {"repo_id", "revision": the
    commit}. `file`: fetch only that file (sf-run plan needs config.json alone), else the checkpoint's files."""
    if not is_hub_id(source):
        if revision:
            raise BadInput(f"--revision {revision}: goes with a hub id (owner/name), and {source} is a local path")
        return Path(source), None
    import huggingface_hub
    from huggingface_hub import constants, errors

    name = f"{source}@{revision}" if revision else source
    try:
        if file:
            folder = Path(huggingface_hub.hf_hub_download(source, file, revision=revision)).parent
        else:
            folder = Path(huggingface_hub.snapshot_download(source, revision=revision,
                                                            allow_patterns=CHECKPOINT_FILES))
    except errors.LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the hub could not be reached"
        raise BadCheckpoint(f"{name}: not in the Hugging Face cache {constants.HF_HUB_CACHE} and {why}; download "
                            f"it where the hub is reachable (or point HF_HOME / HF_HUB_CACHE at a cache that has "
                            f"it)") from None
    except errors.RevisionNotFoundError:
        raise BadCheckpoint(f"{name}: the hub has no revision {revision!r} of {source}") from None
    except errors.RepositoryNotFoundError:  # also a private or gated repository without a token
        raise BadCheckpoint(f"{name}: no such repository on the hub, or it needs a login (hf auth login)") from None
    except errors.EntryNotFoundError:
        raise BadCheckpoint(f"{name}: the repository has no {file}") from None
    except (errors.HfHubHTTPError, OSError) as e:
        raise BadCheckpoint(f"{name}: download failed ({str(e).splitlines()[0]})") from None
    return folder, {"repo_id": source, "revision": folder.name}  # snapshot folders are named by their commit
