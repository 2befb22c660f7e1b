"""4-bit blocks searched against an importance matrix: the mean square of each MatMul's inputs on calibration
samples (as llama.cpp's imatrix), so that each block's rounding error is weighted by how much its inputs matter.
On ONNX Runtime's MatMulNBits, two formats:

- symmetric (the `imatrix` scheme, the default): w = d * (q - 8), as llama.cpp's Q4_0, for every MatMul including
  lm_head. The same bytes and kernel as plain RTN; only the choice of each block's scale differs.
- affine (the `accurate` scheme): a scale and a float offset per block, as llama.cpp's Q4_1; lm_head 8-bit.
  MatMulNBits is fast on CPU only with integer zero points: float ones fall back to a dequantizing kernel, 30x
  slower per decode step here. So a block is stored as w = d * (q - 8) + c and its offset c goes in a correction
      x @ W = MatMulNBits(x; q, d) + (x @ S) @ C
  where S [K, blocks] sums x over each block (0/1) and C [blocks, N] holds the offsets: 4 bytes per block, a fifth
  more than the codes and scales alone. Symmetric blocks waste a level and pin zero to the middle; a block that
  llama.cpp stored as Q4_1 (the real SmolLM2 ships so) is reproduced exactly, where any symmetric format rounds it
  a second time.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from onnx.external_data_helper import load_external_data_for_tensor

from sfedge.runtime.errors import BadCheckpoint

SHRINK = (0.0, 0.02, 0.05, 0.1)  # affine: fractions of a block's range tried off each end (clipping outliers)
ISCALE = np.linspace(0.8, 1.2, 17)  # symmetric: multiples of the absmax rounding scale tried per block
SAMPLE_TOKENS = 512  # calibration sequences are cut to this length: activations, not attention spans, matter here


def importance(lm, samples: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Mean square per input channel of every Linear's input in the PyTorch language model `lm`, over `samples`
    ([n, hidden] embeddings). Keyed by module name. (PyTorch rather than the exported fp32 graph: a second fp32 copy
    of a 7B model's weights would need another 28 GB.)"""
    sums, count = {}, 0

    def record(name):
        def hook(module, args, output):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in lm.named_modules() if isinstance(m, torch.nn.Linear)]
    try:
        with torch.no_grad():
            for sample in samples:
                for start in range(0, len(sample), SAMPLE_TOKENS):
                    x = torch.from_numpy(np.ascontiguousarray(sample[start:start + SAMPLE_TOKENS], np.float32))
                    lm(inputs_embeds=x[None])
                    count += len(x)
    finally:
        for h in handles:
            h.remove()
    return {n: (v / max(count, 1)).numpy() for n, v in sums.items()}


def _module_name(node_name: str) -> str:
    """The model builder's MatMul node -> the PyTorch module whose input it reads: "/model/layers.3/attn/qkv_proj/
    MatMul" -> "model.layers.3.self_attn.q_proj" (q, k and v share their input), "/lm_head/MatMul" -> "lm_head"."""
    m = re.fullmatch(r"/model/layers\.(\d+)/(attn|mlp)/(\w+?)_proj/MatMul", node_name)
    if not m:
        return node_name.strip("/").removesuffix("/MatMul").replace("/", ".")
    layer, block, proj = m.groups()
    if block == "attn":
        return f"model.layers.{layer}.self_attn.{'o' if proj == 'o' else 'q'}_proj"
    return f"model.layers.{layer}.mlp.{proj}_proj"


def _blocks(w: np.ndarray, block: int, pad=0.0) -> np.ndarray:
    """w [N, K] -> [N, blocks, block], the last block padded with `pad`."""
    n, k = w.shape
    blocks = -(-k // block)
    return np.pad(w.astype(np.float32), ((0, 0), (0, blocks * block - k)), constant_values=pad).reshape(n, blocks,
                                                                                                         block)


def _importance_blocks(imp: np.ndarray | None, k: int, block: int) -> np.ndarray:
    """Per-channel importance [K] -> [1, blocks, block]; padding weighs 0."""
    imp = np.ones(k, np.float32) if imp is None else imp.astype(np.float32)
    # A floor keeps channels that were silent in calibration from being rounded anyhow.
    imp = imp + 1e-3 * imp.mean() + np.finfo(np.float32).tiny
    return _blocks(imp[None], block)


def affine_blocks(w: np.ndarray, imp: np.ndarray | None, block: int):
    """w [N, K] -> codes q [N, blocks, block] in 0..15, scales d and offsets c [N, blocks] with
    w ~= d * (q - 8) + c, minimising sum(imp * error^2) in each block over the SHRINK grid, then refining d and the
    minimum by weighted least squares on the chosen codes."""
    wb, ib = _blocks(w, block, pad=np.nan), _importance_blocks(imp, w.shape[1], block)
    mn, mx = np.nanmin(wb, -1, keepdims=True), np.nanmax(wb, -1, keepdims=True)
    wb = np.where(np.isnan(wb), mn, wb)
    span = mx - mn

    def fit(lo, d):
        d = np.maximum(d, 1e-30)
        q = np.clip(np.rint((wb - lo) / d), 0, 15)
        return q, (ib * (wb - lo - d * q) ** 2).sum(-1, keepdims=True)

    best_lo, best_d = mn, span / 15
    best_q, best_err = fit(best_lo, best_d)
    for a in SHRINK:
        for b in SHRINK:
            if a == b == 0:
                continue
            lo, d = mn + a * span, span * (1 - a - b) / 15
            q, err = fit(lo, d)
            better = err < best_err
            best_lo, best_d = np.where(better, lo, best_lo), np.where(better, d, best_d)
            best_q, best_err = np.where(better, q, best_q), np.minimum(err, best_err)
    # Weighted least squares for (lo, d) given the codes.
    def wsum(x):
        return (ib * x).sum(-1, keepdims=True)

    sw, sq, sqq, sx, sqx = wsum(1), wsum(best_q), wsum(best_q ** 2), wsum(wb), wsum(best_q * wb)
    det = sw * sqq - sq * sq
    ok = det > 1e-12 * sw * sqq
    safe = np.where(ok, det, 1)
    d2, lo2 = (sw * sqx - sq * sx) / safe, (sqq * sx - sq * sqx) / safe
    err2 = wsum((wb - lo2 - d2 * best_q) ** 2)
    take = ok & (d2 > 0) & (err2 < best_err)
    lo, d = np.where(take, lo2, best_lo), np.where(take, d2, best_d)
    return best_q.astype(np.uint8), d[..., 0], (lo + 8 * d)[..., 0]


def symmetric4_blocks(w: np.ndarray, imp: np.ndarray | None, block: int):
    """w [N, K] -> codes q [N, blocks, block] in 0..15 and scales d [N, blocks] with w ~= d * (q - 8), as
    llama.cpp's Q4_0 with an importance matrix: one rounding per ISCALE step, each with its weighted
    least-squares scale, and the one with the least importance-weighted error kept."""
    wb, ib = _blocks(w, block), _importance_blocks(imp, w.shape[1], block)
    # The value of largest magnitude, signed: it maps to -8, the level without a positive twin.
    peak = np.take_along_axis(wb, np.abs(wb).argmax(-1)[..., None], -1)
    peak = np.where(peak == 0, 1, peak)
    best_q, best_d, best_gain = None, None, -np.inf
    for m in ISCALE:
        q = np.clip(np.rint(wb * (-8 * m / peak)), -8, 7)
        sxq, sqq = (ib * wb * q).sum(-1, keepdims=True), (ib * q * q).sum(-1, keepdims=True)
        sqq = np.maximum(sqq, 1e-30)
        gain = sxq * sxq / sqq  # the weighted error is sum(imp * w^2) - gain
        better = gain > best_gain
        best_q = q if best_q is None else np.where(better, q, best_q)
        best_d = sxq / sqq if best_d is None else np.where(better, sxq / sqq, best_d)
        best_gain = np.maximum(gain, best_gain)
    return (best_q + 8).astype(np.uint8), best_d[..., 0].astype(np.float32)


def symmetric8_blocks(w: np.ndarray, block: int):
    """w [N, K] -> uint8 codes [N, blocks, block] (zero point 128) and scales [N, blocks]: absmax / 127, which
    reproduces llama.cpp's Q8_0 exactly."""
    wb = _blocks(w, block)
    scale = np.abs(wb).max(-1) / 127
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(wb / scale[..., None]), -127, 127) + 128
    return q.astype(np.uint8), scale


def quantize_graph(src: Path, dst: Path, imp: dict[str, np.ndarray] | None, block: int, affine: bool) -> dict:
    """Rewrite the fp32 decoder `src` (MatMul on constant weights) into `dst` with external data beside it: every
    MatMul symmetric 4-bit, or (`affine`) affine 4-bit with its offset correction and lm_head at 8 bits. `imp`:
    importance() of the same model, or None to weigh every input channel alike. Returns counts for the manifest."""
    model = onnx.load(src, load_external_data=False)  # weights are read one at a time: a 7B model's are 28 GB
    inits = {i.name: i for i in model.graph.initializer}
    weights = {n.input[1] for n in _weight_matmuls(model)}
    for name, init in inits.items():
        if name not in weights and init.data_location == onnx.TensorProto.EXTERNAL:
            load_external_data_for_tensor(init, str(src.parent))
    rewrite = _Rewrite(block)
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in weights:
            rewrite.nodes.append(node)
            continue
        w = numpy_helper.to_array(inits[node.input[1]], str(src.parent)).T  # stored [K, N]
        rewrite.matmul(node, w, _node_importance(node, imp), affine)
    kept = [i for i in model.graph.initializer if i.name not in weights]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept + rewrite.inits)
    del model.graph.node[:]
    model.graph.node.extend(rewrite.nodes)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, dst, save_as_external_data=True, all_tensors_to_one_file=True,
              location=dst.name + ".data", size_threshold=1024)
    # onnx writes external data owner-only (0600); a bundle copied to a device is read by another user.
    dst.with_name(dst.name + ".data").chmod(dst.stat().st_mode & 0o777)
    return rewrite.counts


def _node_importance(node, imp: dict[str, np.ndarray] | None) -> np.ndarray | None:
    if imp is None:
        return None
    if _module_name(node.name) not in imp:
        raise BadCheckpoint(f"the model builder's MatMul {node.name} matches no PyTorch layer "
                            f"({_module_name(node.name)}), so it has no calibration importance: export "
                            f"with --llm-quant rtn-mixed")
    return imp[_module_name(node.name)]


class _Rewrite:
    """The rewritten graph's nodes in order, its new initializers, and how many MatMuls went to each width."""

    def __init__(self, block: int):
        self.block, self.nodes, self.inits = block, [], []
        self.block_sums = {}  # input -> its per-block sum, shared by the MatMuls that read it (gate and up)
        self.counts = {"4-bit": 0, "8-bit": 0}

    def matmul(self, node, w: np.ndarray, imp: np.ndarray | None, affine: bool) -> None:
        """One weight MatMul replaced. Accuracy level 4 (int8 activations, the CPU default) is the fast kernel.
        The affine layers use 1 (fp32 activations): measured on SmolLM2, 4 drops their teacher-forced min cosine
        from 0.9997 to 0.979, for half the kernel time. lm_head stays at 4: 8-bit weights have no fast
        fp32-activation kernel (90 ms a step)."""
        a, base, out, k = node.input[0], node.input[1], node.output[0], w.shape[1]
        if not affine:
            self.nodes.append(self.nbits(a, base, out, node.name, *symmetric4_blocks(w, imp, self.block), 4, 4, k))
        elif node.name.startswith("/lm_head/"):
            self.nodes.append(self.nbits(a, base, out, node.name, *symmetric8_blocks(w, self.block), 8, 4, k))
        else:
            q, d, c = affine_blocks(w, imp, self.block)
            sums = self.block_sum(a, k, d.shape[1])
            self.inits.append(numpy_helper.from_array(np.ascontiguousarray(c.T), base + "_offsets"))
            self.nodes += [
                self.nbits(a, base, out + "/codes", node.name, q, d, 4, 1, k),
                helper.make_node("MatMul", [sums, base + "_offsets"], [out + "/offsets"], node.name + "_Offsets"),
                helper.make_node("Add", [out + "/codes", out + "/offsets"], [out], node.name + "_Add"),
            ]

    def nbits(self, x, base, out, name, codes, scales, bits, level, k):
        """A MatMulNBits node over `codes` [N, blocks, block] (two 4-bit codes packed per byte) and `scales`."""
        packed = codes if bits == 8 else codes[..., 0::2] | (codes[..., 1::2] << 4)
        self.inits.extend([numpy_helper.from_array(packed, f"{base}_Q{bits}"),
                           numpy_helper.from_array(scales, base + "_scales")])
        self.counts[f"{bits}-bit"] += 1
        return helper.make_node("MatMulNBits", [x, f"{base}_Q{bits}", base + "_scales"], [out], f"{name}_Q{bits}",
                                domain="com.microsoft", bits=bits, accuracy_level=level, K=k, N=len(codes),
                                block_size=self.block)

    def block_sum(self, a: str, k: int, blocks: int) -> str:
        """x @ S for input `a`: the sum of x over each block, computed once per input."""
        if a not in self.block_sums:
            indicator = np.zeros((k, blocks), np.float32)
            indicator[np.arange(k), np.arange(k) // self.block] = 1
            self.block_sums[a] = f"{a}/block_sum"
            self.inits.append(numpy_helper.from_array(indicator, f"{a}/block_indicator"))
            self.nodes.append(helper.make_node("MatMul", [a, f"{a}/block_indicator"], [self.block_sums[a]],
                                               f"{a}/BlockSum"))
        return self.block_sums[a]


def _weight_matmuls(model) -> list:
    inits = {i.name for i in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
