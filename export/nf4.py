"""The bitsandbytes nf4 backend, for hosts that run PyTorch: the language model quantized to nf4 through
transformers, saved in the bundle (`llm-nf4/`, its own manifest entry), and a decoder with the same interface as
the ONNX one (`forward`, `rewind`, `length`, `max_len`), so `LanguageModel` drives either.

    from sfedge.export.nf4 import NF4Decoder
    rt = Runtime.load(bundle, decoder_factory=NF4Decoder)

It lives on the export (torch) side: the runtime itself never imports torch.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from sfedge.runtime.errors import BackendUnavailable, BadBundle, BadInput

FOLDER = "llm-nf4"


def bnb_config():
    """transformers' nf4 quantization config; a clear error where bitsandbytes is missing."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise BackendUnavailable("the nf4 backend needs bitsandbytes: pip install '.[nf4]'") from None
    import torch
    import transformers

    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                           bnb_4bit_compute_dtype=torch.float32)


def write_nf4(src: Path, bundle: Path) -> dict:
    """Quantize the language model (a standalone CausalLM folder) to nf4 as transformers loads it, and save it
    (packed 4-bit safetensors) under llm-nf4/."""
    import transformers

    config = bnb_config()
    q = transformers.AutoModelForCausalLM.from_pretrained(src, quantization_config=config, device_map="cpu")
    q.save_pretrained(bundle / FOLDER)
    files = sorted(p.relative_to(bundle).as_posix() for p in (bundle / FOLDER).rglob("*") if p.is_file())
    return {"folder": FOLDER, "quantization": "bitsandbytes nf4", "files": files}


def perplexity(bundle: Path, ids: np.ndarray) -> float:
    """Perplexity of the saved nf4 model on token ids (one forward, all positions)."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(bundle / FOLDER, device_map="cpu").eval()
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(ids)[None]).logits[0, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits, torch.from_numpy(ids[1:]))
    return float(torch.exp(nll))


class NF4Decoder:
    def __init__(self, root: Path, spec: dict, max_len: int, manifest: dict | None = None):
        import transformers

        if manifest is not None and "llm_nf4" not in manifest:
            raise BadBundle(f"{root}: this bundle has no nf4 language model (export it with --nf4)")
        if max_len > spec["max_context"]:
            raise BadInput(f"context of {max_len} tokens exceeds the model's maximum of {spec['max_context']}")
        self.model = transformers.AutoModelForCausalLM.from_pretrained(Path(root) / FOLDER, device_map="cpu").eval()
        self.spec, self.max_len, self.length = spec, max_len, 0
        self.cache = transformers.DynamicCache()

    def rewind(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot rewind to {length}: cache holds {self.length} positions")
        if length == 0:
            import transformers
            self.cache = transformers.DynamicCache()
        elif length < self.length:
            self.cache.crop(length - self.length)  # transformers 5: a negative count of positions to drop
        self.length = length

    def forward(self, embeds: np.ndarray, chunk: int = 512) -> np.ndarray:
        import torch

        if self.length + len(embeds) > self.max_len:
            raise BadInput(f"context would reach {self.length + len(embeds)} tokens, over this session's limit of "
                           f"{self.max_len}")
        with torch.no_grad():
            for start in range(0, len(embeds), chunk):
                part = torch.from_numpy(np.ascontiguousarray(embeds[start:start + chunk], dtype=np.float32))[None]
                out = self.model(inputs_embeds=part, past_key_values=self.cache, use_cache=True,
                                 logits_to_keep=1)
                self.length += part.shape[1]
        return out.logits[0, -1].float().numpy()
