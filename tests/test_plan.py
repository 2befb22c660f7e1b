"""sf-run plan before export: the plan from a checkpoint's config.json against the plan of the bundle exported from
it, transformers' config defaults, device targets and the predicted decode speed."""
import json
import subprocess
import sys

import pytest

from conftest import export_tiny
from sfedge.runtime import cpu, targets, tuning
from sfedge.runtime.config_plan import SUPPORTED, manifest_from_config, read_config
from sfedge.runtime.errors import BadInput
from sfedge.runtime.planner import decode_bytes_per_token, least_plan, make_plan, most_frames
from sfedge.runtime.tokens import kv_bytes_per_token

# llava-hf/LLaVA-NeXT-Video-7B-hf's shapes (its public config.json): CLIP-L/14-336 tower and Vicuna-7B, the model
# SlowFast-LLaVA-7B runs on.
NEXT_VIDEO_7B = {
    "architectures": ["LlavaNextVideoForConditionalGeneration"], "model_type": "llava_next_video",
    "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
    "text_config": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                    "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32064,
                    "max_position_embeddings": 4096},
    "vision_config": {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
                      "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14},
}


def cli(*args, **env):
    import os

    return subprocess.run([sys.executable, "-m", "sfedge.runtime.cli", "plan", *map(str, args)], capture_output=True,
                          text=True, env={**os.environ, **env})


@pytest.fixture
def next_video_7b(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(NEXT_VIDEO_7B))
    return tmp_path


@pytest.mark.parametrize("text,precision", [("llama", "int4"), ("qwen2", "int4"), ("llama", "int8")])
def test_plan_from_config_matches_the_exported_bundle(make_checkpoint, tmp_path, text, precision):
    """Tiny models' graphs are mostly ONNX structure (a 30K-parameter tower in a 322 KB graph), so the comparison
    is of what structure does not dominate: the 4-bit language model's weights within 5% (the tensors are the
    predicted bytes exactly; the writer page-aligns each in model.onnx.data, 2.6% here, under 0.1% for a 7B), the
    other parts within 1%, and the plan's total within 5%. The tiny vision graphs are printed, not asserted: the
    per-layer structure allowance is measured on a ViT-B/16 (within 0.2% there) and undercounts a 32-wide tower's
    graph by ~25%."""
    ckpt = make_checkpoint(text=text)
    bundle = export_tiny(ckpt, tmp_path / "b", llm_precision=precision, embeddings="float16", allow_low_fidelity=True)
    agg = bundle["aggregator"]
    predicted = manifest_from_config(read_config(ckpt), frames=agg["num_frames"], slow_frames=agg["slow_frames"],
                                     llm_precision=precision, tokenizer_bytes=(ckpt / "tokenizer.json").stat().st_size)
    got, want = make_plan(predicted), make_plan(bundle)
    assert list(got.parts) == list(want.parts)
    # the int8 twin of a 4-bit model: written by default for small models
    weights = "llm weights (int4, with its prefill twin)" if precision == "int4" else "llm weights (int8)"
    assert got.parts[weights] == pytest.approx(want.parts[weights], rel=0.05)
    for part in ("embedding table", "kv cache", "video frames + tokens", "tokenizer", "runtime"):
        assert got.parts[part] == pytest.approx(want.parts[part], rel=0.01), part
    assert got.total == pytest.approx(want.total, rel=0.05)
    print(f"{text}: total {got.total:,} predicted vs {want.total:,} exported; llm weights "
          f"{got.parts[weights]:,} vs {want.parts[weights]:,}; vision int8 "
          f"{got.parts['vision weights (int8)']:,} vs {want.parts['vision weights (int8)']:,}")


@pytest.mark.parametrize("arch", list(SUPPORTED))
def test_config_defaults_are_transformers_own(arch):
    """A config saved with only what differs from transformers' defaults (as hub configs are) plans as the full one,
    and a config with no sub-configs gets the LLaVA class's default tower and language model."""
    import transformers

    cls = getattr(transformers, arch.replace("ForConditionalGeneration", "Config"))
    text = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[SUPPORTED[arch][0]]
    full = cls(text_config=text(vocab_size=1000, num_hidden_layers=3).to_dict()).to_dict()
    diff = cls(text_config=text(vocab_size=1000, num_hidden_layers=3).to_dict()).to_diff_dict()
    for config in (full, diff):
        config["architectures"] = [arch]
    assert manifest_from_config(full)["llm"] == manifest_from_config(diff)["llm"]
    assert manifest_from_config(full)["vision"] == manifest_from_config(diff)["vision"]
    bare = manifest_from_config({"architectures": [arch]})
    model = cls()
    tower, lm = model.vision_config, model.text_config
    assert bare["vision"]["tower_dims"] == {"hidden_size": tower.hidden_size, "num_heads": tower.num_attention_heads,
                                            "intermediate_size": tower.intermediate_size,
                                            "num_layers": tower.num_hidden_layers}
    assert bare["vision"]["select_layer"] == model.vision_feature_layer
    assert bare["vision"]["select_strategy"] == model.vision_feature_select_strategy
    assert bare["vision"]["image_size"] == [tower.image_size] * 2
    llm = bare["llm"]
    assert (llm["num_layers"], llm["hidden_size"], llm["intermediate_size"], llm["vocab_size"], llm["num_kv_heads"],
            llm["max_context"]) == (lm.num_hidden_layers, lm.hidden_size, lm.intermediate_size, lm.vocab_size,
                                    lm.num_key_value_heads, lm.max_position_embeddings)
    for kind in ("llama", "mistral", "qwen2"):
        lm = transformers.AutoConfig.for_model(kind)
        llm = manifest_from_config({"architectures": [arch], "text_config": {"model_type": kind}})["llm"]
        assert (llm["num_layers"], llm["hidden_size"], llm["intermediate_size"], llm["vocab_size"],
                llm["num_kv_heads"], llm["max_context"]) == (lm.num_hidden_layers, lm.hidden_size,
                                                             lm.intermediate_size, lm.vocab_size,
                                                             lm.num_key_value_heads, lm.max_position_embeddings)


def test_7b_llm_bytes_are_4bit_codes_and_fp32_block_scales():
    m = manifest_from_config(NEXT_VIDEO_7B)
    linear = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008) + 32064 * 4096  # decoder Linears + lm_head
    rotary = 2 * 4 * 4096 * 64
    norms = 4 * (2 * 32 + 1) * 4096
    assert m["artifacts"]["llm/model.onnx.data"]["size"] == linear // 2 + 4 * linear // 32 + rotary + norms
    assert m["artifacts"]["llm/embed.fp16.npy"]["size"] == 128 + 2 * 32064 * 4096
    blocks128 = manifest_from_config(NEXT_VIDEO_7B, block_size=128)["artifacts"]["llm/model.onnx.data"]["size"]
    assert blocks128 == linear // 2 + 4 * linear // 128 + rotary + norms
    int8 = manifest_from_config(NEXT_VIDEO_7B, llm_precision="int8", prefill="int8")
    assert int8["artifacts"]["llm/model.onnx.data"]["size"] == linear + 4 * linear // 32 + rotary + norms
    assert int8["llm"]["quantization"]["bits"] == 8 and "prefill_graph" not in int8["llm"]  # no twin for int8
    v = m["vision"]
    assert v["patch_grid"] == [24, 24] and v["tokens_per_frame"] == 576 and v["hidden_size"] == 4096
    # A 7B's int8 prefill twin (6.5 GB) is asked for, not written by default: int8 weights, a scale and a zero
    # point per output channel.
    assert "prefill_graph" not in m["llm"]
    twin = manifest_from_config(NEXT_VIDEO_7B, prefill="int8")["artifacts"]["llm/prefill.onnx.data"]["size"]
    assert twin == 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008 + 5 * (5 * 4096 + 2 * 11008))


def test_7b_on_an_orin_nano(next_video_7b):
    """The README's question: SlowFast-LLaVA-7B's 3,680 visual tokens (50 frames; 10 slow frames of 24x24 max-pooled
    to 288 tokens; 4x4 fast) with the int4 language model on an 8 GB Orin Nano."""
    run = cli(next_video_7b, "--target", "orin-nano-8gb")
    assert run.returncode == 5, run.stderr
    assert "visual tokens 3680, context 4064 tokens" in run.stdout and "does NOT fit" in run.stdout
    assert "predicted decode: 4.6 tokens/s" in run.stdout and "0.57 x 68.0 GB/s" in run.stdout
    int8 = cli(next_video_7b, "--target", "orin-nano-8gb", "--kv-cache", "int8")
    assert int8.returncode == 5 and "KV int8" in int8.stdout and "predicted decode: 7.5 tokens/s" in int8.stdout
    nx = cli(next_video_7b, "--target", "orin-nx-16gb")
    assert nx.returncode == 0 and "fits: needs at least" in nx.stdout, nx.stdout


def test_most_frames_and_least_plan(next_video_7b):
    m = manifest_from_config(read_config(next_video_7b), kv_cache="int8")
    small, large = least_plan(m, 1, max_new_tokens=128).total, least_plan(m, 50, max_new_tokens=128).total
    budget = (small + large) // 2
    most = most_frames(m, budget, 50, max_new_tokens=128)
    assert 1 <= most < 50
    assert least_plan(m, most, max_new_tokens=128).total <= budget < least_plan(m, most + 1, max_new_tokens=128).total
    assert most_frames(m, small - 1, 50, max_new_tokens=128) == 0
    assert most_frames(m, 10**12, 50) == 44  # 256 new tokens: 45 frames are over Vicuna's 4,096 positions
    plan = make_plan(m, frames=most)
    assert decode_bytes_per_token(m, plan.context) == (m["artifacts"]["llm/model.onnx"]["size"]
                                                       + m["artifacts"]["llm/model.onnx.data"]["size"]
                                                       + plan.context * kv_bytes_per_token(m["llm"]))


def test_targets_and_this_machine(tmp_path, monkeypatch):
    for t in targets.TARGETS.values():
        assert 0 < t.reserved < t.memory and t.bandwidth > 10e9
    with pytest.raises(BadInput, match="orin-nano-8gb.*this"):
        targets.get("jetson")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    total = targets.this_machine().memory  # probed once, then read from the cache
    cache = tmp_path / "sfedge" / "machine.json"
    (key, probed), = json.loads(cache.read_text())["read_bytes_per_s"].items()
    assert key == f"{cpu.describe()}, {total} bytes" and probed > 1e8
    tuning.store("read_bytes_per_s", key, 1e9)
    here = targets.get("this")
    assert here.memory == total and here.bandwidth == 1e9 and 0 <= here.reserved < here.memory
    # The same disk on a VM of another CPU kind (same cores and memory) probes again.
    other = key.replace(cpu.describe(), "Intel(R) Xeon(R) (avx512f, amx_tile), 2 cores")
    cache.write_text(json.dumps({"read_bytes_per_s": {other: 1e9}}))
    assert targets.get("this").bandwidth not in (None, 1e9)
    assert targets.read_bandwidth(16 * 10**6) > 1e8


def test_plan_cli_errors(tiny_bundle, next_video_7b, tmp_path):
    b = tiny_bundle[0]
    for args, message in [((b, "--slow-frames", 4), "--slow-frames: fixed when"),
                          ((tmp_path / "missing",), "no such bundle or checkpoint folder, and not a hub id"),
                          ((b.parent,), "neither a bundle (manifest.json) nor a checkpoint (config.json)"),
                          ((next_video_7b, "--pooling", "prompt-guided"), "planned from a bundle exported with --clip"),
                          ((next_video_7b, "--revision", "v1"), "goes with a hub id"),
                          ((b, "--target", "jetson"), "--target 'jetson': choose one of")]:
        run = cli(*args)
        assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr, (args, run.stderr)
    bundle = cli(b, "--target", "rtx-4090")
    assert bundle.returncode == 0 and "fits: needs at least" in bundle.stdout and "tokens/s" in bundle.stdout


def test_encode_chunks_stay_small_on_a_cpu():
    """On a CPU small encode chunks are leaner and no slower (planner.CPU_ENCODE_CHUNK); a GPU takes large batches,
    and a replanned runtime (a watcher's) keeps its device's rule."""
    from sfedge.runtime.planner import CPU_ENCODE_CHUNK, replan

    m = manifest_from_config(NEXT_VIDEO_7B)
    cpu, gpu = make_plan(m, max_new_tokens=128), make_plan(m, max_new_tokens=128, device="cuda")
    assert cpu.encode_chunk == CPU_ENCODE_CHUNK < gpu.encode_chunk == 32  # 50 frames
    assert cpu.total < gpu.total
    assert replan(m, cpu, frames=16).encode_chunk == CPU_ENCODE_CHUNK and replan(m, gpu, frames=16).encode_chunk == 16


def test_int8_vision_of_an_older_export_is_not_the_default_where_it_would_overflow(monkeypatch):
    """A bundle whose int8 vision weights use the full int8 range (exported before they were limited to +-64) on a
    CPU without VNNI: ONNX Runtime's int8 GEMM would saturate, so the default vision graph is fp32 there."""
    m = manifest_from_config(NEXT_VIDEO_7B)
    assert m["vision"]["int8_weight_limit"] == cpu.INT8_SAFE_LIMIT == 64
    monkeypatch.setattr(cpu, "saturates_int8", lambda: True)
    assert make_plan(m, max_new_tokens=128).vision_variant == "int8"
    del m["vision"]["int8_weight_limit"]
    assert make_plan(m, max_new_tokens=128).vision_variant == "fp32"
    assert make_plan(m, max_new_tokens=128, vision_variant="int8").vision_variant == "int8"  # named: as asked
    monkeypatch.setattr(cpu, "saturates_int8", lambda: False)
    assert make_plan(m, max_new_tokens=128).vision_variant == "int8"
