"""sf-eval's --reference-cache: the PyTorch original's answers kept in a JSON-lines file, so that scoring several
bundles of one checkpoint (each --llm-quant scheme, each vision variant) runs the original once per question, not
once per bundle. At 7B in fp32 on a CPU the reference is most of an evaluation's time.

An answer is found again only for the same checkpoint files (names, sizes, modification times), the same video file,
question, options, frames, token allowance and choice, and the same manifest fields the reference reads (the
vision preprocessing, the SlowFast settings, the prompt): anything else is a miss, never a stale answer. Each new
answer is appended as it comes, so an interrupted run keeps what it computed."""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from sfedge.runtime.errors import BadInput

# Manifest fields that name the bundle's own graphs, not what the reference computes.
_BUNDLE_ONLY = {"graph", "graphs", "int8_method", "choice"}


def _identity(path: Path) -> list:
    """What changes when a file or any file of a folder does: relative names, sizes, modification times."""
    if not path.exists():
        raise BadInput(f"{path}: no such file or folder")
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [[str(p.relative_to(path)) if path.is_dir() else p.name, p.stat().st_size, p.stat().st_mtime_ns]
            for p in files]


class ReferenceCache:
    def __init__(self, path: Path, checkpoint, manifest: dict, make_reference):
        """`make_reference()` builds the reference model: only on the first answer the file does not hold."""
        self.path, self._make, self._reference = Path(path), make_reference, None
        sections = {k: {f: v for f, v in manifest[k].items() if f not in _BUNDLE_ONLY}
                    for k in ("vision", "aggregator", "prompt")}
        self._base = {"checkpoint": _identity(Path(checkpoint)), **sections}
        self.answers, self.unreadable, self.hits = {}, 0, 0
        text = ""
        if self.path.exists():
            try:
                text = self.path.read_text()
            except (OSError, UnicodeDecodeError) as e:
                raise BadInput(f"{self.path}: cannot read the reference cache ({e})") from None
        self._cut = bool(text) and not text.endswith("\n")  # a cut last line: the next answer starts a new one
        for line in text.splitlines():
            try:
                entry = json.loads(line)
                self.answers[entry["key"]] = (entry["text"], entry["logprobs"])
            except (ValueError, KeyError, TypeError):  # a line cut short by an interrupted run
                self.unreadable += 1

    def _key(self, video: Path, *args) -> str:
        blob = json.dumps([self._base, _identity(Path(video)), *args], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def answer(self, video: Path, question: str, options: list, slow_frames: list, fast_frames: list,
               max_new_tokens: int, choice: str = "letter") -> tuple[str, list]:
        key = self._key(video, question, options, [int(f) for f in slow_frames], [int(f) for f in fast_frames],
                        max_new_tokens, choice)  # frame indices may come as numpy integers
        if key in self.answers:
            self.hits += 1
            return self.answers[key]
        if self._reference is None:
            self._reference = self._make()
        text, logprobs = self._reference.answer(video, question, options, slow_frames, fast_frames, max_new_tokens,
                                                choice)
        self.answers[key] = (text, logprobs)
        try:
            with open(self.path, "a") as f:
                f.write("\n" * self._cut + json.dumps({"key": key, "text": text, "logprobs": logprobs}) + "\n")
            self._cut = False
        except OSError as e:
            print(f"[sf-eval] warning: {self.path}: cannot append to the reference cache ({e.strerror})",
                  file=sys.stderr)
        return text, logprobs
