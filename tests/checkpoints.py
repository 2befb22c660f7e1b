"""The tests' tiny random checkpoints: LLaVA-family and CLIP / SigLIP configs of the real transformers classes,
assembled by the demo's builders (sfedge.export.demo) with the real SmolLM2 tokenizer. Nothing downloads."""
from __future__ import annotations

import copy
from pathlib import Path

import transformers
from sfedge.export import demo

TINY_TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=32,
                  patch_size=8)
TINY_TEXT = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=4096)
TINY_CLIP_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                  "max_position_embeddings": 24}


def tiny_llava(out: Path, tokenizer, arch="LlavaForConditionalGeneration", tower="clip", image_size=32, patch=8,
               select_layer=-2, strategy="default", text="llama", seed=0) -> Path:
    """A tiny random LLaVA-family checkpoint folder: a CLIP or SigLIP tower, a Llama or Qwen2 language model."""
    vision_cls = transformers.CLIPVisionConfig if tower == "clip" else transformers.SiglipVisionConfig
    vcfg = vision_cls(**{**TINY_TOWER, "image_size": image_size, "patch_size": patch})
    tcfg = (transformers.Qwen2Config if text == "qwen2" else transformers.LlamaConfig)(**TINY_TEXT)
    return demo.assemble(out, arch, vcfg, tcfg, copy.deepcopy(tokenizer), select_layer=select_layer,
                         strategy=strategy, seed=seed)


def tiny_clip(llava_dir: Path, out: Path, kind: str = "clip") -> Path:
    """A tiny seeded CLIPModel / SiglipModel whose vision tower is the LLaVA checkpoint's."""
    return demo.build_clip_checkpoint(llava_dir, out, kind, text_tower=TINY_CLIP_TEXT)
