"""The layer-streamed export: the reference equals transformers' whole model, sharded checkpoints in the hub's
layout are read tensor by tensor, broken ones are refused with the file named and nothing left behind, and peak
memory does not grow with depth."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from conftest import export_tiny
from sfedge.export import checkpoint as ckpt_io
from sfedge.export import real_shapes
from sfedge.export.llm_fidelity import verdict
from sfedge.export.streamed import LayerStream
from sfedge.runtime.errors import BadCheckpoint


@pytest.mark.parametrize("text", ["llama", "qwen2"])
def test_the_streamed_reference_is_transformers_whole_model(make_checkpoint, text):
    path = make_checkpoint(text=text)
    ck = ckpt_io.load(path)
    stream = LayerStream(ck.shards, ck.model.config.text_config)
    whole = transformers.LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    x = torch.randn(2, 37, stream.config.hidden_size)
    with torch.no_grad():
        want = [whole.model.language_model(inputs_embeds=s[None]).last_hidden_state[0] @ whole.lm_head.weight.T
                for s in x]
    got = [h @ stream.lm_head().T for h in stream.forward({"x": list(x)})["x"]]
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    assert ck.model.model.language_model.layers[0].mlp.up_proj.weight.is_meta  # never loaded whole


def sharded(make_checkpoint, tmp_path, text="llama"):
    """A tiny checkpoint re-saved in small shards with an index, as the hub ships big models."""
    src = make_checkpoint(text=text)
    model = transformers.LlavaForConditionalGeneration.from_pretrained(src)
    out = tmp_path / "sharded"
    model.save_pretrained(out, max_shard_size="200KB")
    for f in src.iterdir():
        if not f.name.startswith("model") and f.is_file():
            (out / f.name).write_bytes(f.read_bytes())
    assert len(list(out.glob("*.safetensors"))) > 2
    return out


def assert_nothing_left(out):
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.partial-*"))


def test_a_sharded_checkpoint_exports_like_a_single_file(make_checkpoint, tmp_path):
    a = export_tiny(make_checkpoint(), tmp_path / "a")
    b = export_tiny(sharded(make_checkpoint, tmp_path), tmp_path / "b")
    assert a["fidelity"]["llm"]["perplexity"]["reference"] == b["fidelity"]["llm"]["perplexity"]["reference"]
    assert a["artifacts"]["llm/model.onnx.data"]["sha256"] == b["artifacts"]["llm/model.onnx.data"]["sha256"]


def test_a_missing_shard_is_named(make_checkpoint, tmp_path):
    ckpt = sharded(make_checkpoint, tmp_path)
    shard = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]["language_model.lm_head.weight"]
    (ckpt / shard).unlink()
    with pytest.raises(BadCheckpoint, match=f"model.safetensors.index.json: names shard {shard}, which is missing"):
        export_tiny(ckpt, tmp_path / "out")
    assert_nothing_left(tmp_path / "out")


def test_a_truncated_shard_is_named(make_checkpoint, tmp_path):
    ckpt = sharded(make_checkpoint, tmp_path)
    shard = sorted(ckpt.glob("*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[:len(data) // 2])
    with pytest.raises(BadCheckpoint, match=f"{shard.name}: truncated"):
        export_tiny(ckpt, tmp_path / "out")
    assert_nothing_left(tmp_path / "out")


def test_a_config_that_disagrees_with_the_weights_is_named(make_checkpoint, tmp_path):
    ckpt = sharded(make_checkpoint, tmp_path)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["text_config"]["intermediate_size"] += 32
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BadCheckpoint, match=r"\.safetensors: model\.language_model\.layers\.0\.mlp\.\w+_proj\.weight "
                                            r"has shape .*, but config\.json gives"):
        export_tiny(ckpt, tmp_path / "out")
    assert_nothing_left(tmp_path / "out")


def test_the_gate_holds_for_any_distribution():
    """Near-flat logits (random weights): top-5 overlap is noise, KL and perplexity are not. Peaked random logits:
    a correct int4 copy loses a share of the entropy like a trained model's does. A broken quantization fails on KL
    even where perplexity happens to pass."""
    def figures(ratio, kl, entropy, top5):
        tf = {"mean_kl": kl, "mean_entropy": entropy, "mean_top5_overlap": top5, "min_cosine": 0.9}
        return {"perplexity": {"reference": 10.0, "exported": 10.0 * ratio, "mean_kl": kl, "mean_entropy": entropy},
                "teacher_forced": tf, "teacher_forced_video": tf}

    assert verdict(figures(0.965, 0.002, 11.9, 1.72), "int4")["passed"]  # OneVision-0.5B shape, random weights
    assert verdict(figures(0.985, 0.80, 9.5, 0.11), "int4")["passed"]  # LLaVA-NeXT-Video-7B shape, random weights
    assert verdict(figures(1.14, 0.25, 2.9, 3.3), "int4")["passed"]  # SmolLM2, imatrix
    assert not verdict(figures(1.05, 2.5, 2.9, 0.5), "int4")["passed"]  # most of the distribution lost
    assert not verdict(figures(1.5, 0.1, 2.9, 4.5), "int4")["passed"]


PEAK = """
import resource, sys
from sfedge.export.bundle import Log, Options, export
export(sys.argv[1], sys.argv[2], Options(num_frames=4, slow_frames=2, vision_variants=("fp32",),
       fidelity_text_tokens=512), Log(quiet=True))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_depth(tmp_path):
    """At a width of 512, 6 layers against 2: the export's peak grows by at most a quarter of the four extra
    layers' fp32 bytes (a whole-model export would grow by several times them)."""
    text = dict(hidden_size=512, intermediate_size=1376, num_attention_heads=8, num_key_value_heads=8,
                vocab_size=32064)
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=56)
    peaks = {}
    for layers in (2, 6):
        ckpt = real_shapes.build("llava-1.5-7b", tmp_path / f"c{layers}", layers=layers, text_overrides=text,
                                 vision_overrides=vision, log=lambda m: None)
        run = subprocess.run([sys.executable, "-c", PEAK, str(ckpt), str(tmp_path / f"b{layers}")],
                             capture_output=True, text=True, check=True)
        peaks[layers] = int(run.stdout.split()[-1])
    layer_fp32 = 4 * (4 * 512 * 512 + 3 * 512 * 1376)
    print(f"peak resident memory: 2 layers {peaks[2] >> 20} MB, 6 layers {peaks[6] >> 20} MB; a quarter of the 4 "
          f"layers' fp32 bytes: {layer_fp32 >> 20} MB")
    assert peaks[6] - peaks[2] <= 0.25 * 4 * layer_fp32, peaks


def test_a_pytorch_bin_checkpoint_exports_like_safetensors(make_checkpoint, tmp_path):
    """Older hub checkpoints ship pytorch_model.bin: read memory-mapped, tensor by tensor, to the same bundle."""
    from safetensors.torch import load_file

    src = make_checkpoint()
    ckpt = tmp_path / "bin"
    ckpt.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (ckpt / f.name).write_bytes(f.read_bytes())
    torch.save(load_file(src / "model.safetensors"), ckpt / "pytorch_model.bin")
    a = export_tiny(src, tmp_path / "a")
    b = export_tiny(ckpt, tmp_path / "b")
    assert a["artifacts"]["llm/model.onnx.data"]["sha256"] == b["artifacts"]["llm/model.onnx.data"]["sha256"]


def test_a_layer_weight_the_graph_has_no_place_for_is_refused(tmp_path):
    """A Llama with attention_bias (an o_proj bias) is refused, not exported without it."""
    from sfedge.export.decoder_graph import DecoderGraph, Scheme

    dims = dict(hidden_size=8, num_heads=2, num_kv_heads=2, head_dim=4, rms_norm_eps=1e-5, vocab_size=16,
                num_layers=1)
    graph = DecoderGraph(tmp_path, dims, Scheme("fp32", "rtn", 32, 1), (np.zeros((4, 2)), np.zeros((4, 2))), False)
    w = {"self_attn.o_proj.bias": np.zeros(8, np.float32)}
    with pytest.raises(BadCheckpoint, match="decoder layer 0 has self_attn.o_proj.bias, which the exported graph"):
        graph.layer(0, w, None, None)
