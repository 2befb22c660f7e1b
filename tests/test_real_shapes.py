"""sfedge.export.real_shapes: the transcribed configs give the published sizes, and a small-width build is a
checkpoint that transformers and the exporter read like a hub download."""
from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors import safe_open

from sfedge.export import checkpoint, real_shapes
from sfedge.runtime import prompt
from sfedge.runtime.errors import BadInput

SMALL_TEXT = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
SMALL_TOWER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
PUBLISHED = {"llava-1.5-7b": 7.06e9, "llava-next-video-7b": 7.06e9, "llava-onevision-qwen2-0.5b": 0.894e9}


def small(name, out, layers=2, seed=0):
    return real_shapes.build(name, out, layers=layers, text_overrides=SMALL_TEXT, vision_overrides=SMALL_TOWER,
                             seed=seed, log=lambda msg: None)


@pytest.fixture(scope="module", params=list(real_shapes.MODELS))
def built(request, tmp_path_factory):
    return request.param, small(request.param, tmp_path_factory.mktemp(request.param))


def hub_keys(folder):
    keys = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            keys.update(f.keys())
    return keys


@pytest.mark.parametrize("name", list(real_shapes.MODELS))
def test_full_configs_have_the_published_parameter_counts(name):
    model = real_shapes.meta_model(real_shapes.hub_config(name))
    assert model.device.type == "meta"
    count = sum(p.numel() for p in model.parameters())
    assert count == pytest.approx(PUBLISHED[name], rel=0.003)


def test_onevision_keeps_26_siglip_layers_and_reads_the_last():
    cfg = real_shapes.transformers_config(real_shapes.hub_config("llava-onevision-qwen2-0.5b"))
    assert (cfg.vision_config.num_hidden_layers, cfg.vision_feature_layer) == (26, -1)
    assert cfg.vision_config.image_size // cfg.vision_config.patch_size == 27


def test_small_build_loads_in_transformers_with_every_key(built):
    name, out = built
    arch = checkpoint.read_config(out)["_architecture"]
    model, info = getattr(transformers, arch).from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.config.text_config.num_hidden_layers == 2
    assert model.config.text_config.hidden_size == 128


def test_weights_are_bf16_in_shards_the_index_names(built):
    _, out = built
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = {p.name for p in out.glob("*.safetensors")}
    assert set(index["weight_map"].values()) == shards
    total = 0
    for file in shards:
        with safe_open(out / file, "pt") as f:
            assert {k for k, v in index["weight_map"].items() if v == file} == set(f.keys())
            for k in f.keys():
                t = f.get_slice(k)
                assert t.get_dtype() == "BF16"
                total += 2 * torch.Size(t.get_shape()).numel()
    assert index["metadata"]["total_size"] == total


def test_keys_are_the_hub_layout_save_pretrained_writes(built, tmp_path):
    """The same class saved by transformers: the same keys, except that transformers 5 drops the vision tower's
    `vision_model.` level, which the hub's files (and ours) keep."""
    name, out = built
    raw = json.loads((out / "config.json").read_text())
    cfg = real_shapes.transformers_config(raw)
    model = getattr(transformers, raw["architectures"][0])(cfg)
    model.save_pretrained(tmp_path)
    saved = {k.replace("vision_tower.", "vision_tower.vision_model.", 1) for k in hub_keys(tmp_path)}
    assert hub_keys(out) == saved
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in saved
    assert ("language_model.lm_head.weight" in saved) == (not raw["tie_word_embeddings"])


def test_tokenizer_specials_sit_at_the_config_ids(built):
    name, out = built
    raw = json.loads((out / "config.json").read_text())
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert len(tok) <= raw["text_config"]["vocab_size"]
    assert max(tok.get_vocab().values()) < raw["text_config"]["vocab_size"]
    assert tok.convert_tokens_to_ids("<image>") == raw["image_token_index"]
    if "video_token_index" in raw:
        assert tok.convert_tokens_to_ids("<video>") == raw["video_token_index"]
    assert tok.eos_token_id == raw["text_config"]["eos_token_id"]
    assert tok("a <image> b")["input_ids"].count(raw["image_token_index"]) == 1
    if name.startswith("llava-onevision"):
        assert tok.bos_token is None and tok.pad_token == "<|endoftext|>"
        assert tok.convert_tokens_to_ids("<|im_start|>") == 151644
    else:
        assert tok("hi")["input_ids"][0] == tok.bos_token_id == raw["text_config"]["bos_token_id"] == 1


def test_the_exporter_reads_the_build(built):
    name, out = built
    raw = checkpoint.read_config(out)
    model = getattr(transformers, raw["_architecture"]).from_pretrained(out)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    vision = checkpoint.vision_spec(out, model, tok)
    assert vision["image_token_id"] == raw["image_token_index"] and vision["image_token"] == "<image>"
    assert vision["tokens_per_frame"] == (729 if name.startswith("llava-onevision") else 576)
    spec = prompt.spec_from_tokenizer(tok, prompt.eos_ids(model, tok))
    if name.startswith("llava-onevision"):
        assert spec["suffix"] == "<|im_end|>\n<|im_start|>assistant\n" and 151645 in spec["eos_token_ids"]
    else:
        assert (spec["prefix"], spec["suffix"], spec["eos_token_ids"]) == ("USER: ", " ASSISTANT:", [2])


def test_layers_sets_the_depth(tmp_path):
    out = small("llava-1.5-7b", tmp_path / "one", layers=1)
    assert json.loads((out / "config.json").read_text())["text_config"]["num_hidden_layers"] == 1
    keys = hub_keys(out)
    assert any(k.startswith("language_model.model.layers.0.") for k in keys)
    assert not any(k.startswith("language_model.model.layers.1.") for k in keys)


def test_same_seed_same_bytes(tmp_path):
    a, b, c = (small("llava-onevision-qwen2-0.5b", tmp_path / d, seed=s) for d, s in (("a", 1), ("b", 1), ("c", 2)))
    for file in a.glob("*"):
        assert (a / file.name).read_bytes() == (b / file.name).read_bytes(), file.name
    shard = next(a.glob("*.safetensors")).name
    assert (a / shard).read_bytes() != (c / shard).read_bytes()


def test_bad_input_is_refused_in_one_line(tmp_path, capsys):
    with pytest.raises(BadInput, match="known: llava-1.5-7b"):
        real_shapes.build("llava-13b", tmp_path / "x")
    with pytest.raises(BadInput, match="between 1 and 32"):
        real_shapes.build("llava-1.5-7b", tmp_path / "x", layers=33)
    with pytest.raises(BadInput, match="seed"):
        real_shapes.build("llava-1.5-7b", tmp_path / "x", seed=-1)
    with pytest.raises(BadInput, match="no field hidden_sise"):
        real_shapes.build("llava-1.5-7b", tmp_path / "x", text_overrides={"hidden_sise": 8})
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    assert real_shapes.main(["llava-1.5-7b", str(tmp_path / "full"), "--layers", "1"]) == BadInput.exit_code
    assert "--force" in capsys.readouterr().err
    assert real_shapes.main(["nope", str(tmp_path / "y")]) == BadInput.exit_code
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "llava-onevision-qwen2-0.5b" in err
