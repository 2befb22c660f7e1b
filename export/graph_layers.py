"""The written decoder graph run by ONNX Runtime one layer at a time, to check it against PyTorch without holding
it whole: each layer's nodes, exactly as the bundle's graph has them and reading the same weights file, become a
one-layer graph; every check sequence passes through it (a whole prefill, no past) and on to the next. The last
graph is the final norm and lm_head over every position. A 7B model's int4 graph needs 4.3 GB in ONNX Runtime and
its KV cache at video length another 2.6 GB: this needs one layer of each.

With an int8 KV cache the layers are the fp32-KV prefill twin's, which is what prefills a prompt at run time.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from sfedge.runtime.sessions import open_session

from .decoder_graph import DecoderGraph, as_model, without_kv_scales

CHECK_GRAPH = ".check-layer.onnx"  # beside the weights file, whose location the graph names; removed after


class GraphLayers:
    def __init__(self, graph: DecoderGraph):
        self.graph = graph
        self.path = graph.folder / CHECK_GRAPH

    def layer(self, i: int, hidden: list[list[np.ndarray]]) -> list[list[np.ndarray]]:
        """Layer i of each sequence's hidden state (the arrays its first node reads: the embeddings, or the
        residual stream and the last block's output) -> the next layer's."""
        g, d = self.graph, self.graph.dims
        start, end, inputs, outputs = g.layers[i]
        kv = [d["num_kv_heads"], 0, d["head_dim"]]
        values = ([_hidden(n, d) for n in inputs] + [_value("attention_mask", TensorProto.INT64, [1, "total"])]
                  + [_value(f"past_key_values.{i}.{k}", TensorProto.FLOAT, [1, *kv]) for k in ("key", "value")])
        session = self._session(g.nodes[:g.shared] + g.nodes[start:end], values, outputs)
        past = {f"past_key_values.{i}.{k}": np.zeros([1, *kv], np.float32) for k in ("key", "value")}
        out = []
        for arrays in hidden:
            feeds = {**dict(zip(inputs, arrays)), **past,
                     "attention_mask": np.ones((1, arrays[0].shape[1]), np.int64)}
            out.append(session.run(outputs, feeds))
        return out

    def head(self):
        """A function (hidden arrays, rows) -> logits [rows, vocab] of the final norm and lm_head."""
        g = self.graph
        start, inputs = g.head
        nodes = []
        for n in g.nodes[start:]:
            if n.op_type == "Gather" and n.output[0] == "/lm_head/last":  # every position, not the last
                n = helper.make_node("Identity", [n.input[0]], [n.output[0]], "/lm_head/every")
            elif n.op_type == "Constant" and n.output[0] == "/lm_head/last_index":
                continue
            nodes.append(n)
        session = self._session(nodes, [_hidden(n, g.dims) for n in inputs], ["logits"])

        def logits(arrays: list[np.ndarray], rows: slice) -> np.ndarray:
            return session.run(["logits"], {n: a[:, rows] for n, a in zip(inputs, arrays)})[0][0]
        return logits

    def close(self) -> None:
        self.path.unlink(missing_ok=True)

    def _session(self, nodes, inputs, outputs):
        g = self.graph
        nodes = [without_kv_scales(n) for n in nodes]
        used = {i for n in nodes for i in n.input}
        inits = [t for t in g.inits if t.name in used]
        graph = helper.make_graph(nodes, "check", inputs, [_value(o, TensorProto.FLOAT, None) for o in outputs],
                                  initializer=inits)
        g.data.flush()
        onnx.save(as_model(graph), self.path)
        return open_session(self.path)


def _value(name: str, elem_type: int, shape):
    return helper.make_tensor_value_info(name, elem_type, shape)


def _hidden(name: str, dims: dict):
    return _value(name, TensorProto.FLOAT, [1, "sequence", dims["hidden_size"]])
