"""The language model as the runtime drives it: tokenizer, embedding lookup, the in-place-KV decoder and the
generation loop. `prefix` state is an integer: after `prefill`, the cache holds that many positions, and a later
question about the same video rewinds to it instead of prefilling the video again."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import numpy as np
from tokenizers import Tokenizer

from .decoder import Decoder, kv_bytes_per_token
from .embeddings import Embeddings
from .errors import BadBundle, BadInput
from .generate import Sampling, TextStream, pick


class LanguageModel:
    def __init__(self, root: Path, manifest: dict, max_len: int, providers=None, threads=None,
                 decoder_factory=None, prefill_twin: bool = True):
        """`decoder_factory(root, spec, max_len, manifest)` swaps the ONNX decoder for another with the same
        interface (the PyTorch hosts' nf4 backend: sfedge.export.nf4.NF4Decoder). `prefill_twin`: use an int8-KV
        bundle's fp32 prefill graph (the planner drops it when the memory budget has no room)."""
        self.spec = manifest["llm"]
        self.prompt_spec = manifest["prompt"]
        try:
            self.tokenizer = Tokenizer.from_file(str(root / manifest["tokenizer"]))
        except Exception as e:  # tokenizers raises a bare Exception
            raise BadBundle(f"{root / manifest['tokenizer']}: cannot read the tokenizer ({e})") from None
        self.embed = Embeddings(root, self.spec["embeddings"])
        twin = self.spec.get("prefill_graph") if prefill_twin else None
        self.decoder = (decoder_factory(root, self.spec, max_len, manifest) if decoder_factory
                        else Decoder(str(root / self.spec["graph"]), self.spec, max_len, providers, threads,
                                     twin and str(root / twin)))
        self.eos = set(self.prompt_spec["eos_token_ids"])

    @property
    def kv_bytes_per_token(self) -> int:
        return kv_bytes_per_token(self.spec)

    def encode(self, text: str, first: bool = False) -> list[int]:
        special = first and self.prompt_spec.get("add_special_tokens", False)
        return self.tokenizer.encode(text, add_special_tokens=special).ids

    @property
    def length(self) -> int:
        return self.decoder.length

    def rewind(self, n: int) -> None:
        self.decoder.rewind(n)

    def prefill(self, embeds: np.ndarray, chunk: int = 512) -> np.ndarray:
        return self.decoder.forward(embeds, chunk)

    def generate(self, logits: np.ndarray, max_new_tokens: int, sampling: Sampling,
                 stats: dict | None = None, min_new_tokens: int = 0) -> Iterator[str]:
        """Stream text pieces, starting from the logits after the prompt. EOS is suppressed until
        min_new_tokens have been generated."""
        if self.decoder.length + max_new_tokens > self.decoder.max_len:
            max_new_tokens = self.decoder.max_len - self.decoder.length
            if max_new_tokens <= 0:
                raise BadInput(f"the prompt fills the whole context of {self.decoder.max_len} tokens")
        rng = np.random.default_rng(sampling.seed)
        stream = TextStream(self.tokenizer, self.prompt_spec["stop_strings"])
        t0, tokens = time.perf_counter(), []
        eos = np.array(sorted(self.eos), dtype=np.int64)
        for _ in range(max_new_tokens):
            if len(tokens) < min_new_tokens:
                logits[eos] = -np.inf
            tok = pick(logits, sampling, rng)
            if tok in self.eos:
                break
            tokens.append(tok)
            piece = stream.push(tok)
            if piece:
                yield piece
            if stream.stopped:
                break
            logits = self.decoder.forward(self.embed([tok]))
        tail = stream.finish()
        if tail:
            yield tail
        if stats is not None:
            stats.update(generated_tokens=len(tokens), generate_s=time.perf_counter() - t0, token_ids=tokens)
