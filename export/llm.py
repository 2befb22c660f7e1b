"""The language model at 4-bit, written layer by layer from the checkpoint's shards: calibration activations pass
through one fp32 decoder layer at a time (streamed.py), that layer's statistics are taken, its weights quantized
and appended to the graph (decoder_graph.py), and the check sequences pass through it and through the layer just
written (graph_layers.py); then it is dropped. Peak memory is a layer, the embedding table and the sequences'
activations, whatever the depth: a 7B model exports where its fp32 copy (28 GB) would not fit.
"""
from __future__ import annotations

import numpy as np
import torch

from sfedge.runtime.embeddings import Embeddings

from . import gptq, llm_fidelity
from .decoder_graph import GPTQ, MIXED, TWIN_LIMIT, DecoderGraph, Scheme
from .graph_layers import GraphLayers
from .imatrix import quantize_rows
from .streamed import LayerStream, calibration, chunks, second_moment

QUANT_SCHEMES = {
    # Measured on SmolLM2-135M, perplexity relative to fp32 PyTorch on 2,048 tokens of the GPL-3 text (llama.cpp
    # Q4_0 is 1.20x, Q4_K_M 1.06x).
    "rtn": "symmetric 4-bit blocks rounded to nearest, every MatMul",
    "rtn-mixed": "rtn, with lm_head and the q/k/v and down projections of the layers llama.cpp finds sensitive "
                 "(first and last eighth, every third between) at 8 bits",
    # The default: the bytes and kernel of "rtn", each block's scale searched against calibration activations.
    "imatrix": "symmetric 4-bit blocks, each block's scale searched against the importance of its inputs",
    # Affine blocks searched against calibration activations, lm_head at 8 bits: close to fp32, half the decode
    # speed.
    "accurate": "affine 4-bit blocks searched against the importance of their inputs, lm_head at 8 bits",
    # The bytes and kernel of "imatrix"; rounding errors compensated through the inputs' second moment (gptq.py).
    "gptq": "imatrix's blocks, each weight's rounding error compensated on the weights not yet rounded (GPTQ)",
    # The 8-bit parts of "rtn-mixed", GPTQ for the rest: the demo's answers stay closest to fp32 this way.
    "gptq-mixed": "gptq, with lm_head and the sensitive layers of rtn-mixed at 8 bits",
}
SEARCHED = ("imatrix", "accurate", *GPTQ)  # calibrated schemes
CALIBRATION_PROSE = 2048  # tokens of technical prose beside the chat prompts and visual tokens
PRECISIONS = ("int4", "int8", "fp32")  # the schemes above are int4's; int8 is symmetric 8-bit blocks throughout


def dims(config) -> dict:
    """The decoder's shapes, as the graph and the manifest name them."""
    return {"num_layers": config.num_hidden_layers, "num_kv_heads": config.num_key_value_heads,
            "head_dim": getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
            "hidden_size": config.hidden_size, "num_heads": config.num_attention_heads,
            "intermediate_size": config.intermediate_size, "vocab_size": config.vocab_size,
            "max_context": config.max_position_embeddings, "rms_norm_eps": float(config.rms_norm_eps)}


def calibration_samples(table: torch.Tensor, tokenizer, visual_tokens: np.ndarray | None) -> list[np.ndarray]:
    """Embeddings of the chat prompts, of CALIBRATION_PROSE tokens of technical prose (a few prompts alone leave a
    K-wide layer's statistics rank-deficient: GPTQ then fits them and errs off them) and, when given, of real
    visual tokens: text-only calibration is what broke other toolkits' int4 LLaVA. (The English prose is kept out:
    it is the perplexity test.)"""
    from sfedge import calibration

    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    texts = [ids(p) for p in calibration.prompts()] + calibration.prose(ids, CALIBRATION_PROSE)
    return [table[t].numpy() for t in texts] + ([visual_tokens.astype(np.float32)] if visual_tokens is not None
                                                 else [])


def write_llm(stream: LayerStream, tokenizer, bundle, prompt: dict, *, precision="int4", block_size=32,
              scheme="imatrix", embed_dtype="float16", kv_cache="float32", int8_prefill=False, visual_tokens=None,
              text_tokens=2048, log=print, bar=None) -> tuple[dict, dict]:
    """Write llm/ into the bundle and check it, in one pass over the layers: each fp32 layer sees the calibration
    sequences (its statistics taken), is quantized and written, then the check sequences pass through it and
    through the layer just written, in ONNX Runtime. With `int8_prefill`, also the int8-weight prefill twin,
    checked as the runtime uses it (llm_fidelity.twin). Returns the manifest's "llm" section and the fidelity
    figures. `bar`: a progress-bar factory (desc, total)."""
    d = dims(stream.config)
    dst = bundle / "llm"
    dst.mkdir()
    table = stream.embeddings()
    embeddings = write_embeddings(table.numpy(), dst, embed_dtype)
    searched, kv_int8 = precision == "int4" and scheme in SEARCHED, kv_cache == "int8"
    hessian = searched and scheme in GPTQ  # the inputs' whole second moment, not its diagonal
    samples = chunks(calibration_samples(table, tokenizer, visual_tokens)) if searched or kv_int8 else []
    checks = llm_fidelity.sequences(tokenizer, prompt, table, Embeddings(bundle, embeddings), text_tokens,
                                    visual_tokens)
    del table
    cos, sin = stream.rotary(d["max_context"])
    graph = DecoderGraph(dst, d, Scheme(precision, scheme, block_size, d["num_layers"]),
                         (cos[0, :, :d["head_dim"] // 2].numpy(), sin[0, :, :d["head_dim"] // 2].numpy()), kv_int8,
                         int8_prefill)
    layers = GraphLayers(graph)
    exported = [[c.got[None].astype(np.float32)] for c in checks]
    scales = {"k_scales": [], "v_scales": []}

    def layer(i, module, run):
        with calibration(stream, module, hessian) as stats:
            run("calibration")
        kv = tuple(max(m, 1e-6) / 127 for m in stats["kv_max"]) if kv_int8 else None
        if kv:
            scales["k_scales"].append(kv[0]), scales["v_scales"].append(kv[1])
        graph.layer(i, {k: v.numpy() for k, v in module.state_dict().items()},
                    stats["hessian" if hessian else "importance"] if searched else None, kv)
        run("reference")
        exported[:] = layers.layer(i, exported)

    log(f"language model: {d['num_layers']} layers, each calibrated on {sum(len(s) for s in samples)} tokens, "
        f"quantized ({_label(precision, scheme)}), written, and checked on {sum(len(c.ref) for c in checks)} tokens "
        f"in PyTorch fp32 and ONNX Runtime")
    progress = bar("language model", d["num_layers"]) if bar else None
    try:
        finals = stream.forward({"calibration": samples, "reference": [c.ref for c in checks]}, layer, progress)
        head = stream.lm_head()
        lm_head_imp = second_moment(torch.cat(finals["calibration"]), hessian) if searched else None
        graph.finish(stream.shards.get(f"{stream.prefix}norm.weight").numpy(), head.numpy(), lm_head_imp)
        figures = llm_fidelity.compare(checks, finals["reference"], head, exported, layers.head())
    finally:
        layers.close()
        if progress:
            progress.close()
    spec = _section(stream, d, precision, _record(precision, scheme, block_size, graph.counts, samples), embeddings,
                    _prefill_fields(scales if kv_int8 else None, int8_prefill))
    if int8_prefill:
        log("checking the int8 prefill twin: prompts prefilled through it, answers decoded by the 4-bit graph")
        figures["prefill_twin"] = llm_fidelity.twin(bundle, spec, checks, finals["reference"], head)
    return spec, figures


def _section(stream: LayerStream, d: dict, precision: str, quantization: dict | None, embeddings: dict,
             prefill: dict) -> dict:
    """The manifest's "llm" section."""
    return {"graph": "llm/model.onnx", "external_data": ["llm/model.onnx.data"],
            "architecture": type(stream.skeleton).__name__, "precision": precision, "quantization": quantization,
            **{k: v for k, v in d.items() if k != "rms_norm_eps"}, "embeddings": embeddings, **prefill}


def _prefill_fields(kv_scales: dict | None, int8_prefill: bool) -> dict:
    """The manifest's KV dtype and prefill twin: an int8 cache's scales and fp32-cache twin, int8 twin weights."""
    fields = {"kv_dtype": "int8" if kv_scales else "float32"}
    if kv_scales:
        fields.update(prefill_graph="llm/prefill.onnx", kv_scales=kv_scales)
    if int8_prefill:
        fields.update(prefill_graph="llm/prefill.onnx", prefill_weights="int8", prefill_weight_limit=TWIN_LIMIT,
                      prefill_external_data=["llm/prefill.onnx.data"])
    return fields


def drop_twin(bundle, spec: dict) -> None:
    """Remove an fp32-cache bundle's int8 prefill twin: its prompts then prefill through the 4-bit decoder."""
    for name in [spec.pop("prefill_graph")] + spec.pop("prefill_external_data"):
        (bundle / name).unlink()
    del spec["prefill_weights"], spec["prefill_weight_limit"]


def _label(precision: str, scheme: str) -> str:
    """The schemes are int4's: "int4, imatrix", "int8", "fp32"."""
    return f"{precision}, {scheme}" if precision == "int4" else precision


def _record(precision: str, scheme: str, block_size: int, counts: dict, samples: list) -> dict | None:
    if precision == "fp32":
        return None
    matmuls = {k: v for k, v in counts.items() if v}
    if precision == "int8":
        return {"method": "MatMulNBits", "bits": 8, "block_size": block_size, "scheme": "rtn", "symmetric": True,
                "lm_head_bits": 8, "matmuls": matmuls}
    record = {"method": "MatMulNBits", "bits": 4, "block_size": block_size, "scheme": scheme,
              "symmetric": scheme != "accurate", "lm_head_bits": 8 if scheme in (*MIXED, "accurate") else 4,
              "matmuls": matmuls}
    if scheme in SEARCHED:
        record["calibration"] = {"samples": len(samples), "tokens": int(sum(len(s) for s in samples))}
    if scheme == "accurate":
        record["offsets"] = "float per block (a correction MatMul)"
    if scheme in GPTQ:
        record["gptq"] = {"damp": gptq.DAMP, "columns_per_update": gptq.WIDTH}
    return record


def write_embeddings(table: np.ndarray, dst, embed_dtype: str) -> dict:
    if embed_dtype == "int8":
        q, scale = quantize_rows(table)
        np.save(dst / "embed.int8.npy", q)
        np.save(dst / "embed.scale.npy", scale)
        files = {"table": "llm/embed.int8.npy", "scale": "llm/embed.scale.npy"}
    else:  # float16 (half the bytes, the default) or float32 (exact, for equality checks)
        name = "embed.fp16.npy" if embed_dtype == "float16" else "embed.fp32.npy"
        np.save(dst / name, table.astype(embed_dtype))
        files = {"table": f"llm/{name}"}
    return {"dtype": embed_dtype, "files": files}
