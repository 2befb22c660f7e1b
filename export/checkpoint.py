"""Reading a local Hugging Face LLaVA-family checkpoint: what the export needs, taken from the checkpoint itself."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sfedge.runtime import config_plan
from sfedge.runtime.config_plan import SUPPORTED
from sfedge.runtime.errors import BadCheckpoint

from .shards import Shards, renamer

SUPPORTED_LANGUAGE = ("llama", "mistral", "qwen2")
WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin")
# The towers' standard normalisation, used when the checkpoint has no preprocessor_config.json.
STANDARD_NORM = {
    "clip_vision_model": ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]),
    "siglip_vision_model": ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
}


@dataclass
class Checkpoint:
    path: Path
    architecture: str
    config: dict
    model: object  # the transformers model, eval mode: the vision tower and projector in fp32, the rest on "meta"
    tokenizer: object
    vision: dict  # the manifest's "vision" section, less the graphs
    shards: Shards  # the weights, read a tensor at a time (the language model streams from here)

    @property
    def language_model_type(self) -> str:
        return self.config["text_config"]["model_type"]


def read_config(path: Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise BadCheckpoint(f"{path}: no such checkpoint folder")
    if not path.is_dir():
        raise BadCheckpoint(f"{path}: a checkpoint is a folder (config.json and weights), not a file")
    cfg_file = path / "config.json"
    config = config_plan.read_config(path)
    archs = config.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED), None)
    if arch is None:
        found = ", ".join(archs) if archs else f"none (model_type {config.get('model_type')!r})"
        raise BadCheckpoint(f"{cfg_file}: architecture {found} is not supported; supported: {', '.join(SUPPORTED)}")
    text_type = (config.get("text_config") or {}).get("model_type", "llama")
    if text_type not in SUPPORTED_LANGUAGE:
        raise BadCheckpoint(f"{cfg_file}: language model {text_type!r} is not supported; supported: "
                            f"{', '.join(SUPPORTED_LANGUAGE)}")
    if not any(next(path.glob(g), None) for g in WEIGHT_FILES):
        raise BadCheckpoint(f"{path}: no weights (*.safetensors or pytorch_model*.bin) next to config.json")
    config["_architecture"] = arch
    return config


def load(path: str | Path) -> Checkpoint:
    """The checkpoint's config, tokenizer and vision side; the language model is left in its shards (a 7B one is
    28 GB in fp32) for the export to stream a layer at a time."""
    import transformers

    path = Path(path)
    config = read_config(path)
    arch = config.pop("_architecture")
    try:
        cfg = transformers.AutoConfig.from_pretrained(path)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise BadCheckpoint(f"{path}: transformers could not read the checkpoint: {e}") from None
    model, shards = vision_model(getattr(transformers, arch), cfg, path)
    return Checkpoint(path, arch, model.config.to_dict(), model, tokenizer, vision_spec(path, model, tokenizer),
                      shards)


def whole(path: str | Path):
    """The whole checkpoint in fp32 as transformers loads it, and its tokenizer: the PyTorch original the bench and
    the tests run as the reference (the export itself never holds it)."""
    import torch
    import transformers

    arch = read_config(Path(path))["_architecture"]
    model = getattr(transformers, arch).from_pretrained(path, dtype=torch.float32).eval()
    return model, transformers.AutoTokenizer.from_pretrained(path)


def vision_model(cls, config, path: Path):
    """The LLaVA model with only its vision tower, projector (and image_newline) holding weights, in fp32; the
    language model stays on the meta device, taking no memory. And the checkpoint's shards, named as its modules."""
    from accelerate import init_empty_weights

    with init_empty_weights():  # parameters on "meta", buffers (position ids, rotary tables) real
        model = cls(config)
    shards = Shards(path, renamer(model))
    wanted = {n: p.shape for n, p in model.named_parameters() if not n.startswith(("model.language_model.",
                                                                                      "lm_head."))}
    weights = {}
    for name, shape in wanted.items():
        if name not in shards:
            raise BadCheckpoint(f"{shards.folder}: the weights lack {name}, which config.json's model has")
        weights[name] = shards.get(name)
        if weights[name].shape != shape:
            raise BadCheckpoint(f"{shards.where[name]}: {name} has shape {tuple(weights[name].shape)}, but "
                                f"config.json gives {tuple(shape)}")
    model.load_state_dict(weights, strict=False, assign=True)
    shards.close()
    return model.eval(), shards


def vision_spec(path: Path, model, tokenizer) -> dict:
    cfg = model.config
    vcfg = cfg.vision_config
    layer = cfg.vision_feature_layer
    strategy = cfg.vision_feature_select_strategy
    if strategy not in ("default", "full"):
        raise BadCheckpoint(f"{path / 'config.json'}: vision_feature_select_strategy {strategy!r} is not "
                            f"'default' (drop CLS) or 'full'")
    size = vcfg.image_size
    grid = size // vcfg.patch_size
    has_cls = vcfg.model_type == "clip_vision_model"
    tokens = grid * grid + int(has_cls) - int(strategy == "default")
    if tokens not in (grid * grid, grid * grid + 1):
        raise BadCheckpoint(f"{path / 'config.json'}: {vcfg.model_type} with strategy {strategy!r} gives {tokens} "
                            f"tokens per frame, not a {grid}x{grid} grid; SlowFast pooling needs the grid")
    mean, std = normalisation(path, vcfg.model_type)
    token_id = getattr(cfg, "image_token_id", None)
    if token_id is None:
        token_id = getattr(cfg, "image_token_index")
    return {
        "tower": vcfg.model_type,
        "image_size": [size, size],
        "patch_grid": [grid, grid],
        "mean": mean,
        "std": std,
        "select_layer": list(layer) if isinstance(layer, (list, tuple)) else int(layer),
        "select_strategy": strategy,
        "has_cls_token": tokens == grid * grid + 1,
        "tokens_per_frame": tokens,
        "hidden_size": projector_width(model),
        "tower_dims": {"hidden_size": vcfg.hidden_size, "intermediate_size": vcfg.intermediate_size,
                       "num_heads": vcfg.num_attention_heads, "num_layers": vcfg.num_hidden_layers},
        "image_token": tokenizer.convert_ids_to_tokens(int(token_id)),
        "image_token_id": int(token_id),
    }


def normalisation(path: Path, tower_type: str):
    pre = path / "preprocessor_config.json"
    if pre.exists():
        try:
            p = json.loads(pre.read_text())
            return [float(x) for x in p["image_mean"]], [float(x) for x in p["image_std"]]
        except (ValueError, KeyError, TypeError) as e:
            raise BadCheckpoint(f"{pre}: cannot read image_mean/image_std ({e})") from None
    if tower_type not in STANDARD_NORM:
        raise BadCheckpoint(f"{pre}: missing, and {tower_type} has no standard normalisation to fall back on")
    return STANDARD_NORM[tower_type]


def projector_width(model) -> int:
    return model.config.text_config.hidden_size
