"""The 4-bit (or fp32) language-model decoder on ONNX Runtime, with the KV cache updated in place.

The graph is a GroupQueryAttention decoder (onnxruntime-genai's model builder, `exclude_embeds=true`): inputs are
`inputs_embeds`, `attention_mask` (its length is the total sequence; GQA derives positions from it) and
`past_key_values.N.key/value`. One preallocated buffer per layer is bound as both the past input and the present
output through IOBinding, so a step writes only the new positions and never copies the cache. Keeping a prefix is
free: the valid length is just an integer, so `rewind(n)` forgets everything after position n.
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort

from .errors import BadInput, GraphFailed


class Decoder:
    def __init__(self, graph_path: str, spec: dict, max_len: int, providers=None, threads: int | None = None):
        if max_len > spec["max_context"]:
            raise BadInput(f"context of {max_len} tokens exceeds the model's maximum of {spec['max_context']}")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(graph_path, opts, providers=providers or ["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own untyped errors
            raise GraphFailed(f"{graph_path}: ONNX Runtime cannot load this graph: {e}") from None
        self.graph_path = graph_path
        self.spec = spec
        self.max_len = max_len
        self.length = 0
        layers, kv_heads, head_dim = spec["num_layers"], spec["num_kv_heads"], spec["head_dim"]
        shape = [1, kv_heads, max_len, head_dim]
        kv_type = next(i.type for i in self.session.get_inputs() if i.name == "past_key_values.0.key")
        dtype = KV_TYPES[kv_type]  # fp32, or int8 when the graph was built with a calibrated int8 KV cache
        # On a GPU the cache lives in device memory: bound from host memory, every step would copy all of it.
        device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        self._kv = [(ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, device, 0),
                     ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, device, 0)) for _ in range(layers)]
        self._logits = ort.OrtValue.ortvalue_from_shape_and_type([1, 1, spec["vocab_size"]], np.float32)
        self._mask = np.ones((1, max_len), dtype=np.int64)
        self._binding = self.session.io_binding()
        for i, (k, v) in enumerate(self._kv):
            self._binding.bind_ortvalue_input(f"past_key_values.{i}.key", k)
            self._binding.bind_ortvalue_input(f"past_key_values.{i}.value", v)
        # Outputs are bound in the order the graph lists them.
        for out in self.session.get_outputs():
            if out.name == "logits":
                self._binding.bind_ortvalue_output("logits", self._logits)
            else:  # present.N.key / present.N.value share the past buffer
                _, layer, kind = out.name.split(".")
                self._binding.bind_ortvalue_output(out.name, self._kv[int(layer)][kind == "value"])

    @property
    def kv_bytes_per_token(self) -> int:
        return kv_bytes_per_token(self.spec)

    def rewind(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot rewind to {length}: cache holds {self.length} positions")
        self.length = length

    def forward(self, embeds: np.ndarray, chunk: int = 512) -> np.ndarray:
        """Append `embeds` [n, hidden] to the cache, in chunks; return the logits [vocab] after the last one."""
        n = len(embeds)
        if self.length + n > self.max_len:
            raise BadInput(f"context would reach {self.length + n} tokens, over this session's limit of "
                           f"{self.max_len} (model maximum {self.spec['max_context']}): use fewer frames or a "
                           f"shorter question")
        for start in range(0, n, chunk):
            part = np.ascontiguousarray(embeds[start:start + chunk], dtype=np.float32)[None]
            total = self.length + part.shape[1]
            # IOBinding keeps no reference to numpy inputs: `part` and the mask slice live until run() returns.
            mask = self._mask[:, :total]
            self._binding.bind_cpu_input("inputs_embeds", part)
            self._binding.bind_cpu_input("attention_mask", mask)
            try:
                self.session.run_with_iobinding(self._binding)
            except Exception as e:  # onnxruntime raises its own untyped errors
                raise GraphFailed(f"{self.graph_path}: ONNX Runtime failed at position {self.length}: {e}") from e
            self.length = total
        # .numpy() is a view of a buffer the next run overwrites.
        return self._logits.numpy()[0, -1].copy()


KV_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int8)": np.int8}


def kv_bytes_per_token(spec: dict) -> int:
    """Key + value for every layer: the KV cost of one more token of context."""
    width = np.dtype(spec.get("kv_dtype", "float32")).itemsize
    return 2 * spec["num_layers"] * spec["num_kv_heads"] * spec["head_dim"] * width
