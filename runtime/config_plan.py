"""A bundle's memory plan before export, from a checkpoint's config.json alone: `manifest_from_config` writes the
manifest the export would write, with each artifact's size predicted from the shapes, and the planner reads it as
it reads a bundle's. The sizes follow the export's byte layout:

- vision graph: every parameter of the tower up to the select layer and of the projector, at 4 bytes (fp32), 2
  (fp16) or, int8, 1 byte per MatMul weight plus a float scale and an int8 zero point per output channel, the rest
  fp32 (ONNX Runtime's dynamic per-channel quantization);
- language model: every Linear of the decoder and lm_head as MatMulNBits (4-bit codes, K*N/2 bytes, and one fp32
  scale per block; symmetric, no zero points), the norms in fp32 and the builder's rotary tables (fp32 cos and sin,
  max positions x head_dim/2); the embedding table as .npy (fp16 by default).
"""
from __future__ import annotations

import json
from pathlib import Path

from .cpu import INT8_SAFE_LIMIT
from .errors import BadCheckpoint, BadInput

SUPPORTED = {  # architecture -> its config class's default language model and vision tower
    "LlavaForConditionalGeneration": ("llama", "clip_vision_model"),
    "LlavaNextForConditionalGeneration": ("llama", "clip_vision_model"),
    "LlavaNextVideoForConditionalGeneration": ("llama", "clip_vision_model"),
    "LlavaOnevisionForConditionalGeneration": ("qwen2", "siglip_vision_model"),
}
# transformers' config defaults for the fields read here: hub configs leave out what equals them (tests check them
# against the installed transformers).
TEXT_DEFAULTS = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, max_position_embeddings=2048),
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072),
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, max_position_embeddings=32768),
}
VISION_DEFAULTS = {
    "clip_vision_model": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              image_size=224, patch_size=32, num_channels=3),
    "siglip_vision_model": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                num_attention_heads=12, image_size=224, patch_size=16, num_channels=3),
}
# A LLaVA config without a vision_config / text_config gets these (LlavaOnevision: SigLIP-so400m and Qwen2).
DEFAULT_TOWER = {
    "clip_vision_model": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14),
    "siglip_vision_model": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26,
                                num_attention_heads=16, image_size=384, patch_size=14),
}
SELECT_DEFAULTS = {"LlavaOnevisionForConditionalGeneration": (-1, "full")}  # others: layer -2, strategy default
SLOW_POOLS = ("max1d", "avg1d", "max2d", "avg2d")
# ONNX graph structure besides the weights, measured on exported bundles: the ViT-B/16 demo tower's fp32 graph is
# 705 KB over its 11 layers' parameters; SmolLM2-135M's decoder graph (model.onnx) is 214 KB for 30 layers.
VISION_GRAPH_PER_LAYER = 64_000
LLM_GRAPH_PER_LAYER = 7_000
AGGREGATOR_BYTES = 10_000  # pooling only, no weights: 10.1-10.2 KB whatever the model
NPY_HEADER = 128
TOKENIZER_BYTES_PER_TOKEN = 72  # tokenizer.json (vocabulary and merges) when the config comes alone: SmolLM2's is
# 3.52 MB for 49,152 tokens
EMBED_WIDTH = {"float16": 2, "float32": 4, "int8": 1}


def read_config(folder: Path) -> dict:
    """config.json of a checkpoint folder (weights need not be there: planning reads the shapes only)."""
    file = Path(folder) / "config.json"
    try:
        config = json.loads(file.read_text())
    except FileNotFoundError:
        raise BadCheckpoint(f"{file}: missing; not a Hugging Face checkpoint folder") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadCheckpoint(f"{file}: broken JSON ({e})") from None
    if not isinstance(config, dict):
        raise BadCheckpoint(f"{file}: must hold a JSON object")
    return config


def manifest_from_config(config: dict, *, frames: int = 50, slow_frames: int = 10, slow_pool: str = "max1d",
                         fast_grid: tuple = (4, 4), llm_precision: str = "int4", block_size: int = 32,
                         embeddings: str = "float16", kv_cache: str = "float32", prefill: str = "auto",
                         tokenizer_bytes: int | None = None, where: str = "config.json") -> dict:
    """The manifest sf-export would write for this config with these options (sf-export's defaults), its artifacts'
    sizes predicted. `tokenizer_bytes`: tokenizer.json's size if known; `where` names the config in errors."""
    if frames < 1 or slow_frames < 1 or min(fast_grid) < 1:
        raise BadInput("--frames, --slow-frames and --fast-grid must be positive")
    if slow_pool not in SLOW_POOLS or block_size not in (32, 64, 128) or embeddings not in EMBED_WIDTH \
            or kv_cache not in ("float32", "int8") or prefill not in ("auto", "int8", "none") \
            or llm_precision not in ("int4", "int8"):
        raise BadInput(f"--slow-pool {'|'.join(SLOW_POOLS)}, --llm-precision int4|int8, --block-size 32|64|128, "
                       f"--embeddings {'|'.join(EMBED_WIDTH)}, --kv-cache float32|int8, --prefill auto|int8|none")
    arch = next((a for a in config.get("architectures") or [] if a in SUPPORTED), None)
    if arch is None:
        raise BadCheckpoint(f"{where}: architecture {', '.join(config.get('architectures') or ['none'])} is not "
                            f"supported; supported: {', '.join(SUPPORTED)}")
    text, tower = _text_config(config, arch, where), _vision_config(config, arch, where)
    layer, strategy = SELECT_DEFAULTS.get(arch, (-2, "default"))
    layer = config.get("vision_feature_layer", layer)
    strategy = config.get("vision_feature_select_strategy", strategy)
    vision = _vision(tower, layer, strategy, text["hidden_size"], config.get("multimodal_projector_bias", True),
                     where)
    llm, llm_files = _llm(text, llm_precision, block_size, embeddings, kv_cache, prefill)
    vocab = text["vocab_size"]
    artifacts = {**{rel: {"size": size} for rel, size in llm_files.items()},
                 **{rel: {"size": size} for rel, size in vision.pop("_sizes").items()},
                 "aggregator.onnx": {"size": AGGREGATOR_BYTES},
                 "tokenizer.json": {"size": tokenizer_bytes or vocab * TOKENIZER_BYTES_PER_TOKEN}}
    return {"source": {"checkpoint": where, "architecture": arch, "language_model": text["model_type"]},
            "vision": vision,
            "aggregator": {"graph": "aggregator.onnx", "num_frames": frames, "slow_frames": slow_frames,
                           "slow_pool": slow_pool, "fast_grid": list(fast_grid)},
            "llm": llm, "tokenizer": "tokenizer.json", "artifacts": artifacts}


def _text_config(config: dict, arch: str, where: str) -> dict:
    given = config.get("text_config") or {}
    kind = given.get("model_type", SUPPORTED[arch][0])
    if kind not in TEXT_DEFAULTS:
        raise BadCheckpoint(f"{where}: language model {kind!r} is not supported; supported: "
                            f"{', '.join(TEXT_DEFAULTS)}")
    text = {**TEXT_DEFAULTS[kind], **{k: v for k, v in given.items() if v is not None}, "model_type": kind}
    text.setdefault("num_key_value_heads", text["num_attention_heads"])
    text.setdefault("head_dim", text["hidden_size"] // text["num_attention_heads"])
    return text


def _vision_config(config: dict, arch: str, where: str) -> dict:
    given = config.get("vision_config")
    kind = (given or {}).get("model_type", SUPPORTED[arch][1])
    if kind not in VISION_DEFAULTS:
        raise BadCheckpoint(f"{where}: vision tower {kind!r} is not supported (CLIP or SigLIP)")
    given = {k: v for k, v in (DEFAULT_TOWER[kind] if given is None else given).items() if v is not None}
    return {**VISION_DEFAULTS[kind], **given, "model_type": kind}


def _vision(tower: dict, layer, strategy: str, width: int, projector_bias: bool, where: str) -> dict:
    """The manifest's vision section (as export.checkpoint.vision_spec states it), with the three graphs' sizes."""
    if strategy not in ("default", "full"):
        raise BadCheckpoint(f"{where}: vision_feature_select_strategy {strategy!r} is not 'default' or 'full'")
    size = tower["image_size"]
    grid = size // tower["patch_size"]
    clip = tower["model_type"] == "clip_vision_model"
    tokens = grid * grid + int(clip) - int(strategy == "default")
    if tokens not in (grid * grid, grid * grid + 1):
        raise BadCheckpoint(f"{where}: {tower['model_type']} with strategy {strategy!r} gives {tokens} tokens per "
                            f"frame, not a {grid}x{grid} grid; SlowFast pooling needs the grid")
    layers = [layer] if isinstance(layer, int) else list(layer)
    count = tower["num_hidden_layers"]
    used = max(count + 1 + i if i < 0 else i for i in layers)  # hidden_states[0] is the embeddings
    params = _tower_params(tower, grid, clip, used, len(layers) * tower["hidden_size"], width, projector_bias)
    overhead = VISION_GRAPH_PER_LAYER * used
    sizes = {"vision.fp32.onnx": 4 * params["all"] + overhead, "vision.fp16.onnx": 2 * params["all"] + overhead,
             "vision.int8.onnx": params["matmul"] + 5 * params["channels"]
                                 + 4 * (params["all"] - params["matmul"]) + overhead}
    return {"image_size": [size, size], "patch_grid": [grid, grid], "select_layer": layer,
            "select_strategy": strategy, "has_cls_token": tokens == grid * grid + 1, "tokens_per_frame": tokens,
            "hidden_size": width, "graphs": {v: f"vision.{v}.onnx" for v in ("fp32", "fp16", "int8")},
            "int8_weight_limit": INT8_SAFE_LIMIT,  # as sf-export writes it
            "tower_dims": {"hidden_size": tower["hidden_size"], "intermediate_size": tower["intermediate_size"],
                           "num_heads": tower["num_attention_heads"], "num_layers": count},
            "_sizes": sizes}


def _tower_params(tower: dict, grid: int, clip: bool, layers: int, projector_in: int, width: int,
                  projector_bias: bool) -> dict:
    """Parameter counts of the traced graph: all of them, the MatMul weights among them, and those MatMuls'
    output channels (int8 keeps a scale and a zero point per channel)."""
    d, inter, p = tower["hidden_size"], tower["intermediate_size"], tower["patch_size"]
    embeddings = tower["num_channels"] * p * p * d + (d + (grid * grid + 1) * d + 2 * d if clip  # CLS, pre-norm
                                                      else d + grid * grid * d)  # SigLIP: patch bias, no CLS
    layer_matmul = 4 * d * d + 2 * d * inter
    layer_rest = 4 * d + inter + d + 4 * d  # biases of q, k, v, o, fc1, fc2; two layer norms
    proj_matmul = projector_in * width + width * width
    matmul = layers * layer_matmul + proj_matmul
    rest = embeddings + layers * layer_rest + (2 * width if projector_bias else 0)
    return {"all": matmul + rest, "matmul": matmul, "channels": layers * (4 * d + inter + d) + 2 * width}


def nbits_bytes(k: int, n: int, block_size: int, bits: int) -> int:
    """One K x N MatMulNBits weight: 4- or 8-bit codes and an fp32 scale per block of K (the last block padded)."""
    return n * -(-k // block_size) * (block_size * bits // 8 + 4)


# An int8 prefill twin is a second copy of the decoder's weights at 8 bits, on disk and in memory. sf-export writes
# it by default up to 1.5 GB of such weights (a 1.5B model); a 7B's would add 6.5 GB to a 4.1 GB bundle, so there it
# is asked for (--prefill int8).
TWIN_MAX_BYTES = 1_500_000_000


def int8_twin_bytes(llm: dict) -> int:
    """The int8 prefill twin's data file (its lm_head is the decoder's): every decoder layer's MatMul weights at a
    byte each, and per output channel an fp32 scale and an int8 zero point. `llm`: the manifest's llm section or
    the export's dims (the same names)."""
    h, inter = llm["hidden_size"], llm["intermediate_size"]
    q, kv = llm["num_heads"] * llm["head_dim"], llm["num_kv_heads"] * llm["head_dim"]
    weights = h * (q + 2 * kv) + q * h + 3 * h * inter
    channels = (q + 2 * kv) + h + 2 * inter + h
    return llm["num_layers"] * (weights + 5 * channels)


def wants_int8_twin(prefill: str, llm: dict) -> bool:
    """sf-export's --prefill: int8, none, or auto (int8 when the twin stays under TWIN_MAX_BYTES)."""
    return prefill == "int8" or (prefill == "auto" and int8_twin_bytes(llm) <= TWIN_MAX_BYTES)


def _llm(text: dict, precision: str, block_size: int, embeddings: str, kv_cache: str,
         prefill: str) -> tuple[dict, dict]:
    """The manifest's llm section and its files' sizes."""
    bits = 8 if precision == "int8" else 4
    nbits = lambda k, n: nbits_bytes(k, n, block_size, bits)
    h, inter, layers = text["hidden_size"], text["intermediate_size"], text["num_hidden_layers"]
    heads, kv, hd, vocab = (text["num_attention_heads"], text["num_key_value_heads"], text["head_dim"],
                            text["vocab_size"])
    qkv = (heads + 2 * kv) * hd
    per_layer = (nbits(h, qkv) + nbits(heads * hd, h) + 2 * nbits(h, inter) + nbits(inter, h)
                 + 4 * 2 * h  # the two RMS norms
                 + (4 * qkv if text["model_type"] == "qwen2" or text.get("attention_bias") else 0))
    weights = (layers * per_layer + nbits(h, vocab) + 4 * h  # lm_head, final norm
               + 2 * 4 * text["max_position_embeddings"] * (hd // 2))  # rotary cos and sin tables
    table = NPY_HEADER + vocab * h * EMBED_WIDTH[embeddings]
    embed_files = ({"table": "llm/embed.int8.npy", "scale": "llm/embed.scale.npy"} if embeddings == "int8"
                   else {"table": f"llm/embed.{'fp16' if embeddings == 'float16' else 'fp32'}.npy"})
    files = {"llm/model.onnx": LLM_GRAPH_PER_LAYER * layers, "llm/model.onnx.data": weights,
             embed_files["table"]: table}
    if embeddings == "int8":
        files[embed_files["scale"]] = NPY_HEADER + 4 * vocab
    llm = {"graph": "llm/model.onnx", "external_data": ["llm/model.onnx.data"], "precision": precision,
           "num_layers": layers, "num_heads": heads, "num_kv_heads": kv, "head_dim": hd, "hidden_size": h,
           "intermediate_size": inter, "vocab_size": vocab, "max_context": text["max_position_embeddings"],
           "embeddings": {"dtype": embeddings, "files": embed_files}, "kv_dtype": kv_cache,
           "quantization": {"method": "MatMulNBits", "bits": bits, "block_size": block_size, "symmetric": True}}
    if kv_cache == "int8":
        llm["prefill_graph"] = "llm/prefill.onnx"  # the fp32-KV twin on the same weights file
    if precision == "int4" and wants_int8_twin(prefill, llm):  # the twin is int4's (as sf-export)
        llm.update(prefill_graph="llm/prefill.onnx", prefill_weights="int8",
                   prefill_external_data=["llm/prefill.onnx.data"])
        files.update({"llm/prefill.onnx": LLM_GRAPH_PER_LAYER * layers, "llm/prefill.onnx.data": int8_twin_bytes(llm)})
    return llm, files
