"""The 4-bit (or fp32) language-model decoder on ONNX Runtime, with the KV cache updated in place.

The graph is a GroupQueryAttention decoder (onnxruntime-genai's model builder, `exclude_embeds=true`): inputs are
`inputs_embeds`, `attention_mask` (its length is the total sequence; GQA derives positions from it) and
`past_key_values.N.key/value`. One preallocated buffer per layer is bound as both the past input and the present
output through IOBinding, so a step writes only the new positions and never copies the cache. Keeping a prefix is
free: the valid length is just an integer, so `rewind(n)` forgets everything after position n.
"""
from __future__ import annotations

import time

import numpy as np
import onnxruntime as ort

from .errors import BadInput, GraphFailed
from .sessions import open_session


class Decoder:
    def __init__(self, graph_path, spec: dict, max_len: int, providers=None, threads: int | None = None,
                 prefill_graph=None):
        """`prefill_graph`: the decoder's fp32-KV twin, through which prompts prefill. With int8 weights
        (llm.prefill_weights) its GEMMs run ~3x faster at prompt sizes than the 4-bit kernel; with an fp32-cache
        decoder both bind the same cache buffers and it takes prompts of `twin_from` tokens or more. With an
        int8-cache decoder it takes every prompt of more than one token (its fp32 attention prefills ~2x faster),
        decoding at long context goes through the int8 cache, which reads 4x fewer KV bytes per token, and each
        cache is brought up to date from the other when its turn comes."""
        if max_len > spec["max_context"]:
            raise BadInput(f"context of {max_len} tokens exceeds the model's maximum of {spec['max_context']}")
        self.spec = spec
        self.max_len = max_len
        self.length = 0
        self.main = _Bound(graph_path, spec, max_len, providers, threads)
        self.twin = None
        if prefill_graph:
            shared = self.main.kv if self.main.dtype == np.float32 else None
            # Its threads do not spin: spinning after a prefill, they slowed the decode steps that follow (57.6
            # against 62.9 tok/s at 3,710 tokens after a prefill by the decoder itself; not spinning, 56.1 against
            # 55.7; AMD EPYC), and its own runs are long, so spinning gains it nothing.
            self.twin = _Bound(prefill_graph, spec, max_len, providers, threads, shared, spinning=False)
            if self.twin.dtype != np.float32:
                raise GraphFailed(f"{prefill_graph}: a prefill twin needs an fp32 KV cache")
            if self.main.arrays is None:
                raise GraphFailed(f"{prefill_graph}: the prefill twin shares caches through host memory (CPU only)")
            # A session's first run is slow (allocations, threads): pay the decoder's now, not mid-answer.
            self.main.run(np.zeros((1, 1, spec["hidden_size"]), np.float32), 0)
        self.shared_cache = self.twin is not None and self.twin.kv is self.main.kv
        self.twin_from = TWIN_PREFILL_FROM  # the shortest prompt an int8-weight twin takes

    def prefill_seconds(self, tokens: int = 128) -> dict:
        """Seconds to prefill `tokens` positions through the twin and through the decoder itself (the better of
        two runs each, alternated), leaving an empty cache: whether the twin is faster on this CPU."""
        tokens = min(tokens, self.max_len)
        part = np.random.default_rng(0).standard_normal((1, tokens, self.spec["hidden_size"]), np.float32) * 0.02
        best = {"twin_s": float("inf"), "decoder_s": float("inf")}
        self.twin.run(part, 0)  # its first run allocates
        for _ in range(2):
            for name, bound in (("twin_s", self.twin), ("decoder_s", self.main)):
                time.sleep(0.1)  # the other session's threads spin a while after its run: let them stop
                t0 = time.perf_counter()
                bound.run(part, 0)
                best[name] = min(best[name], time.perf_counter() - t0)
        self.rewind(0)
        return best

    def drop_twin(self) -> None:
        """Prefill through the decoder itself from now on (the twin's cache is the decoder's: nothing to sync)."""
        if not self.shared_cache:
            raise ValueError("only a twin sharing the decoder's cache can be dropped")
        self.twin, self.shared_cache = None, False

    def rewind(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot rewind to {length}: cache holds {self.length} positions")
        self.length = length
        for bound in filter(None, (self.main, self.twin)):
            bound.valid = min(bound.valid, length)

    def forward(self, embeds: np.ndarray, chunk: int = 512) -> np.ndarray:
        """Append `embeds` [n, hidden] to the cache, in chunks; return the logits [vocab] after the last one."""
        n = len(embeds)
        if self.length + n > self.max_len:
            raise BadInput(f"context would reach {self.length + n} tokens, over this session's limit of "
                           f"{self.max_len} (model maximum {self.spec['max_context']}): use fewer frames or a "
                           f"shorter question")
        use = self.main
        if self.twin and (n >= self.twin_from if self.shared_cache else n > 1 or self.length < TWIN_DECODE_BELOW):
            use = self.twin
        if self.twin and not self.shared_cache:
            self._sync(use, self.main if use is self.twin else self.twin)
        for start in range(0, n, chunk):
            part = np.ascontiguousarray(embeds[start:start + chunk], dtype=np.float32)[None]
            try:
                use.run(part, self.length)
            except Exception as e:  # onnxruntime raises its own untyped errors
                raise GraphFailed(f"{use.path}: ONNX Runtime failed at position {self.length}: {e}") from e
            self.length += part.shape[1]
            use.valid = self.length
        if self.shared_cache:
            self.main.valid = self.twin.valid = self.length
        elif use is self.twin and self.length >= TWIN_DECODE_BELOW:  # the next step decodes on int8: prompt time
            self._sync(self.main, self.twin)
        # .numpy() is a view of a buffer the next run overwrites.
        return use.logits.numpy()[0, -1].copy()

    def _sync(self, dst: _Bound, src: _Bound) -> None:
        """Bring dst's cache up to the current length from src's (quantizing or dequantizing with the graph's
        per-layer scales, exactly as its attention does)."""
        lo, hi = dst.valid, self.length
        if lo >= hi:
            return
        scales = self.spec["kv_scales"]
        for layer, (kd, vd) in enumerate(dst.arrays):
            for d, s, scale in ((kd, src.arrays[layer][0], scales["k_scales"][layer]),
                                (vd, src.arrays[layer][1], scales["v_scales"][layer])):
                x = s[:, :, lo:hi]
                if d.dtype == np.int8:
                    d[:, :, lo:hi] = np.clip(np.rint(x / np.float32(scale)), -128, 127)
                else:
                    d[:, :, lo:hi] = x * np.float32(scale)
        dst.valid = hi


# Decode steps go through the fp32 twin below this context: there int8 attention's fixed cost outweighs the bytes
# it saves. Measured on SmolLM2-135M, tok/s int8 against fp32: 178/185 at 30 tokens, 159/149 at 512, 135/116 at
# 1,024, 80/59 at 3,710.
TWIN_DECODE_BELOW = 256
# An int8-weight twin takes prompts of at least this many tokens: a follow-up question (~20 tokens) is as fast on the
# 4-bit decoder, whose kernel has no per-shape set-up (sf-bench e2e, AMD EPYC: time to first token of a follow-up
# 0.061 s through the twin against 0.038 s without it).
TWIN_PREFILL_FROM = 64


class _Bound:
    """One decoder session with its KV buffers bound as both past input and present output, and how many
    positions of them are up to date."""

    def __init__(self, path, spec: dict, max_len: int, providers, threads, kv=None, spinning: bool = True):
        """`kv`: another _Bound's cache buffers to bind (the same positions, written by either session)."""
        self.session = open_session(path, providers, threads, spinning)
        self.path = path
        self.valid = 0
        shape = [1, spec["num_kv_heads"], max_len, spec["head_dim"]]
        kv_type = next(i.type for i in self.session.get_inputs() if i.name == "past_key_values.0.key")
        self.dtype = KV_TYPES[kv_type]  # fp32, or int8 when the graph was built with a calibrated int8 KV cache
        # On a GPU the cache lives in device memory: bound from host memory, every step would copy all of it.
        device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        # Kept here: the host views below do not own the buffers.
        self.kv = kv = kv or [tuple(ort.OrtValue.ortvalue_from_shape_and_type(shape, self.dtype, device, 0)
                                    for _ in "kv") for _ in range(spec["num_layers"])]
        # Host views of the buffers, so that a twin's cache can be written in place.
        self.arrays = [(k.numpy(), v.numpy()) for k, v in kv] if device == "cpu" else None
        self.logits = ort.OrtValue.ortvalue_from_shape_and_type([1, 1, spec["vocab_size"]], np.float32)
        self._mask = np.ones((1, max_len), dtype=np.int64)
        self._binding = self.session.io_binding()
        for i, (k, v) in enumerate(kv):
            self._binding.bind_ortvalue_input(f"past_key_values.{i}.key", k)
            self._binding.bind_ortvalue_input(f"past_key_values.{i}.value", v)
        # Outputs are bound in the order the graph lists them.
        for out in self.session.get_outputs():
            if out.name == "logits":
                self._binding.bind_ortvalue_output("logits", self.logits)
            else:  # present.N.key / present.N.value share the past buffer
                _, layer, kind = out.name.split(".")
                self._binding.bind_ortvalue_output(out.name, kv[int(layer)][kind == "value"])

    def run(self, part: np.ndarray, length: int) -> None:
        # IOBinding keeps no reference to numpy inputs: `part` and the mask slice live until run() returns.
        self._binding.bind_cpu_input("inputs_embeds", part)
        self._binding.bind_cpu_input("attention_mask", self._mask[:, :length + part.shape[1]])
        self.session.run_with_iobinding(self._binding)


KV_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int8)": np.int8}
