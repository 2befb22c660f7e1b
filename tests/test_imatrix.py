"""The importance-matrix 4-bit quantizer (export/imatrix.py) and the MatMuls the decoder graph writes with it:
symmetric and affine block search, packing and the offset correction, the mixed scheme's 8-bit layers, and the
schemes on tiny checkpoints of two language-model families. Real-weight fidelity is in
test_llm_engine.py."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import export_tiny
from onnx import TensorProto, helper
from sfedge.export import gptq, imatrix
from sfedge.export.decoder_graph import DataFile, MatMuls, Scheme
from sfedge.export.llm import CALIBRATION_PROSE

rng = np.random.default_rng(0)


def q4_1(n, k, block=32):
    """Weights as llama.cpp's Q4_1 stores them: w = d * q + m per block, every block using codes 0 and 15."""
    blocks = -(-k // block)
    q = rng.integers(0, 16, (n, blocks, block)).astype(np.float32)
    q[..., 0], q[..., 1] = 0, 15
    d = rng.uniform(0.001, 0.02, (n, blocks, 1)).astype(np.float32)
    m = rng.uniform(-0.2, 0.0, (n, blocks, 1)).astype(np.float32)
    return (d * q + m).reshape(n, -1)[:, :k]


def dequant(q, d, c):
    return (d[..., None] * (q.astype(np.float32) - 8) + c[..., None]).reshape(len(q), -1)


@pytest.mark.parametrize("k", [64, 40])  # 40: a ragged last block
def test_q4_1_weights_are_reproduced_exactly(k):
    w = q4_1(24, k)
    q, d, c = imatrix.affine_blocks(w, rng.uniform(0.1, 2, k), 32)
    assert q.max() <= 15 and q.shape == (24, 2, 32)
    assert np.abs(dequant(q, d, c)[:, :k] - w).max() <= 1e-6


def test_the_search_spends_precision_where_calibration_inputs_are_large():
    """One outlier weight in a block whose input is silent: clipping it lowers the weighted error."""
    w = rng.normal(0, 0.01, (64, 32)).astype(np.float32)
    w[:, 0] = 0.5
    imp = np.ones(32, np.float32)
    imp[0] = 1e-6
    q, d, c = imatrix.affine_blocks(w, imp, 32)
    plain_d = (w.max(1) - w.min(1)) / 15
    plain = w.min(1, keepdims=True) + plain_d[:, None] * np.rint((w - w.min(1, keepdims=True)) / plain_d[:, None])

    def err(x):
        return (imp * (w - x) ** 2).sum()

    assert err(dequant(q, d, c)) < 0.5 * err(plain)


def q4_0(n, k, block=32):
    """Weights as llama.cpp's Q4_0 stores them: w = d * q per block, q in -8..7, every block using -8."""
    q = rng.integers(-8, 8, (n, k // block, block)).astype(np.float32)
    q[..., 0] = -8
    return (rng.uniform(0.001, 0.02, (n, k // block, 1)).astype(np.float32) * q).reshape(n, k)


def test_q4_0_weights_are_reproduced_exactly():
    w = q4_0(24, 64)
    q, d = imatrix.symmetric4_blocks(w, rng.uniform(0.1, 2, 64), 32)
    assert q.max() <= 15 and q.shape == (24, 2, 32) and d.shape == (24, 2)
    assert np.abs(d[..., None] * (q.astype(np.float32) - 8) - w.reshape(24, 2, 32)).max() <= 1e-6


def test_the_symmetric_search_spends_precision_where_calibration_inputs_are_large():
    """An outlier weight whose input is silent: the search trades it for the others (measured 0.68x the error)."""
    w = rng.normal(0, 0.01, (64, 40)).astype(np.float32)  # 40: a ragged last block
    w[:, 0] = 0.05
    imp = np.ones(40, np.float32)
    imp[0] = 1e-6
    q, d = imatrix.symmetric4_blocks(w, imp, 32)
    got = (d[..., None] * (q.astype(np.float32) - 8)).reshape(64, -1)[:, :40]
    blocks = np.pad(w, ((0, 0), (0, 24))).reshape(64, 2, 32)
    peak = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[..., None], -1) / -8  # plain absmax RTN
    plain = (np.clip(np.rint(blocks / peak), -8, 7) * peak).reshape(64, -1)[:, :40]

    def err(x):
        return (imp * (w - x) ** 2).sum()

    assert err(got) < 0.8 * err(plain)


def test_8_bit_blocks_reproduce_q8_0():
    d = rng.uniform(0.001, 0.01, (16, 2, 1)).astype(np.float32)
    codes = rng.integers(-127, 128, (16, 2, 32))
    codes[..., 0] = 127
    w = (d * codes).reshape(16, 64)
    q, scale = imatrix.symmetric8_blocks(w, 32)
    assert np.abs(scale[..., None] * (q.astype(np.float32) - 128) - w.reshape(16, 2, 32)).max() <= 1e-7


def matmul_model(tmp_path, ws: dict, scheme: str, bits: dict):
    """ONNX Runtime on a graph of the weight MatMuls `ws` ({name: w [N, K]}) of one input x, written as the decoder
    writes them; and the writer's counts."""
    k = next(iter(ws.values())).shape[1]
    mm = MatMuls(DataFile(tmp_path / "w.data"), Scheme("int4", scheme, 32, 1))
    for name, w in ws.items():
        mm.matmul("x", w, name, name, bits[name], None)
    mm.data.close()
    graph = helper.make_graph(mm.nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, None, k])],
                              [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ws],
                              mm.inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                      helper.make_opsetid("com.microsoft", 1)], ir_version=10),
              tmp_path / "q.onnx")
    return ort.InferenceSession(str(tmp_path / "q.onnx")), mm.counts


def test_affine_matmuls_compute_the_same_products(tmp_path):
    """Two MatMuls sharing an input (as gate and up do) and an 8-bit lm_head, run by ONNX Runtime."""
    k, n, vocab = 64, 48, 80
    ws = {"gate": q4_1(n, k), "up": q4_1(n, k)}
    d8 = rng.uniform(0.001, 0.01, (vocab, 2, 1)).astype(np.float32)
    ws["lm_head"] = (d8 * rng.integers(-127, 128, (vocab, 2, 32))).reshape(vocab, k)
    session, counts = matmul_model(tmp_path, ws, "accurate", {"gate": 4, "up": 4, "lm_head": 8})
    assert counts == {"4-bit": 2, "8-bit": 1, "fp32": 0}
    x = rng.normal(0, 1, (1, 5, k)).astype(np.float32)
    got = dict(zip(ws, session.run(list(ws), {"x": x})))
    for name in ("gate", "up"):  # fp32 activations: exact up to summation order
        want = x @ ws[name].T
        assert np.abs(got[name] - want).max() <= 1e-5 * np.abs(want).max()
    want = (x @ ws["lm_head"].T).ravel()  # int8 activations on the 8-bit lm_head
    assert want @ got["lm_head"].ravel() / np.linalg.norm(want) / np.linalg.norm(got["lm_head"]) >= 0.999


@pytest.mark.parametrize("scheme", ["imatrix", "rtn"])
def test_symmetric_matmul_runs_at_4_bits(tmp_path, scheme):
    k, n = 64, 48
    w = q4_0(n, k)
    session, counts = matmul_model(tmp_path, {"y": w}, scheme, {"y": 4})
    assert counts == {"4-bit": 1, "8-bit": 0, "fp32": 0}
    x = rng.normal(0, 1, (1, 5, k)).astype(np.float32)
    got = session.run(["y"], {"x": x})[0].ravel()
    want = (x @ w.T).ravel()  # the weights are exact; int8 activations cost a little
    assert want @ got / np.linalg.norm(want) / np.linalg.norm(got) >= 0.999


@pytest.mark.parametrize("scheme", ["rtn-mixed", "gptq-mixed"])
def test_mixed_schemes_put_lm_head_and_the_sensitive_layers_at_8_bits(scheme):
    s = Scheme("int4", scheme, 32, 16)  # eighths of 16 layers: 0-1 and 14-15; between, every third from 4
    assert [i for i in range(16) if s.bits(i, "qkv") == 8] == [0, 1, 4, 7, 10, 13, 14, 15]
    assert s.bits(None, "lm_head") == 8 and s.bits(0, "o") == s.bits(0, "gate") == 4 and s.bits(0, "down") == 8
    assert Scheme("int4", "imatrix", 32, 16).bits(None, "lm_head") == 4


def test_int8_language_model_is_8_bit_blocks_throughout_and_close_to_pytorch(make_checkpoint, tmp_path):
    m = export_tiny(make_checkpoint(), tmp_path / "b", llm_precision="int8")
    q, fid = m["llm"]["quantization"], m["fidelity"]["llm"]
    assert m["llm"]["precision"] == "int8" and "prefill_graph" not in m["llm"]  # the int8 twin is for int4
    assert q["bits"] == 8 and q["symmetric"] and q["matmuls"] == {"8-bit": 2 * 5 + 1}
    assert fid["passed"] and fid["teacher_forced"]["mean_cosine"] >= 0.999, fid["measured"]


def correlated_inputs(k: int):
    """A sampler of inputs whose channels move together (a few directions, channels of unequal loudness), as a
    layer's do: tokens -> [tokens, k]."""
    mix, loudness = rng.normal(0, 1, (6, k)), rng.uniform(0.2, 3, k)
    return lambda tokens: ((rng.normal(0, 1, (tokens, 6)) @ mix + rng.normal(0, 0.3, (tokens, k))) *
                           loudness).astype(np.float32)


@pytest.mark.parametrize("k", [96, 80])  # 80: a ragged last block
def test_gptq_errs_less_than_the_imatrix_search_on_unseen_inputs(k):
    w = rng.normal(0, 0.05, (48, k)).astype(np.float32)
    inputs = correlated_inputs(k)
    seen, unseen = inputs(2000), inputs(500)
    seen[:, 3] = 0  # a channel silent in calibration leaves H singular
    h = seen.T.astype(np.float64) @ seen / len(seen)
    q, d = gptq.symmetric4(w, h, 32)
    assert q.shape == (48, 3, 32) and d.shape == (48, 3) and q.dtype == np.uint8 and q.max() <= 15

    def output_error(q, d):
        got = (d[..., None] * (q.astype(np.float32) - 8)).reshape(48, -1)[:, :k]
        return np.linalg.norm(unseen @ (got - w).T) / np.linalg.norm(unseen @ w.T)

    searched = output_error(*imatrix.symmetric4_blocks(w, np.diag(h), 32))
    assert output_error(q, d) < 0.5 * searched  # about 0.2x
    assert np.isfinite(d).all()


def test_gptq_keeps_weights_already_on_the_grid():
    """Weights that 4 bits hold exactly leave no error to compensate: GPTQ returns them as they are."""
    w = q4_0(24, 64)
    x = correlated_inputs(64)(400)
    q, d = gptq.symmetric4(w, x.T.astype(np.float64) @ x / len(x), 32)
    assert np.abs((d[..., None] * (q.astype(np.float32) - 8)).reshape(24, -1) - w).max() <= 1e-6


@pytest.mark.parametrize("text,scheme", [("llama", "accurate"), ("qwen2", "accurate"), ("qwen2", "imatrix"),
                                         ("llama", "gptq"), ("qwen2", "gptq-mixed")])
def test_tiny_checkpoints_export_with_the_imatrix_schemes(make_checkpoint, tmp_path, text, scheme):
    m = export_tiny(make_checkpoint(text=text), tmp_path / "b", llm_precision="int4", llm_quant=scheme,
                    allow_low_fidelity=True)
    q = m["llm"]["quantization"]
    assert q["scheme"] == scheme and q["calibration"]["tokens"] >= CALIBRATION_PROSE  # prose, prompts, video
    # qkv, o, gate, up, down per layer; lm_head
    if scheme == "accurate":
        assert not q["symmetric"] and q["lm_head_bits"] == 8 and q["matmuls"] == {"4-bit": 2 * 5, "8-bit": 1}
    elif scheme == "gptq-mixed":  # 2 layers have no sensitive ones (an eighth of 2 is 0): lm_head alone at 8 bits
        assert q["symmetric"] and q["lm_head_bits"] == 8 and q["matmuls"] == {"4-bit": 2 * 5, "8-bit": 1}
        assert "gptq" in q
    else:
        assert q["symmetric"] and q["lm_head_bits"] == 4 and q["matmuls"] == {"4-bit": 2 * 5 + 1}
    assert m["fidelity"]["llm"]["teacher_forced"]["mean_cosine"] >= 0.95


@pytest.mark.parametrize("prefill", ["auto", "int8"])
def test_a_twin_that_errs_more_than_its_decoder_is_dropped_by_default_and_refused_when_asked_for(
        make_checkpoint, tmp_path, monkeypatch, prefill):
    """The int8 prefill twin is written by default for speed; where it would cost fidelity (GPTQ's decoder can err
    less than it), the default leaves it out and says why; asked for with --prefill int8, the gate refuses it."""
    from sfedge.export import llm_fidelity
    from sfedge.runtime.errors import LowFidelity
    from sfedge.runtime import manifest

    verdict = llm_fidelity.twin_verdict
    monkeypatch.setattr(llm_fidelity, "twin_verdict", lambda fig: {**verdict(fig), "passed": False})
    out = tmp_path / "b"
    if prefill == "int8":
        with pytest.raises(LowFidelity, match="llm.prefill_twin"):
            export_tiny(make_checkpoint(), out, llm_precision="int4", llm_quant="gptq", prefill=prefill)
        return
    m = export_tiny(make_checkpoint(), out, llm_precision="int4", llm_quant="gptq", prefill=prefill)
    assert "prefill_graph" not in m["llm"] and "prefill_weights" not in m["llm"]
    assert m["llm"]["prefill_twin_dropped"].startswith("erred more than the 4-bit decoder: prompts: KL")
    assert m["fidelity"]["all_passed"] and "llm.prefill_twin" not in m["fidelity"]
    assert not (out / "llm" / "prefill.onnx").exists() and not (out / "llm" / "prefill.onnx.data").exists()
    assert manifest.load(out)["llm"] == m["llm"]  # the bundle checks out: no file listed is missing
