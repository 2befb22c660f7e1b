"""The weight-MatMul kernels the language model can run on, side by side in one process: what decides which of
its graphs is faster on a CPU kind (the int8 prefill twin against the 4-bit decoder; docs/benchmarks.md, "Per CPU
kind"). A chain of MatMuls in the decoder's MLP shapes (hidden 576 <-> intermediate 1,536, SmolLM2-135M) at one row
(a decode step) and at a prefill chunk, each variant in ONNX Runtime's CPU provider."""
from __future__ import annotations

import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from sfedge.runtime.cpu import INT8_SAFE_LIMIT  # the twin's weights

K, N, CHAIN, BLOCK = 576, 1536, 8, 32
ROWS = (1, 512)  # a decode step, a prefill chunk
# name -> (op, bits, accuracy level, intra-op threads (None: all cores), spinning threads); the first is the
# decoder's own kernel and session settings, the ratios' reference
DECODER = "MatMulNBits 4-bit, level 4 (the decoder)"
VARIANTS = {DECODER: ("nbits", 4, 4, None, True),
            "MatMulNBits 4-bit, level 4, 1 thread": ("nbits", 4, 4, 1, True),
            "MatMulNBits 4-bit, level 4, no spinning": ("nbits", 4, 4, None, False),
            "MatMulNBits 4-bit, level 1": ("nbits", 4, 1, None, True),
            "MatMulNBits 8-bit, level 4": ("nbits", 8, 4, None, True),
            "DynamicQuantizeMatMul int8 (the prefill twin)": ("int8", 8, 0, None, True),
            "MatMul fp32": ("fp32", 32, 0, None, True)}


def _weights(op: str, bits: int, level: int, k: int, n: int, i: int, rng) -> tuple[list, dict]:
    """One K x N weight in `op`'s format: its initializers and the node's extra inputs and attributes."""
    if op == "fp32":
        return [numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32) * 0.02, f"w{i}")], {}
    if op == "int8":
        codes = rng.integers(-INT8_SAFE_LIMIT, INT8_SAFE_LIMIT + 1, (k, n), dtype=np.int8)
        return [numpy_helper.from_array(codes, f"w{i}"),
                numpy_helper.from_array(rng.random(n).astype(np.float32) * 0.01, f"s{i}"),
                numpy_helper.from_array(np.zeros(n, np.int8), f"z{i}")], dict(domain="com.microsoft")
    blocks = k // BLOCK
    codes = rng.integers(0, 256, (n, blocks, BLOCK * bits // 8), dtype=np.uint8)
    return [numpy_helper.from_array(codes, f"w{i}"),
            numpy_helper.from_array(rng.random(n * blocks).astype(np.float32) * 0.01 + 1e-3, f"s{i}")], \
        dict(domain="com.microsoft", bits=bits, block_size=BLOCK, K=k, N=n, accuracy_level=level)


def session(op: str, bits: int, level: int, threads: int | None, spinning: bool) -> ort.InferenceSession:
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(CHAIN):
        k, n = (K, N) if i % 2 == 0 else (N, K)
        ws, attrs = _weights(op, bits, level, k, n, i, rng)
        inits += ws
        kind = {"fp32": "MatMul", "int8": "DynamicQuantizeMatMul", "nbits": "MatMulNBits"}[op]
        nodes.append(helper.make_node(kind, [x, *(w.name for w in ws)], [f"y{i}"], **attrs))
        x = f"y{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", K])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


# Each session keeps its own pool of threads, which spin a while after a run: timed right after another session,
# a kernel shares the cores with its spinning threads (measured on AMD EPYC at 512 rows: the 4-bit kernel 73 GMAC/s
# right after another session, 104 after a pause of 50 ms; int8 131 against 252-327). A pause before each run keeps
# every figure the kernel's own.
PAUSE_S = 0.1


def measure(rounds: int = 5) -> dict:
    """{"<variant> @ <rows> rows": GMAC/s, the median of `rounds` in which the variants alternate}."""
    sessions = {name: session(*spec) for name, spec in VARIANTS.items()}
    out = {}
    for m in ROWS:
        x = np.random.default_rng(1).standard_normal((m, K)).astype(np.float32)
        calls = 1 if m > 1 else 50  # a one-row chain takes well under a millisecond
        times = {name: [] for name in sessions}
        for s in sessions.values():
            s.run(None, {"x": x})  # first run at this shape
        for _ in range(rounds):
            for name, s in sessions.items():
                time.sleep(PAUSE_S)
                t0 = time.perf_counter()
                for _ in range(calls):
                    s.run(None, {"x": x})
                times[name].append((time.perf_counter() - t0) / calls)
        for name, seconds in times.items():
            out[f"{name} @ {m} rows"] = m * K * N * CHAIN / statistics.median(seconds) / 1e9
    return out
