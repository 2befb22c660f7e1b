"""The language model in PyTorch, one decoder layer at a time (as AutoAWQ and GPTQ calibrate): a layer's weights
are read from the checkpoint's shards and converted to fp32, every sequence passes through it, its statistics are
taken, and it is dropped before the next is read. Memory is one layer plus the sequences' hidden states, whatever
the depth, so a 7B model is measured in fp32 on a machine that could not hold it.

The layers are transformers' own decoder-layer classes (Llama, Mistral, Qwen2) built from the checkpoint's config,
so the reference is the library's arithmetic, not a rewrite of it.
"""
from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path

import numpy as np
import torch
import transformers

from sfedge.runtime.errors import BadCheckpoint
from sfedge.runtime.memory import give_back

from .shards import LANGUAGE, Shards

SAMPLE_TOKENS = 512  # calibration sequences are cut to this length: activations, not attention spans, matter here


class LayerStream:
    """`prefix`: where the language model's tensors are named, LANGUAGE in a LLaVA checkpoint, "model." in a
    standalone CausalLM's."""

    def __init__(self, shards: Shards, text_config, prefix: str = LANGUAGE):
        from accelerate import init_empty_weights

        config = copy.deepcopy(text_config)
        config._attn_implementation = "sdpa"  # without a mask, sdpa attends causally
        with init_empty_weights():  # parameters on the meta device (no memory); rotary buffers real
            self.skeleton = transformers.AutoModelForCausalLM.from_config(config)
        self.shards, self.config, self.prefix = shards, config, prefix
        self.num_layers = config.num_hidden_layers
        if not shards.names(f"{prefix}layers.{self.num_layers - 1}."):
            raise BadCheckpoint(f"{shards.folder / 'config.json'}: says {self.num_layers} language-model layers, but "
                                f"the weights have no layer {self.num_layers - 1}")

    def embeddings(self) -> torch.Tensor:
        return self.shards.get(f"{self.prefix}embed_tokens.weight")

    def lm_head(self) -> torch.Tensor:
        """lm_head's weight, or the embedding table when the two are tied (and the checkpoint stores one)."""
        return self.shards.get("lm_head.weight" if "lm_head.weight" in self.shards
                               else f"{self.prefix}embed_tokens.weight")

    def layer(self, i: int) -> torch.nn.Module:
        return self._load(self.skeleton.model.layers[i], f"{self.prefix}layers.{i}.")

    def norm(self) -> torch.nn.Module:
        return self._load(self.skeleton.model.norm, f"{self.prefix}norm.")

    def _load(self, module: torch.nn.Module, prefix: str) -> torch.nn.Module:
        weights = self.shards.state_dict(prefix)
        want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        for name, shape in want.items():
            if name not in weights:
                raise BadCheckpoint(f"{self.shards.folder}: the weights lack {prefix}{name}, which config.json's "
                                    f"{self.config.model_type} layer has")
            if tuple(weights[name].shape) != shape:
                raise BadCheckpoint(f"{self.shards.where[prefix + name]}: {prefix}{name} has shape "
                                    f"{tuple(weights[name].shape)}, but config.json gives {shape}")
        module.load_state_dict({k: weights[k] for k in want}, assign=True)
        return module.eval()

    def release(self, module: torch.nn.Module) -> None:
        module.to("meta")
        self.shards.close()
        give_back()

    def rotary(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [1, length, head_dim] of positions 0..length-1, by the model's own rotary embedding."""
        return self.skeleton.model.rotary_emb(torch.zeros(1), torch.arange(length)[None])

    def forward(self, groups: dict[str, list[torch.Tensor]], observer=None, progress=None) -> dict:
        """Groups of sequences ([n, hidden] embeddings, each attended on its own) through every layer; returns each
        group's final normed hidden states. `observer(i, module, run)` is called with each loaded layer and must
        call `run(group)` for every group (hooks may watch a run); without an observer every group is run."""
        hidden = {g: [s.float()[None] for s in seqs] for g, seqs in groups.items()}
        rotary = {len(s): self.rotary(len(s)) for seqs in groups.values() for s in seqs}
        for i in range(self.num_layers):
            module = self.layer(i)

            def run(group, module=module):
                with torch.no_grad():
                    hidden[group] = [module(h, position_embeddings=rotary[h.shape[1]]) for h in hidden[group]]

            if observer:
                observer(i, module, run)
            else:
                for group in hidden:
                    run(group)
            self.release(module)
            if progress:
                progress.update(1)
        norm = self.norm()
        with torch.no_grad():
            out = {g: [norm(h)[0] for h in hs] for g, hs in hidden.items()}
        self.release(norm)
        return out


@contextlib.contextmanager
def calibration(stream: LayerStream, module: torch.nn.Module, hessian: bool = False):
    """Statistics of the runs inside the block on decoder layer `module`: the mean square of each MatMul input's
    channels (the importance the 4-bit search weighs errors by, as llama.cpp's imatrix; keyed "qkv", "o",
    "gate_up", "down"), with `hessian` their whole second moment E[x x^T] (GPTQ's), and the absmax of its keys
    after RoPE and of its values (the int8 KV cache's scales). Yields a dict filled in when the block ends:
    "importance", "hessian" (or None) and "kv_max"."""
    sums, products, kv_max, count, stats = {}, {}, [0.0, 0.0], [0], {}
    head_dim = module.self_attn.head_dim

    def square(key):
        def hook(_, args, __):
            x = args[0].reshape(-1, args[0].shape[-1])
            sums[key] = sums.get(key, 0) + (x.double() ** 2).sum(0)
            if hessian:  # float32 sums of float32 products: a few thousand tokens lose nothing that matters
                if key in products:
                    products[key].addmm_(x.T, x)
                else:
                    products[key] = x.T @ x
            count[0] += len(x) if key == "qkv" else 0
        return hook

    def keys(_, __, out):
        k = out.view(1, out.shape[1], -1, head_dim).transpose(1, 2)
        cos, sin = stream.rotary(out.shape[1])
        k = transformers.models.llama.modeling_llama.apply_rotary_pos_emb(k, k, cos, sin)[0]
        kv_max[0] = max(kv_max[0], float(k.abs().max()))

    def values(_, __, out):
        kv_max[1] = max(kv_max[1], float(out.abs().max()))

    handles = [module.get_submodule(name).register_forward_hook(square(key)) for name, key in MATMUL_INPUTS.items()]
    handles += [module.self_attn.k_proj.register_forward_hook(keys),
                module.self_attn.v_proj.register_forward_hook(values)]
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()
    mean = lambda d: {k: (v / count[0]).numpy() for k, v in d.items()} if count[0] else None
    stats["importance"], stats["hessian"] = mean(sums), mean(products) if hessian else None
    stats["kv_max"] = tuple(kv_max)


# The input each group of the graph's MatMuls reads: q, k and v share one (one MatMulNBits), gate and up another.
MATMUL_INPUTS = {"self_attn.q_proj": "qkv", "self_attn.o_proj": "o", "mlp.gate_proj": "gate_up",
                 "mlp.down_proj": "down"}


def chunks(samples: list[np.ndarray]) -> list[torch.Tensor]:
    """Calibration samples cut to SAMPLE_TOKENS-long sequences."""
    return [torch.from_numpy(np.ascontiguousarray(s[i:i + SAMPLE_TOKENS], np.float32))
            for s in samples for i in range(0, len(s), SAMPLE_TOKENS)]


def second_moment(x: torch.Tensor, full: bool = False) -> np.ndarray:
    """Per channel E[x^2] (the importance); with `full`, the whole E[x x^T] (GPTQ's Hessian)."""
    x = x.reshape(-1, x.shape[-1]).double()
    return ((x.T @ x if full else (x * x).sum(0)) / max(len(x), 1)).numpy()


def causal_lm_folder(stream: LayerStream, out: Path) -> Path:
    """The language model as a standalone CausalLM checkpoint (what transformers' quantizers and the bench's
    reference load), written a layer per file in the dtype the checkpoint stores: never whole in memory."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(stream.config)
    config.architectures = [type(stream.skeleton).__name__]
    config.save_pretrained(out)
    groups = [[f"layers.{i}."] for i in range(stream.num_layers)] + [["embed_tokens.", "norm."]]
    weight_map = {}
    for n, prefixes in enumerate(groups):
        name = f"model-{n + 1:05d}-of-{len(groups) + 1:05d}.safetensors"
        tensors = {f"model.{k[len(stream.prefix):]}": stream.shards.get(k, None).contiguous()
                   for p in prefixes for k in stream.shards.names(stream.prefix + p)}
        save_file(tensors, out / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
    name = f"model-{len(groups) + 1:05d}-of-{len(groups) + 1:05d}.safetensors"
    save_file({"lm_head.weight": stream.lm_head().contiguous()}, out / name, metadata={"format": "pt"})
    weight_map["lm_head.weight"] = name
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out
