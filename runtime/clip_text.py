"""The bundle's CLIP text tower: a question -> its embedding in CLIP space, tokenized as transformers tokenizes it
for CLIP / SigLIP (the export checks that the two tokenizations agree)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from .errors import BadBundle
from .sessions import Graph


class ClipText:
    def __init__(self, root: Path, spec: dict, providers, threads: int | None = None):
        path = Path(root) / spec["tokenizer"]
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception
            raise BadBundle(f"{path}: cannot read the CLIP tokenizer ({e})") from None
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(spec["context_length"])
        if spec["pad_to_context"]:
            pad = spec["pad_token_id"]
            self.tokenizer.enable_padding(length=spec["context_length"], pad_id=pad,
                                          pad_token=self.tokenizer.id_to_token(pad))
        self.graph = Graph(Path(root) / spec["text_graph"], providers, threads)
        self.logit_scale = float(spec["logit_scale"])
        self._last = (None, None)  # scoring and pooling embed the same question: run the tower once

    def tokenize(self, text: str) -> np.ndarray:
        return np.array([self.tokenizer.encode(text).ids], dtype=np.int64)

    def embed(self, text: str) -> np.ndarray:
        """[C] float32, unnormalised (as transformers' get_text_features gives it)."""
        if self._last[0] != text:
            self._last = (text, self.graph.run({"input_ids": self.tokenize(text)})[0])
        return self._last[1]
