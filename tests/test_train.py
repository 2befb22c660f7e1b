"""The demo's training script, end to end at toy sizes: it trains, resumes, and writes weights the demo export
loads (the real run: export/demo_weights/MODEL_CARD.md)."""
import argparse
import hashlib
import json
import subprocess
import sys

import pytest
from safetensors import safe_open

from sfedge.export import demo
from sfedge.train import synthetic as syn
from sfedge.train.demo_model import category_mix


def train(out, *args):
    run = subprocess.run([sys.executable, "-m", "sfedge.train.demo_model", str(out), "--clips", "10",
                          "--clip-batch", "8", "--clip-steps", "2", "--align-steps", "2", "--projector-batch", "2",
                          *args], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    with safe_open(out / demo.DEMO_WEIGHTS.name, "pt") as f:
        return json.loads(f.metadata()["card"]), {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.slow
def test_training_resumes_and_the_demo_export_loads_its_weights(tmp_path, monkeypatch):
    card, first = train(tmp_path / "a", "--projector-steps", "2")
    assert card["projector_steps"] == 2 and card["pipeline"]["frames"] == 16
    assert card["lora"]["ranks"]["mlp.down_proj"] == 4
    assert {k.split(".")[0] for k in first} == {"clip", "projector", "lora"}
    assert first["lora.layers.0.mlp.down_proj.a"].shape[0] == 4 and "lora.layers.29.self_attn.q_proj.b" in first
    again, second = train(tmp_path / "b", "--projector-steps", "1", "--category-mix", "shape=3,count=0",
                          "--resume", str(tmp_path / "a" / demo.DEMO_WEIGHTS.name))
    assert again["projector_steps"] == 3 and again["resumed_from"]["projector_steps"] == 2
    digest = hashlib.sha256((tmp_path / "a" / demo.DEMO_WEIGHTS.name).read_bytes()).hexdigest()
    assert again["resumed_from"]["sha256"] == digest
    assert again["projector_dtype"] in ("bfloat16", "float32")  # whichever this CPU computes faster
    assert again["category_mix"] == {**dict.fromkeys(syn.CATEGORIES, 1.0), "shape": 3.0, "count": 0.0}
    assert again["clip_steps"] == 2  # stage 1 not rerun: its weights are the first run's
    assert all((second[k] == first[k]).all() for k in first if k.startswith("clip."))
    assert any((second[k] != first[k]).any() for k in first if k.startswith("lora."))
    monkeypatch.setattr(demo, "DEMO_WEIGHTS", tmp_path / "b" / demo.DEMO_WEIGHTS.name)
    llava, clip = demo.build_demo(tmp_path / "demo")
    assert (llava / "config.json").exists() and (clip / "config.json").exists()


def test_patch_labels_name_what_each_patch_shows():
    from sfedge.train import demo_model as dm, synthetic as syn

    clip = syn.Clip(0, [syn.Mover("triangle", "blue", "left", (90.0, 24.0))], "star", (100.0, 100.0), 40)
    labels = dm.patch_labels([clip])[0]  # [frames, patches, 4]
    grid = dm.VISION["image_size"] // dm.VISION["patch_size"]
    cell = syn.SIZE // grid
    at = lambda x, y: int(y // cell) * grid + int(x // cell)
    blue, triangle, left = list(syn.COLOURS).index("blue") + 1, syn.SHAPES.index("triangle") + 1, 1
    assert labels[0, at(90, 24), :3].tolist() == [blue, triangle, left]
    assert (labels[0, at(40, 24)] == 0).all()  # far from everything: nothing
    x, _ = clip.position(clip.movers[0], syn.FRAMES - 1)  # it moved left: its label went with it
    assert labels[-1, at(x, 24), 0] == blue and labels[-1, at(90, 24), 0] == 0
    star = syn.NEEDLES.index("star") + 1
    assert labels[40, at(100, 100), 3] == star and labels[41, at(100, 100), 3] == star
    assert (labels[39, :, 3] == 0).all() and (labels[42, :, 3] == 0).all()  # only while it flashes


def test_a_category_mix_naming_no_category_is_refused():
    with pytest.raises(argparse.ArgumentTypeError, match="'shapes': not a category"):
        category_mix("shapes=3")
    with pytest.raises(argparse.ArgumentTypeError, match="not all 0"):
        category_mix("colour=0,shape=0,direction=0,count=0,needle=0")


def test_the_committed_weights_stay_under_25_mb_and_carry_their_training_card():
    _, card = demo.demo_weights()
    assert demo.DEMO_WEIGHTS.stat().st_size < 25e6  # the repository's budget for them (model card)
    assert card["lora"]["ranks"] and card["projector_steps"] == 1800 and "resumed_from" in card["resumed_from"]
