"""Random-weight checkpoints in the exact shapes of real LLaVA-family hub models, for exporting and benchmarking at
real size where the real weights cannot be fetched.

The configs are the hub's config.json files transcribed; the folder written looks like the hub's: bf16 sharded
safetensors with an index, in the hub's key layout, plus config, generation config, preprocessor config and a
tokenizer whose special tokens sit at the real ids. The weights are seeded noise, so answers are meaningless.

Memory stays at about one shard: the model is built on the meta device for its names and shapes only, and each
shard's tensors are generated, written and dropped before the next.

    python -m sfedge.export.real_shapes NAME OUT [--layers N] [--seed S] [--force]
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import re
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

from sfedge.runtime.errors import BadInput

from .checkpoint import STANDARD_NORM

MAX_SHARD_BYTES = 2 * 10**9
BPE_VOCAB = 1000  # trained tokens; filler tokens pad the vocabulary up to the special tokens' ids
DTYPE = "bfloat16"

# The hub's names from transformers 5's module names: the language model keeps its CausalLM prefix and the vision
# tower its `vision_model` level (transformers 5 flattens both, and maps the hub names back when loading).
HUB_NAMES = (
    (r"^model\.language_model\.", "language_model.model."),
    (r"^lm_head\.", "language_model.lm_head."),
    (r"^model\.vision_tower\.(vision_model\.)?", "vision_tower.vision_model."),
    (r"^model\.", ""),  # multi_modal_projector, image_newline
)

# Vicuna as llava-hf serves it: "USER: <image>\n... ASSISTANT:", a system prompt before the turns. Content may be a
# string or a list of parts (images and videos first, as the llava-hf processors render them).
VICUNA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}"
    "{% else %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\n' }}{% endfor %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'text') %}{{ part['text'] + ' ' }}{% endfor %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# Qwen2-Instruct's ChatML, with its default system prompt, which LLaVA-OneVision was trained with.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\n' }}{% endfor %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'text') %}{{ part['text'] }}{% endfor %}"
    "{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Tokens:
    ids: dict  # special token -> its id in the real tokenizer
    eos: str
    pad: str
    template: str
    bos: str | None = None
    unk: str | None = None


@dataclass(frozen=True)
class RealModel:
    hub: str
    config: dict  # the hub's config.json
    tokens: Tokens
    processor: dict  # the hub's preprocessor_config.json, less the tower's mean and std


CLIP_L_336 = {  # openai/clip-vit-large-patch14-336, as the llava-hf configs carry it
    "model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
    "num_attention_heads": 16, "image_size": 336, "patch_size": 14, "projection_dim": 768,
}
VICUNA_7B = {  # lmsys/vicuna-7b-v1.5 (Llama-2-7B)
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 11008,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32064,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "hidden_act": "silu",
    "initializer_range": 0.02, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "tie_word_embeddings": False,
}
VICUNA_TOKENS = {"<unk>": 0, "<s>": 1, "</s>": 2}
CLIP_PROCESSOR = {"do_resize": True, "size": {"shortest_edge": 336}, "do_center_crop": True,
                  "crop_size": {"height": 336, "width": 336}, "resample": 3, "do_rescale": True,
                  "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True}
NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
ONEVISION_PINPOINTS = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]  # 384..2304 both ways

MODELS = {
    "llava-1.5-7b": RealModel(  # llava-hf/llava-1.5-7b-hf
        hub="llava-hf/llava-1.5-7b-hf",
        config={
            "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
            "image_token_index": 32000, "pad_token_id": 32001, "image_seq_length": 576,
            "projector_hidden_act": "gelu", "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
            "tie_word_embeddings": False, "ignore_index": -100,
            "text_config": {**VICUNA_7B, "pad_token_id": 32001},
            "vision_config": CLIP_L_336,
        },
        tokens=Tokens({**VICUNA_TOKENS, "<image>": 32000, "<pad>": 32001}, bos="<s>", eos="</s>", unk="<unk>",
                      pad="<pad>", template=VICUNA_TEMPLATE),
        processor={"image_processor_type": "CLIPImageProcessor", **CLIP_PROCESSOR},
    ),
    "llava-next-video-7b": RealModel(  # llava-hf/LLaVA-NeXT-Video-7B-hf
        hub="llava-hf/LLaVA-NeXT-Video-7B-hf",
        config={
            "architectures": ["LlavaNextVideoForConditionalGeneration"], "model_type": "llava_next_video",
            "image_token_index": 32001, "video_token_index": 32000, "image_seq_length": 576,
            "video_seq_length": 288, "image_grid_pinpoints": NEXT_PINPOINTS, "use_image_newline_parameter": True,
            "spatial_pool_mode": "average", "spatial_pool_stride": 2, "spatial_pool_out_channels": 1024,
            "projector_hidden_act": "gelu", "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
            "tie_word_embeddings": False, "ignore_index": -100,
            "text_config": VICUNA_7B,
            "vision_config": CLIP_L_336,
        },
        # Vicuna pads with <unk>; llava-hf added <video> then <image>.
        tokens=Tokens({**VICUNA_TOKENS, "<video>": 32000, "<image>": 32001}, bos="<s>", eos="</s>", unk="<unk>",
                      pad="<unk>", template=VICUNA_TEMPLATE),
        processor={"image_processor_type": "LlavaNextImageProcessor", **CLIP_PROCESSOR, "do_pad": True,
                   "image_grid_pinpoints": NEXT_PINPOINTS},
    ),
    "llava-onevision-qwen2-0.5b": RealModel(  # llava-hf/llava-onevision-qwen2-0.5b-ov-hf
        hub="llava-hf/llava-onevision-qwen2-0.5b-ov-hf",
        config={
            "architectures": ["LlavaOnevisionForConditionalGeneration"], "model_type": "llava_onevision",
            "image_token_index": 151646, "video_token_index": 151647, "image_grid_pinpoints": ONEVISION_PINPOINTS,
            "use_image_newline_parameter": True, "vision_aspect_ratio": "anyres_max_9",
            "projector_hidden_act": "gelu", "vision_feature_layer": -1, "vision_feature_select_strategy": "full",
            "tie_word_embeddings": True, "ignore_index": -100,
            "text_config": {  # Qwen/Qwen2-0.5B-Instruct; vocab 151936 + <image>, <video>, padded to 64
                "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 896,
                "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
                "num_key_value_heads": 2, "vocab_size": 152000, "max_position_embeddings": 32768,
                "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "hidden_act": "silu", "initializer_range": 0.02,
                "sliding_window": 32768, "max_window_layers": 24, "use_sliding_window": False,
                "bos_token_id": 151643, "eos_token_id": 151645, "tie_word_embeddings": True,
            },
            "vision_config": {  # google/siglip-so400m-patch14-384 less its last layer and its head
                "model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
                "num_hidden_layers": 26, "num_attention_heads": 16, "image_size": 384, "patch_size": 14,
                "vision_use_head": False,
            },
        },
        tokens=Tokens({"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<image>": 151646,
                       "<video>": 151647}, eos="<|im_end|>", pad="<|endoftext|>", template=CHATML_TEMPLATE),
        processor={"image_processor_type": "LlavaOnevisionImageProcessor", "do_resize": True,
                   "size": {"height": 384, "width": 384}, "resample": 3, "do_rescale": True,
                   "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True, "do_pad": True,
                   "image_grid_pinpoints": ONEVISION_PINPOINTS},
    ),
}


def real_model(name: str) -> RealModel:
    if name not in MODELS:
        raise BadInput(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    return MODELS[name]


def hub_config(name: str, *, layers: int | None = None, text_overrides: dict | None = None,
               vision_overrides: dict | None = None) -> dict:
    """The hub's config.json for `name`, with the overrides applied and the dtype set to bf16."""
    raw = copy.deepcopy(real_model(name).config)
    for part, overrides in (("text_config", text_overrides), ("vision_config", vision_overrides)):
        unknown = sorted(set(overrides or {}) - known_fields(raw[part]))
        if unknown:
            raise BadInput(f"{part} has no field {', '.join(unknown)}")
        raw[part].update(overrides or {})
    if layers is not None:
        full = raw["text_config"]["num_hidden_layers"]
        if not 1 <= layers <= full:
            raise BadInput(f"--layers must be between 1 and {full} (the language model's depth), not {layers}")
        raw["text_config"]["num_hidden_layers"] = layers
    top = max(real_model(name).tokens.ids.values())
    if raw["text_config"]["vocab_size"] <= top:
        raise BadInput(f"vocab_size must exceed {top}, the id of the last special token")
    for cfg in (raw, raw["text_config"], raw["vision_config"]):
        cfg["torch_dtype"] = DTYPE
    return raw


def known_fields(sub: dict) -> set:
    import transformers

    return set(sub) | set(transformers.CONFIG_MAPPING[sub["model_type"]]().to_dict())


def transformers_config(raw: dict):
    """The config transformers reads from `raw` (what from_pretrained would build from the folder)."""
    import transformers

    return transformers.CONFIG_MAPPING[raw["model_type"]].from_dict(raw)


def meta_model(raw: dict):
    """The model on the meta device: names, shapes and dtypes, no memory."""
    import torch
    import transformers

    with torch.device("meta"):
        return getattr(transformers, raw["architectures"][0])(transformers_config(raw))


def hub_name(name: str) -> str:
    for pattern, repl in HUB_NAMES:
        new, n = re.subn(pattern, repl, name)
        if n:
            return new
    raise AssertionError(f"no hub name for {name}")


def tensor_specs(model) -> list[tuple[str, tuple]]:
    """(hub name, shape) of every tensor the checkpoint holds; a tied lm_head is left out, as save_pretrained does."""
    seen, specs = set(), []
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            specs.append((hub_name(name), tuple(t.shape)))
    return specs


def shard_plan(specs: list[tuple[str, tuple]]) -> list[list[tuple[str, tuple]]]:
    """Tensors in model order, cut into shards of at most MAX_SHARD_BYTES of bf16."""
    shards, size = [[]], 0
    for name, shape in specs:
        nbytes = 2 * math.prod(shape)
        if shards[-1] and size + nbytes > MAX_SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def random_tensor(name: str, shape: tuple, std: float, seed: int):
    """Biases 0, norm scales 1, the rest N(0, std). Each tensor has its own generator seeded from its name, so a
    tensor's values depend on neither the shard layout nor the depth."""
    import torch

    if name.endswith(".bias") or name.endswith("_bias"):
        return torch.zeros(shape, dtype=torch.bfloat16)
    if len(shape) == 1 and "norm" in name:
        return torch.ones(shape, dtype=torch.bfloat16)
    # torch's CPU generator keeps 32 bits of a seed: the seed starts the CRC of the name, giving one 32-bit value.
    g = torch.Generator().manual_seed(zlib.crc32(name.encode(), seed))
    return torch.empty(shape).normal_(0.0, std, generator=g).to(torch.bfloat16)


def write_weights(out: Path, specs: list, std: float, seed: int, log=print) -> None:
    from safetensors.torch import save_file

    shards = shard_plan(specs)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: random_tensor(name, shape, std, seed) for name, shape in shard}
        save_file(tensors, out / file, metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map.update({name: file for name in tensors})
        log(f"  {file}: {len(tensors)} tensors")
        del tensors  # before the next shard is generated: memory peaks at one shard
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def tokenizer(tokens: Tokens, max_length: int):
    """A byte-level BPE trained on the calibration English, padded with `<unused_N>` fillers so that every special
    token sits at its real id; the vocabulary ends at the last special token."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from sfedge.calibration import english_text

    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trained.train_from_iterator([english_text()], trainers.BpeTrainer(
        vocab_size=BPE_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    model = json.loads(trained.to_str())["model"]
    learned = sorted(model["vocab"], key=model["vocab"].get)
    free = (i for i in range(max(tokens.ids.values()) + 1) if i not in tokens.ids.values())
    vocab = {**tokens.ids, **{tok: next(free) for tok in learned if tok not in tokens.ids}}
    vocab.update({f"<unused_{i}>": i for i in free})
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]  # "a b" < 0.20

    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens.ids])
    if tokens.bos:  # Llama's tokenizer puts BOS before every sequence
        bos = (tokens.bos, tokens.ids[tokens.bos])
        tok.post_processor = processors.TemplateProcessing(single=f"{bos[0]} $A", pair=f"{bos[0]} $A {bos[0]} $B",
                                                           special_tokens=[bos])
    named = {tokens.bos, tokens.eos, tokens.pad, tokens.unk}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=tokens.bos, eos_token=tokens.eos,
                                   pad_token=tokens.pad, unk_token=tokens.unk, model_max_length=max_length,
                                   extra_special_tokens=[t for t in tokens.ids if t not in named])
    fast.chat_template = tokens.template
    return fast


def write_side_files(out: Path, model: RealModel, raw: dict) -> None:
    text = raw["text_config"]
    gen = {"bos_token_id": text.get("bos_token_id"), "eos_token_id": text["eos_token_id"],
           "pad_token_id": raw.get("pad_token_id", text.get("pad_token_id"))}
    write_json(out / "generation_config.json", {k: v for k, v in gen.items() if v is not None})
    mean, std = STANDARD_NORM[raw["vision_config"]["model_type"]]
    write_json(out / "preprocessor_config.json", {**model.processor, "image_mean": mean, "image_std": std})
    tokenizer(model.tokens, text["max_position_embeddings"]).save_pretrained(out)


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def build(name: str, out, *, layers: int | None = None, text_overrides: dict | None = None,
          vision_overrides: dict | None = None, seed: int = 0, force: bool = False, log=print) -> Path:
    """Write a random-weight checkpoint of `name` to `out` and return it. `layers` keeps the language model's first
    N decoder layers; the overrides change config fields (e.g. hidden_size) for small stand-ins."""
    model = real_model(name)
    if not 0 <= seed < 2**32:
        raise BadInput(f"the seed must be an integer from 0 to 2**32 - 1, not {seed}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BadInput(f"{out}: exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise BadInput(f"{out}: not empty; pass --force to replace the checkpoint in it")
        for stale in [out / "config.json", *out.glob("model*.safetensors"), *out.glob("model*.safetensors.index.json")]:
            stale.unlink(missing_ok=True)
    raw = hub_config(name, layers=layers, text_overrides=text_overrides, vision_overrides=vision_overrides)
    specs = tensor_specs(meta_model(raw))
    out.mkdir(parents=True, exist_ok=True)
    log(f"{name} ({model.hub} shapes): {sum(math.prod(s) for _, s in specs) / 1e9:.2f}B parameters -> {out}")
    write_weights(out, specs, raw["text_config"]["initializer_range"], seed, log)
    write_side_files(out, model, raw)
    write_json(out / "config.json", raw)  # last: a folder without it is an unfinished build
    return out


def main(argv=None) -> int:
    from sfedge.runtime.clitools import run_cli

    parser = argparse.ArgumentParser(prog="python -m sfedge.export.real_shapes", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", metavar="NAME", help=f"one of: {', '.join(MODELS)}")
    parser.add_argument("out", metavar="OUT", type=Path, help="the checkpoint folder to write")
    parser.add_argument("--layers", type=int, help="keep only the language model's first N decoder layers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="replace a checkpoint already in OUT")
    args = parser.parse_args(argv)
    log = functools.partial(print, file=sys.stderr, flush=True)
    return run_cli("real_shapes", lambda: print(build(args.name, args.out, layers=args.layers, seed=args.seed,
                                                      force=args.force, log=log)))


if __name__ == "__main__":
    sys.exit(main())
