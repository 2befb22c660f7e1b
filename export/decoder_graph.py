"""The language model's ONNX graph, written one decoder layer at a time: each weight is quantized the moment it
arrives and appended to the external data file, so the writer never holds more than one layer.

The graph is ONNX Runtime's GroupQueryAttention decoder with `inputs_embeds` in and the last position's logits out:
  inputs  inputs_embeds [B, S, H] float, attention_mask [B, total] int64 (GQA derives positions from its length),
          past_key_values.N.key/value [B, kv_heads, max_len, head_dim] (one preallocated buffer per layer, bound as
          both past input and present output by the runtime, so a step writes only the new positions)
  outputs logits [B, 1, vocab], present.N.key/value
  layer   RMSNorm (fused with the residual add) -> one MatMulNBits for q, k and v -> GroupQueryAttention (rotary
          inside, from cos/sin caches) -> o_proj -> RMSNorm -> gate/up -> SiLU(gate) * up -> down
With an int8 KV cache each attention takes its layer's calibrated k/v scales. The prefill twin, prefill.onnx, is the
same graph with an fp32 cache (without the scales) and, with `int8_twin`, every weight MatMul but lm_head as an
int8-per-channel DynamicQuantizeMatMul (its weights in prefill.onnx.data): at prompt sizes ONNX Runtime's int8 GEMM
runs about three times as fast as MatMulNBits (sf-bench kernels). The runtime prefills through it (runtime/decoder.py).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from sfedge.runtime.errors import BadCheckpoint

from . import gptq, imatrix

OPSET = 22
ALIGN = 4096  # ONNX Runtime memory-maps external data; page-aligned tensors map without a copy
# The twin's int8 weights stay within +-63: ONNX Runtime's x86 int8 GEMM multiplies uint8 activations by them and, on
# CPUs without VNNI (AVX2 only), adds each pair of products in int16 with saturation (vpmaddubsw). 255 * 127 * 2
# overflows it: on an AVX2-only AMD EPYC a full-range twin's KL was 6.8 nats against the decoder's 0.24.
# The runtime does not use an older bundle's full-range twin there (runtime/llm.py).
TWIN_LIMIT = 63  # symmetric, within cpu.INT8_SAFE_LIMIT
MIXED = ("rtn-mixed", "gptq-mixed")  # int4 schemes with lm_head and llama.cpp's sensitive projections at 8 bits
GPTQ = ("gptq", "gptq-mixed")  # rounding errors compensated through the inputs' second moment (gptq.py)


class DataFile:
    """The external data file, appended to tensor by tensor; returns TensorProtos that point into it."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "wb")

    def tensor(self, name: str, array: np.ndarray) -> TensorProto:
        array = np.ascontiguousarray(array)
        pad = -self.file.tell() % ALIGN if array.nbytes >= ALIGN else 0  # a small tensor is copied anyway
        self.file.write(b"\0" * pad)
        offset = self.file.tell()
        self.file.write(array.tobytes())
        t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape,
                        data_location=TensorProto.EXTERNAL)
        for key, value in (("location", self.path.name), ("offset", str(offset)), ("length", str(array.nbytes))):
            t.external_data.add(key=key, value=value)
        return t

    def flush(self):
        if not self.file.closed:
            self.file.flush()

    def close(self):
        self.file.close()


class Scheme:
    """How each weight MatMul is written: `precision` int4, int8 (symmetric 8-bit blocks) or fp32; for int4 the
    block format (symmetric, or affine with its offset correction), which MatMuls go to 8 bits, and the importance
    search."""

    def __init__(self, precision: str, scheme: str, block: int, num_layers: int):
        self.precision, self.scheme, self.block, self.num_layers = precision, scheme, block, num_layers

    def bits(self, layer: int | None, proj: str) -> int:
        """8 everywhere for int8; for int4, 8 for lm_head in the affine and mixed schemes, and in the mixed schemes
        for the projections llama.cpp finds sensitive (q/k/v and down of the first and last eighth and every third
        layer between); else 4."""
        if self.precision == "int8":
            return 8
        if self.scheme == "accurate":
            return 8 if layer is None else 4
        if self.scheme not in MIXED:
            return 4
        if layer is None:
            return 8
        n, eighth = self.num_layers, self.num_layers // 8
        sensitive = layer < eighth or layer >= n - eighth or (layer - eighth) % 3 == 2
        return 8 if sensitive and proj in ("qkv", "down") else 4


class MatMuls:
    """Nodes and initializer references of a graph whose weight MatMuls are written in a scheme's format; weights
    go straight to the data file."""

    def __init__(self, data: DataFile, scheme: Scheme, twin_data: DataFile | None = None):
        """`twin_data`: also write each weight as int8 per output channel there, for the int8 prefill twin."""
        self.data, self.scheme, self.twin_data = data, scheme, twin_data
        self.nodes, self.inits, self.twin_inits = [], [], []
        self.twin_swaps = {}  # name of a MatMul's last node -> (names of all its nodes, the twin's node)
        self.counts = {"4-bit": 0, "8-bit": 0, "fp32": 0}
        self.block_sums = {}

    def add(self, name: str, array: np.ndarray) -> str:
        self.inits.append(self.data.tensor(name, array))
        return name

    def node(self, op, inputs, outputs, name, domain="", **attrs) -> None:
        self.nodes.append(helper.make_node(op, inputs, outputs, name, domain=domain or None, **attrs))

    def matmul(self, x: str, w: np.ndarray, name: str, out: str, bits: int, imp: np.ndarray | None,
               twin: bool = True) -> None:
        """out = x @ w.T for a weight w [N, K] (PyTorch's Linear layout), in the scheme's format; with twin data
        (and `twin`), also as the int8 twin's DynamicQuantizeMatMul."""
        first = len(self.nodes)
        self._main_matmul(x, w, name, out, bits, imp)
        if self.twin_data is not None and twin:
            codes, scale = imatrix.quantize_rows(w, TWIN_LIMIT)  # per output channel
            inits = [self.twin_data.tensor(f"{name}.weight_int8", np.ascontiguousarray(codes.T)),
                     self.twin_data.tensor(f"{name}.weight_scale", scale),
                     self.twin_data.tensor(f"{name}.weight_zero_point", np.zeros(len(w), np.int8))]
            self.twin_inits += inits
            node = helper.make_node("DynamicQuantizeMatMul", [x, *(t.name for t in inits)], [out],
                                    f"{name}/MatMul_int8", domain="com.microsoft")
            self.twin_swaps[self.nodes[-1].name] = ({n.name for n in self.nodes[first:]}, node)

    def _main_matmul(self, x, w, name, out, bits, imp) -> None:
        s = self.scheme
        if s.precision == "fp32":
            self.counts["fp32"] += 1
            self.node("MatMul", [x, self.add(f"{name}.weight", w.T.astype(np.float32))], [out], f"{name}/MatMul")
        elif bits == 8:
            self._nbits(x, name, out, *imatrix.symmetric8_blocks(w, s.block), 8, 4, w.shape[1])
        elif s.scheme == "accurate":
            q, d, c = imatrix.affine_blocks(w, imp, s.block)
            sums = self._block_sum(x, w.shape[1], d.shape[1])
            self._nbits(x, name, f"{out}/codes", q, d, 4, 1, w.shape[1])
            self.node("MatMul", [sums, self.add(f"{name}.offsets", np.ascontiguousarray(c.T))], [f"{out}/offsets"],
                      f"{name}/Offsets")
            self.node("Add", [f"{out}/codes", f"{out}/offsets"], [out], f"{name}/AddOffsets")
        else:
            if s.scheme in GPTQ:  # `imp` is the inputs' whole second moment here
                q, d = gptq.symmetric4(w, imp, s.block)
            else:
                search = s.scheme != "rtn" and s.scheme != "rtn-mixed"
                q, d = imatrix.symmetric4_blocks(w, imp if search else None, s.block, search=search)
            self._nbits(x, name, out, q, d, 4, 4, w.shape[1])

    def _nbits(self, x, name, out, codes, scales, bits, level, k) -> None:
        """A MatMulNBits over `codes` [N, blocks, block] (two 4-bit codes a byte). Accuracy level 4 (int8
        activations) is the fast CPU kernel; the affine codes use 1 (measured on SmolLM2: 4 drops their
        teacher-forced min cosine from 0.9997 to 0.979)."""
        packed = codes if bits == 8 else codes[..., 0::2] | (codes[..., 1::2] << 4)
        self.counts[f"{bits}-bit"] += 1
        self.node("MatMulNBits", [x, self.add(f"{name}.weight_Q{bits}", packed), self.add(f"{name}.scales", scales)],
                  [out], f"{name}/MatMul_Q{bits}", domain="com.microsoft", bits=bits, accuracy_level=level, K=k,
                  N=len(codes), block_size=self.scheme.block)

    def _block_sum(self, x: str, k: int, blocks: int) -> str:
        """x @ S, the sum of x over each block (the affine offsets' input), once per input."""
        if x not in self.block_sums:
            indicator = np.zeros((k, blocks), np.float32)
            indicator[np.arange(k), np.arange(k) // self.scheme.block] = 1
            self.block_sums[x] = f"{x}/block_sum"
            self.node("MatMul", [x, self.add(f"{x}/block_indicator", indicator)], [self.block_sums[x]],
                      f"{x}/BlockSum")
        return self.block_sums[x]



# Every weight a decoder layer may have, under its PyTorch name: what `DecoderGraph.layer` writes.
LAYER_WEIGHTS = {"input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.o_proj.weight",
                 *(f"self_attn.{n}_proj.{kind}" for n in "qkv" for kind in ("weight", "bias")),
                 *(f"mlp.{n}_proj.weight" for n in ("gate", "up", "down"))}


class DecoderGraph(MatMuls):
    """The decoder, a layer at a time: `layer(i, ...)` for each, then `finish(...)` writes the graph file(s)."""

    def __init__(self, folder: Path, dims: dict, scheme: Scheme, rotary: tuple[np.ndarray, np.ndarray],
                 kv_int8: bool, int8_twin: bool = False):
        folder = Path(folder)
        super().__init__(DataFile(folder / "model.onnx.data"), scheme,
                         DataFile(folder / "prefill.onnx.data") if int8_twin else None)
        self.folder, self.dims, self.kv_int8 = folder, dims, kv_int8
        self.residual = None  # (residual stream, last output to add to it)
        self._attention_inputs(*rotary)
        self.shared = len(self.nodes)  # the attention-mask nodes every layer reads
        self.layers = []  # per layer: (first node, end node, input names, output names)

    def _attention_inputs(self, cos: np.ndarray, sin: np.ndarray) -> None:
        """seqlens_k (valid length - 1) and the total length, from the attention mask; the rotary caches."""
        p = "/model/attn_mask"
        self.nodes.append(helper.make_node("Constant", [], [f"{p}/one"], value=helper.make_tensor(
            f"{p}/one_value", TensorProto.INT64, [1], [1])))
        self.node("ReduceSum", ["attention_mask", f"{p}/one"], [f"{p}/sum"], f"{p}/ReduceSum", keepdims=0)
        self.node("Sub", [f"{p}/sum", f"{p}/one"], [f"{p}/last"], f"{p}/Sub")
        self.node("Cast", [f"{p}/last"], ["seqlens_k"], f"{p}/Cast", to=TensorProto.INT32)
        self.node("Shape", ["attention_mask"], [f"{p}/shape"], f"{p}/Shape", start=1, end=2)
        self.node("Squeeze", [f"{p}/shape"], [f"{p}/total"], f"{p}/Squeeze")
        self.node("Cast", [f"{p}/total"], ["total_sequence_length"], f"{p}/TotalCast", to=TensorProto.INT32)
        self.add("cos_cache", cos.astype(np.float32))
        self.add("sin_cache", sin.astype(np.float32))

    def _norm(self, weight: np.ndarray, name: str) -> str:
        """RMSNorm of the residual stream, fused with adding the last block's output to it."""
        d = self.dims
        w = self.add(f"{name}.weight", weight.astype(np.float32))
        out = f"/{name}/output_0"
        if self.residual is None:
            self.node("SimplifiedLayerNormalization", ["inputs_embeds", w], [out], f"/{name}/LayerNorm",
                      epsilon=d["rms_norm_eps"], axis=-1, stash_type=1)
            self.residual = "inputs_embeds"
        else:
            stream, last = self.residual
            self.residual = f"/{name}/residual"
            self.node("SkipSimplifiedLayerNormalization", [stream, last, w], [out, "", "", self.residual],
                      f"/{name}/SkipLayerNorm", domain="com.microsoft", epsilon=d["rms_norm_eps"])
        return out

    def layer(self, i: int, w: dict[str, np.ndarray], imp: dict[str, np.ndarray] | None,
              kv_scales: tuple[float, float] | None) -> None:
        """Decoder layer i from its fp32 weights `w` (PyTorch names, less the layer prefix) and the importance of
        its MatMul inputs (keyed "qkv", "o", "gate_up", "down")."""
        d, p, imp = self.dims, f"model.layers.{i}", imp or {}
        unknown = sorted(set(w) - LAYER_WEIGHTS)
        if unknown:  # e.g. an o_proj bias or q/k norms: a variant this graph would silently drop
            raise BadCheckpoint(f"decoder layer {i} has {', '.join(unknown)}, which the exported graph has no place "
                                f"for; this language-model variant is not supported")
        start, layer_inputs = len(self.nodes), ["inputs_embeds"] if self.residual is None else list(self.residual)
        x = self._norm(w["input_layernorm.weight"], f"{p}.input_layernorm")
        qkv = np.concatenate([w[f"self_attn.{n}_proj.weight"] for n in "qkv"])
        self.matmul(x, qkv, f"{p}.attn.qkv_proj", f"/{p}/qkv", self.scheme.bits(i, "qkv"), imp.get("qkv"))
        query = f"/{p}/qkv"
        if "self_attn.q_proj.bias" in w:  # Qwen2
            bias = np.concatenate([w[f"self_attn.{n}_proj.bias"] for n in "qkv"]).astype(np.float32)
            self.node("Add", [query, self.add(f"{p}.attn.qkv_proj.bias", bias)], [f"/{p}/qkv_bias"], f"/{p}/QkvBias")
            query = f"/{p}/qkv_bias"
        inputs = [query, "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value", "seqlens_k",
                  "total_sequence_length", "cos_cache", "sin_cache", "", "", ""]
        quant = {}
        if kv_scales is not None:
            inputs += [self.add(f"{p}.attn.k_scale", np.array([kv_scales[0]], np.float32)),
                       self.add(f"{p}.attn.v_scale", np.array([kv_scales[1]], np.float32))]
            quant = dict(k_quant_type="PER_TENSOR", v_quant_type="PER_TENSOR", kv_cache_bit_width=8)
        self.node("GroupQueryAttention", inputs, [f"/{p}/attn", f"present.{i}.key", f"present.{i}.value"],
                  f"/{p}/attn/GroupQueryAttention", domain="com.microsoft", num_heads=d["num_heads"],
                  kv_num_heads=d["num_kv_heads"], scale=float(d["head_dim"] ** -0.5), local_window_size=-1,
                  softcap=0.0, do_rotary=1, rotary_interleaved=0, **quant)
        self.matmul(f"/{p}/attn", w["self_attn.o_proj.weight"], f"{p}.attn.o_proj", f"/{p}/attn_out",
                    self.scheme.bits(i, "o"), imp.get("o"))
        self.residual = (self.residual, f"/{p}/attn_out")
        h = self._norm(w["post_attention_layernorm.weight"], f"{p}.post_attention_layernorm")
        for proj in ("gate", "up"):
            self.matmul(h, w[f"mlp.{proj}_proj.weight"], f"{p}.mlp.{proj}_proj", f"/{p}/{proj}",
                        self.scheme.bits(i, proj), imp.get("gate_up"))
        self.node("Sigmoid", [f"/{p}/gate"], [f"/{p}/gate_sigmoid"], f"/{p}/mlp/Sigmoid")
        self.node("Mul", [f"/{p}/gate", f"/{p}/gate_sigmoid"], [f"/{p}/silu"], f"/{p}/mlp/SiLU")
        self.node("Mul", [f"/{p}/silu", f"/{p}/up"], [f"/{p}/act"], f"/{p}/mlp/Mul")
        self.matmul(f"/{p}/act", w["mlp.down_proj.weight"], f"{p}.mlp.down_proj", f"/{p}/mlp_out",
                    self.scheme.bits(i, "down"), imp.get("down"))
        self.residual = (self.residual, f"/{p}/mlp_out")
        self.layers.append((start, len(self.nodes), layer_inputs, list(self.residual)))

    def finish(self, norm: np.ndarray, lm_head: np.ndarray, imp: np.ndarray | None) -> None:
        """The final norm, the last position picked out, lm_head; then the graph file(s): model.onnx and, with an
        int8 KV cache or int8 twin weights, the fp32-KV twin prefill.onnx."""
        self.head = (len(self.nodes), list(self.residual))  # first node, input names
        h = self._norm(norm, "model.norm")
        self.nodes.append(helper.make_node("Constant", [], ["/lm_head/last_index"], value=helper.make_tensor(
            "/lm_head/last_value", TensorProto.INT64, [1], [-1])))
        self.node("Gather", [h, "/lm_head/last_index"], ["/lm_head/last"], "/lm_head/prune/Gather", axis=1)
        # One position: the twin shares the decoder's lm_head.
        self.matmul("/lm_head/last", lm_head, "lm_head", "logits", self.scheme.bits(None, "lm_head"), imp, False)
        self.data.close()
        self._save(self.folder / "model.onnx", self.kv_int8)
        if self.twin_data is not None:
            self.twin_data.close()
        if self.kv_int8 or self.twin_data is not None:
            self._save(self.folder / "prefill.onnx", False, self.twin_data is not None)

    def _save(self, path: Path, kv_int8: bool, int8_weights: bool = False) -> None:
        d = self.dims
        kv_type = TensorProto.INT8 if kv_int8 else TensorProto.FLOAT
        kv = [d["num_kv_heads"], "max_len", d["head_dim"]]
        inputs = [io("inputs_embeds", TensorProto.FLOAT, ["sequence_length", d["hidden_size"]]),
                  io("attention_mask", TensorProto.INT64, ["total_sequence_length"])]
        outputs = [io("logits", TensorProto.FLOAT, [1, d["vocab_size"]])]
        for i in range(d["num_layers"]):
            for kind in ("key", "value"):
                inputs.append(io(f"past_key_values.{i}.{kind}", kv_type, kv))
                outputs.append(io(f"present.{i}.{kind}", kv_type, kv))
        nodes, inits = self.nodes, self.inits
        if not kv_int8:  # the twin: attention without its scales
            nodes = [without_kv_scales(n) for n in nodes]
            inits = [t for t in inits if not t.name.endswith(("attn.k_scale", "attn.v_scale"))]
        if int8_weights:
            nodes, inits = self._int8_weights(nodes, inits)
        onnx.save(as_model(helper.make_graph(nodes, "decoder", inputs, outputs, initializer=inits)), path)

    def _int8_weights(self, nodes: list, inits: list) -> tuple[list, list]:
        """The twin's nodes: each weight MatMul swapped for its int8 one, and what only those MatMuls read (an
        affine scheme's block sums and offsets) dropped."""
        swapped = []
        for n in nodes:
            if n.name in self.twin_swaps:
                swapped.append(self.twin_swaps[n.name][1])
            elif not any(n.name in group for group, _ in self.twin_swaps.values()):
                swapped.append(n)
        while True:  # drop nodes whose outputs nothing reads (the block sums), until none is left
            read = {i for n in swapped for i in n.input} | {"logits"} | {
                f"present.{i}.{k}" for i in range(self.dims["num_layers"]) for k in ("key", "value")}
            kept = [n for n in swapped if any(o in read for o in n.output if o)]
            if len(kept) == len(swapped):
                break
            swapped = kept
        read = {i for n in swapped for i in n.input}
        return swapped, [t for t in inits if t.name in read] + self.twin_inits


def as_model(graph: onnx.GraphProto) -> onnx.ModelProto:
    """A decoder graph (or part of one) as a model: the opsets its nodes need, ONNX Runtime's IR version."""
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                    helper.make_opsetid("com.microsoft", 1)], producer_name="sfedge")
    model.ir_version = 10
    return model


def io(name: str, elem_type: int, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, ["batch_size", *shape])


def without_kv_scales(node):
    if node.op_type != "GroupQueryAttention" or len(node.input) <= 12:
        return node
    twin = onnx.NodeProto()
    twin.CopyFrom(node)
    del twin.input[12:]
    kept = [a for a in twin.attribute if a.name not in ("k_quant_type", "v_quant_type", "kv_cache_bit_width")]
    del twin.attribute[:]
    twin.attribute.extend(kept)
    return twin
