"""sf-export on tiny random checkpoints of all four classes: every graph against its PyTorch original, and the
bad-input cases."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import export_tiny
from sfedge.export import checkpoint as ckpt_io
from sfedge.export.vision import reference_features
from sfedge.runtime import manifest as manifest_io
from sfedge.runtime.errors import BadCheckpoint, BadInput
from sfedge.runtime.sessions import Graph

ARCHS = ["LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration",
         "LlavaNextVideoForConditionalGeneration", "LlavaOnevisionForConditionalGeneration"]


@pytest.mark.parametrize("arch,kw", [
    (ARCHS[0], {}),
    (ARCHS[1], {"select_layer": [-3, -1]}),  # a select-layer list, concatenated
    (ARCHS[2], {"text": "qwen2"}),
    (ARCHS[3], {"tower": "siglip", "image_size": 36, "patch": 4, "strategy": "full"}),  # 9x9 grid, no CLS
    (ARCHS[0], {"strategy": "full"}),  # CLIP with the CLS kept
])
def test_each_class_exports_and_passes_fidelity(make_checkpoint, tmp_path, arch, kw):
    ckpt = make_checkpoint(arch, **kw)
    m = export_tiny(ckpt, tmp_path / "b", vision_variants=("fp32", "fp16", "int8"))
    fid = m["fidelity"]
    assert fid["all_passed"]
    assert fid["vision.fp32"]["rel_max_abs_error"] <= 1e-4
    assert fid["vision.int8"]["min_cosine"] >= 0.99
    assert all(fid[k]["rel_max_abs_error"] <= 1e-4 for k in fid if k.startswith("aggregator"))
    assert m["source"]["architecture"] == arch
    v = m["vision"]
    if "select_layer" in kw:
        assert v["select_layer"] == kw["select_layer"]
    if kw.get("tower") == "siglip":
        assert v["patch_grid"] == [9, 9] and not v["has_cls_token"] and v["mean"] == [0.5, 0.5, 0.5]
    if kw.get("strategy") == "full" and not kw.get("tower"):
        assert v["has_cls_token"] and v["tokens_per_frame"] == 17
    # the bundle's vision graph, run by the runtime's session, against transformers on fresh frames
    loaded = ckpt_io.load(ckpt)
    frames = np.random.default_rng(1).integers(0, 256, (3, *v["image_size"], 3), dtype=np.uint8)
    with torch.no_grad():
        want = reference_features(loaded.model, loaded.vision, torch.from_numpy(frames)).numpy()
    got = Graph(tmp_path / "b" / v["graphs"]["fp32"], ["CPUExecutionProvider"]).run({"frames": frames})
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    assert manifest_io.load(tmp_path / "b")["llm"]["precision"] == "fp32"


def test_vision_reference_is_transformers_own_path(make_checkpoint):
    """For LlavaForConditionalGeneration the reference is get_image_features itself."""
    loaded = ckpt_io.load(make_checkpoint())
    frames = torch.randint(0, 255, (2, 32, 32, 3), dtype=torch.uint8)
    from sfedge.export.vision import VisionGraph
    with torch.no_grad():
        ours = VisionGraph(loaded.model, loaded.vision)(frames)
        theirs = reference_features(loaded.model, loaded.vision, frames)
    torch.testing.assert_close(ours, theirs)


def test_bad_checkpoints_get_clear_errors(tmp_path, make_checkpoint):
    with pytest.raises(BadCheckpoint, match="no such checkpoint folder"):
        ckpt_io.read_config(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BadCheckpoint, match="config.json: missing"):
        ckpt_io.read_config(empty)
    (empty / "config.json").write_text("{not json")
    with pytest.raises(BadCheckpoint, match="config.json: broken JSON"):
        ckpt_io.read_config(empty)
    (empty / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    with pytest.raises(BadCheckpoint, match="BertModel is not supported; supported: LlavaForConditionalGeneration"):
        ckpt_io.read_config(empty)
    (empty / "config.json").write_text(json.dumps({"architectures": [ARCHS[0]], "text_config": {}}))
    with pytest.raises(BadCheckpoint, match="no weights"):
        ckpt_io.read_config(empty)


def test_existing_output_is_refused_and_failed_export_leaves_nothing(make_checkpoint, tmp_path, monkeypatch):
    ckpt = make_checkpoint()
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(BadInput, match="already exists"):
        export_tiny(ckpt, out)
    assert (out / "keep.txt").read_text() == "mine"

    from sfedge.export.decoder_graph import DecoderGraph

    layer = DecoderGraph.layer

    def boom(graph, i, *a):
        if i == 1:  # as if Ctrl-C arrived while the second layer streams
            raise KeyboardInterrupt
        layer(graph, i, *a)

    monkeypatch.setattr(DecoderGraph, "layer", boom)
    with pytest.raises(KeyboardInterrupt):
        export_tiny(ckpt, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(KeyboardInterrupt):
        export_tiny(ckpt, out, force=True)
    assert (out / "keep.txt").read_text() == "mine"  # --force replaces only once the new bundle is complete


def test_cli_one_line_errors(tmp_path):
    run = subprocess.run([sys.executable, "-m", "sfedge.export.cli", str(tmp_path / "nope"), str(tmp_path / "o")],
                         capture_output=True, text=True)
    assert run.returncode == BadCheckpoint.exit_code
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("sf-export: error:") and "no such checkpoint folder" in last
    assert "Traceback" not in run.stderr
    help_text = subprocess.run([sys.executable, "-m", "sfedge.export.cli", "--help"], capture_output=True,
                               text=True).stdout
    for opt in ("--demo", "--frames", "--slow-pool", "--vision-variants", "--llm-quant",
                "--allow-low-fidelity", "--calibration-videos"):
        assert opt in help_text


def test_static_int8_with_calibration_videos(make_checkpoint, tmp_path):
    from sfedge.runtime.video import demo_video

    m = export_tiny(make_checkpoint(), tmp_path / "b", calibration_videos=[str(demo_video())])
    assert m["vision"]["int8_method"] == "static QDQ"
    assert m["fidelity"]["vision.int8"]["min_cosine"] >= 0.99
