"""The language model at 4-bit: a GroupQueryAttention decoder with `inputs_embeds` input, built by
onnxruntime-genai's model builder, weights quantized to MatMulNBits.

Why the builder: its GQA graphs take one preallocated KV buffer per layer as both past input and present output,
so a decode step writes only the new position (measured here: 66.6 tok/s at 3,710 tokens of context against 14.7
for a decoder that concatenates its cache), and its quantizer emits ONNX Runtime's MatMulNBits with the RTN,
k-quant and mixed-precision schemes.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import transformers

from sfedge.runtime.errors import BadCheckpoint

from . import imatrix

QUANT_SCHEMES = {
    # Builder options per scheme (the imatrix schemes have the builder write fp32 and quantize in imatrix.py).
    # Measured on SmolLM2-135M, perplexity relative to fp32 PyTorch on 2,048 tokens of the GPL-3 text (llama.cpp
    # Q4_0 is 1.20x, Q4_K_M 1.06x). RTN, symmetric, every MatMul at 4 bits: 1.28x.
    "rtn": {},
    # RTN with lm_head and the layers llama.cpp finds sensitive (first/last eighth, every third layer's qkv/v/down
    # projections) at 8 bits: 1.13x, for 28% more weight bytes than "rtn" (lm_head alone at 8 bits: 1.20x).
    "rtn-mixed": {"matmul_mixed_precision": "last_matmul:int8,mixed_layers:int8"},
    # The default: the bytes and kernel of "rtn", each block's scale searched against calibration activations:
    # 1.14x, and decode 15% faster than "rtn-mixed" at 30 tokens of context (22% fewer bytes). Blocks of 64 decode
    # 9% faster again but reach 1.21x.
    "imatrix": {},
    # Affine blocks searched against calibration activations, lm_head at 8 bits: 1.001x, at half the decode speed.
    # (The builder's own k-quant scheme with blocks of 16 and 8-bit layers reached 1.07x.)
    "accurate": {},
}
IMATRIX_SCHEMES = ("imatrix", "accurate")


def language_model(llava) -> transformers.PreTrainedModel:
    """A LLaVA-family model's language model as a standalone CausalLM (what the builder reads)."""
    lm = transformers.AutoModelForCausalLM.from_config(llava.config.text_config, dtype=torch.float32)
    lm.model.load_state_dict(llava.model.language_model.state_dict())
    lm.lm_head.weight.data.copy_(llava.lm_head.weight.data)
    lm.config.architectures = [type(lm).__name__]
    return lm.eval()


def kv_scales(lm, tokenizer, path: Path, visual_tokens: np.ndarray | None = None) -> Path:
    """Per-layer int8 KV-cache scales (absmax / 127 of keys after RoPE and of values), calibrated on English prose
    and, when given, on a prompt behind real visual tokens: the values a video question puts in the cache."""
    from sfedge import calibration

    ids = tokenizer(calibration.english_text(), add_special_tokens=False)["input_ids"][:1024]
    table = lm.get_input_embeddings().weight.detach()
    inputs = [table[ids]]
    if visual_tokens is not None:
        inputs.append(torch.from_numpy(visual_tokens).float())
    k_max = np.zeros(lm.config.num_hidden_layers)
    v_max = np.zeros(lm.config.num_hidden_layers)
    with torch.no_grad():
        for embeds in inputs:
            cache = lm(inputs_embeds=embeds[None], use_cache=True).past_key_values
            for i, layer in enumerate(cache.layers):
                k_max[i] = max(k_max[i], float(layer.keys.abs().max()))
                v_max[i] = max(v_max[i], float(layer.values.abs().max()))
    path.write_text(json.dumps({"scales": {"k_scales": list(k_max / 127), "v_scales": list(v_max / 127)},
                                "qmax": 127}))
    return path


def build_decoder(lm, tokenizer, work: Path, precision: str, block_size: int, scheme: str, log,
                  kv_scale_file: Path | None = None, samples: list[np.ndarray] | None = None) -> tuple[Path, dict]:
    """Run the model builder on a saved copy of the language model (and, for the imatrix schemes, quantize its
    fp32 graph against `samples`). Returns the folder with model.onnx and the manifest's quantization record."""
    hf_dir, onnx_dir = work / "lm-hf", work / "lm-onnx"
    lm.save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    extra = ["exclude_embeds=true", "prune_lm_head=true", "hf_token=false", "hf_remote=false"]
    if kv_scale_file:
        extra += ["kv_cache_quant_scheme=int8_per_tensor", f"kv_cache_scale_file={kv_scale_file}"]
    searched = precision == "int4" and scheme in IMATRIX_SCHEMES
    built = "fp32" if searched else precision
    if built == "int4":
        options = {"block_size": block_size, "is_symmetric": "true", **QUANT_SCHEMES[scheme]}
        extra += [f"{k}={v}" for k, v in options.items()]
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(onnx_dir),
           "-p", built, "-e", "cpu", "-c", str(work / "builder-cache"), "--extra_options", *extra]
    log(f"building the {built} decoder ({scheme if built == 'int4' else 'no quantization'})")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if run.returncode != 0 or not (onnx_dir / "model.onnx").exists():
        tail = "\n".join((run.stdout + run.stderr).strip().splitlines()[-15:])
        raise BadCheckpoint(f"the ONNX model builder failed on the language model ({type(lm).__name__}):\n{tail}")
    shutil.rmtree(hf_dir)
    if precision != "int4":
        return onnx_dir, None
    record = {"method": "MatMulNBits", "bits": 4, "block_size": block_size, "scheme": scheme}
    if not searched:
        return onnx_dir, {**record, "symmetric": True, **QUANT_SCHEMES[scheme]}
    log(f"importance of every MatMul input on {sum(len(s) for s in samples)} calibration tokens")
    imp = imatrix.importance(lm, samples)
    affine = scheme == "accurate"
    log("quantizing to affine 4-bit blocks (lm_head 8-bit)" if affine else "quantizing to symmetric 4-bit blocks")
    out_dir = work / "lm-int4"
    out_dir.mkdir()
    counts = imatrix.quantize_graph(onnx_dir / "model.onnx", out_dir / "model.onnx", imp, block_size, affine)
    shutil.rmtree(onnx_dir)
    record.update(symmetric=not affine, lm_head_bits=8 if affine else 4, matmuls=counts,
                  calibration={"samples": len(samples), "tokens": int(sum(len(s) for s in samples))})
    if affine:
        record["offsets"] = "float per block (a correction MatMul)"
    return out_dir, record


def calibration_samples(lm, tokenizer, visual_tokens: np.ndarray | None) -> list[np.ndarray]:
    """Embeddings of the chat prompts and, when given, of real visual tokens: text-only calibration is what broke
    other toolkits' int4 LLaVA. (The English prose is kept out: it is the perplexity test.)"""
    from sfedge import calibration

    table = lm.get_input_embeddings().weight.detach().numpy()
    samples = [table[tokenizer(p, add_special_tokens=False)["input_ids"]] for p in calibration.prompts()]
    return samples + ([visual_tokens.astype(np.float32)] if visual_tokens is not None else [])


def quantize_rows(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int8 with a symmetric per-row scale (the runtime's `Embeddings` reads it back)."""
    scale = np.abs(table).max(axis=1) / 127.0
    scale[scale == 0] = 1.0
    q = np.clip(np.round(table / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale.astype(np.float32)


def write_llm(lm, tokenizer, bundle: Path, work: Path, *, precision="int4", block_size=32, scheme="imatrix",
              embed_dtype="float16", kv_cache="float32", visual_tokens=None, log=print) -> dict:
    """Write llm/ into the bundle; return the manifest's "llm" section (fidelity is added by the caller)."""
    scales = None
    if kv_cache == "int8":
        log("calibrating int8 KV-cache scales")
        scales = kv_scales(lm, tokenizer, work / "kv-scales.json", visual_tokens)
    samples = calibration_samples(lm, tokenizer, visual_tokens) if scheme in IMATRIX_SCHEMES else None
    onnx_dir, quantization = build_decoder(lm, tokenizer, work, precision, block_size, scheme, log, scales,
                                           samples)
    dst = bundle / "llm"
    dst.mkdir()
    graph_files = ["model.onnx"] + [p.name for p in onnx_dir.glob("model.onnx.data")]
    for name in graph_files:
        shutil.move(str(onnx_dir / name), dst / name)
    twin = {}
    if kv_cache == "int8":
        log("writing the fp32-KV prefill twin")
        twin = {"prefill_graph": "llm/prefill.onnx", "kv_scales": fp32_kv_twin(dst / "model.onnx",
                                                                               dst / "prefill.onnx")}
    table = lm.get_input_embeddings().weight.detach().numpy()
    if embed_dtype == "int8":
        q, scale = quantize_rows(table)
        np.save(dst / "embed.int8.npy", q)
        np.save(dst / "embed.scale.npy", scale)
        files = {"table": "llm/embed.int8.npy", "scale": "llm/embed.scale.npy"}
    else:  # float16 (half the bytes, the default) or float32 (exact, for equality checks)
        name = "embed.fp16.npy" if embed_dtype == "float16" else "embed.fp32.npy"
        np.save(dst / name, table.astype(embed_dtype))
        files = {"table": f"llm/{name}"}
    cfg = lm.config
    return {
        "graph": "llm/model.onnx",
        "external_data": [f"llm/{n}" for n in graph_files[1:]],
        "architecture": type(lm).__name__,
        "precision": precision,
        "quantization": quantization,
        "num_layers": cfg.num_hidden_layers,
        "num_kv_heads": cfg.num_key_value_heads,
        "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
        "hidden_size": cfg.hidden_size,
        "num_heads": cfg.num_attention_heads,
        "intermediate_size": cfg.intermediate_size,
        "vocab_size": cfg.vocab_size,
        "max_context": cfg.max_position_embeddings,
        "embeddings": {"dtype": embed_dtype, "files": files},
        "kv_dtype": "int8" if kv_cache == "int8" else "float32",
        **twin,
    }


def fp32_kv_twin(graph: Path, twin: Path) -> dict:
    """From an int8-KV decoder, the same decoder with an fp32 KV cache, sharing its external weights file: ONNX
    Runtime's int8-KV attention prefills ~2x slower than its fp32 one (10.2 s against 4.8 s for 3,710 tokens of
    SmolLM2), so the runtime prefills through this twin and decodes on the int8 cache. Returns the per-layer
    scales the int8 graph quantizes with (the builder rescales the calibrated ones by 127/128)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(graph, load_external_data=False)
    quant_attrs = {"k_quant_type", "v_quant_type", "kv_cache_bit_width"}
    scale_names = set()
    for node in model.graph.node:
        if node.op_type == "GroupQueryAttention":
            scale_names.update(node.input[12:14])
            del node.input[12:]  # k_scale, v_scale
            kept = [a for a in node.attribute if a.name not in quant_attrs]
            del node.attribute[:]
            node.attribute.extend(kept)
    for value in list(model.graph.input) + list(model.graph.output):
        if value.name.startswith(("past_key_values.", "present.")):
            value.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    inits = {i.name: i for i in model.graph.initializer if i.name in scale_names}
    scales = {kind: [float(numpy_helper.to_array(inits[f"model.layers.{n}.attn.{kind[0]}_scale"],
                                                 str(graph.parent)).ravel()[0])
                     for n in range(len(inits) // 2)] for kind in ("k_scales", "v_scales")}
    kept = [i for i in model.graph.initializer if i.name not in scale_names]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    onnx.save(model, twin)
    return scales
