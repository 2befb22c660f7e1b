"""The language model as the runtime drives it, in the shape of gpt-fast's loop: the prompt goes in through
`decoder.forward` (prefill), `decode_one_token` appends one token, and `generate` yields token ids and returns its
statistics; `text_pieces` turns those ids into streamed text. The KV cache position is an integer: after a prefill
the cache holds that many positions, and a later question about the same video rewinds to it."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Generator

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from . import cpu, tuning
from .decoder import Decoder
from .embeddings import Embeddings
from .errors import BadBundle, BadInput
from .sampling import Sampling, pick


class LanguageModel:
    """The bundle's tokenizer, embedding table and decoder, and what ends an answer."""

    def __init__(self, root: Path, manifest: dict, max_len: int, providers=None, threads=None,
                 decoder_factory=None, prefill_twin: bool = True):
        """`decoder_factory(root, spec, max_len, manifest)` swaps the ONNX decoder for another with the same
        interface (the PyTorch hosts' nf4 backend: sfedge.export.nf4.NF4Decoder). `prefill_twin`: use the bundle's
        prefill twin, if it has one (the planner drops it when the memory budget has no room)."""
        spec = manifest["llm"]
        try:
            self.tokenizer = Tokenizer.from_file(str(root / manifest["tokenizer"]))
        except Exception as e:  # tokenizers raises a bare Exception
            raise BadBundle(f"{root / manifest['tokenizer']}: cannot read the tokenizer ({e})") from None
        self.embed = Embeddings(root, spec["embeddings"])
        twin = spec.get("prefill_graph") if prefill_twin and not decoder_factory else None
        # An int8-weight twin is faster than the 4-bit decoder where ONNX Runtime's int8 GEMM is (on AMD EPYC its
        # GEMMs ~3x, 128 tokens of prefill 1.6x); whether it is on this CPU is measured once per CPU kind and kept
        # (tuning.py).
        probe = bool(twin) and spec.get("prefill_weights") == "int8" and spec["kv_dtype"] == "float32"
        self.prefill_note = None  # for sf-run's notes
        if probe and cpu.int8_weights_overflow(spec.get("prefill_weight_limit")):
            twin, probe = None, False  # an older export's full-range twin: it would answer wrongly here
            self.prefill_note = OVERFLOWING_TWIN
        key = (f"{cpu.describe()}; onnxruntime {ort.__version__}; {threads or 'all'} threads; "
               f"{spec['num_layers']}x{spec['hidden_size']}x{spec['intermediate_size']}")
        known = tuning.lookup("int8_prefill", key) if probe else None
        if known and not known.get("use_twin"):
            twin = None
        self.decoder = (decoder_factory(root, spec, max_len, manifest) if decoder_factory
                        else Decoder(root / spec["graph"], spec, max_len, providers, threads, twin and root / twin))
        if probe and not known:
            seconds = self.decoder.prefill_seconds()
            known = {**seconds, "use_twin": seconds["twin_s"] < seconds["decoder_s"]}
            tuning.store("int8_prefill", key, known)
            if not known["use_twin"]:
                self.decoder.drop_twin()
        if probe:
            self.prefill_note = _prefill_note(known)
        self.eos = frozenset(manifest["prompt"]["eos_token_ids"])
        self.stop_strings = manifest["prompt"]["stop_strings"]
        # Whose visual prefix the KV cache holds: (video key, cache length after it). Kept with the cache, so every
        # runtime sharing this model (a watcher's replanned one) sees the same truth.
        self.prefix = None

    def tokenize(self, text: str, special: bool = False) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=special).ids


@dataclass
class Generated:
    tokens: list  # ids, EOS excluded
    seconds: float


def decode_one_token(lm: LanguageModel, token: int) -> np.ndarray:
    """Append one token; the logits [vocab] for the next."""
    return lm.decoder.forward(lm.embed([token]))


def generate(lm: LanguageModel, logits: np.ndarray, max_new_tokens: int, sampling: Sampling,
             min_new_tokens: int = 0) -> Generator[int, bool, Generated]:
    """Token ids from the logits after the prompt, until EOS or max_new_tokens (EOS is suppressed until
    min_new_tokens). The next step runs only when the next token is asked for; send True to stop after the token
    just yielded (a stop string appeared)."""
    room = lm.decoder.max_len - lm.decoder.length
    if room <= 0:
        raise BadInput(f"the prompt fills the whole context of {lm.decoder.max_len} tokens")
    rng = np.random.default_rng(sampling.seed)
    eos = np.array(sorted(lm.eos), dtype=np.int64)
    t0, tokens = time.perf_counter(), []
    for _ in range(min(max_new_tokens, room)):
        if len(tokens) < min_new_tokens:
            logits[eos] = -np.inf
        tok = pick(logits, sampling, rng)
        if tok in lm.eos:
            break
        tokens.append(tok)
        if (yield tok):
            break
        logits = decode_one_token(lm, tok)
    return Generated(tokens, time.perf_counter() - t0)


def score_options(lm: LanguageModel, logits: np.ndarray, options: list[list[int]]) -> list[float]:
    """Each option's log-probability as the answer (the sum over its tokens), from the logits the answer starts
    from; an option of several tokens is teacher-forced one token at a time, and the cache is rewound after it."""
    start, first = lm.decoder.length, log_softmax(logits.ravel())
    out = []
    for ids in options:
        lp = first[ids[0]]
        for prev, nxt in zip(ids, ids[1:]):
            lp += log_softmax(decode_one_token(lm, prev).ravel())[nxt]
        lm.decoder.rewind(start)
        out.append(float(lp))
    return out


def log_softmax(z: np.ndarray) -> np.ndarray:
    """Over the last axis, in float64."""
    z = z.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def text_pieces(lm: LanguageModel, tokens: Generator[int, bool, Generated]) -> Generator[str, None, Generated]:
    """Streamed text of generated token ids: stops at the bundle's stop strings; returns generate's statistics."""
    stream = TextStream(lm.tokenizer, lm.stop_strings)
    try:
        tok = next(tokens)
        while True:
            piece = stream.push(tok)
            if piece:
                yield piece
            tok = tokens.send(stream.stopped)
    except StopIteration as done:
        generated = done.value
    tail = stream.finish()
    if tail:
        yield tail
    return generated


class TextStream:
    """Turns generated token ids into text pieces. Holds back a piece while it ends in an incomplete UTF-8
    sequence (decoded as U+FFFD) or could be the start of a stop string."""

    def __init__(self, tokenizer, stop_strings=()):
        self.tok, self.stops = tokenizer, [s for s in stop_strings if s]
        self.ids: list[int] = []
        self.sent = 0  # characters already emitted
        self.stopped = False

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        for stop in self.stops:
            at = text.find(stop)
            if at >= 0:
                self.stopped = True
                return self._emit(text[:at])
        if text.endswith("\ufffd"):
            return ""
        hold = max((k for stop in self.stops for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)
        return self._emit(text[:len(text) - hold])

    def finish(self) -> str:
        if self.stopped:
            return ""
        return self._emit(self.tok.decode(self.ids, skip_special_tokens=True))

    def _emit(self, upto: str) -> str:
        piece = upto[self.sent:]
        self.sent = max(self.sent, len(upto))
        return piece


OVERFLOWING_TWIN = ("prompts prefill through the 4-bit decoder: this bundle's int8 twin has full-range weights, which "
                    "overflow on a CPU without VNNI (re-export the bundle to use the twin)")


def _prefill_note(known: dict) -> str:
    twin, decoder = known["twin_s"] * 1e3, known["decoder_s"] * 1e3
    if known["use_twin"]:
        return f"prompts prefill through the int8 twin ({twin:.0f} ms against {decoder:.0f} ms per probe on this CPU)"
    return f"prompts prefill through the 4-bit decoder: the int8 twin is slower on this CPU ({twin:.0f} against " \
           f"{decoder:.0f} ms per probe)"
