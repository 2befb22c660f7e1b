"""Checkpoints named by a hub id, resolved from a Hugging Face cache laid out as huggingface_hub lays it out
(models--owner--name/refs/main, snapshots/COMMIT/ links into blobs/), offline. Each run is a subprocess: huggingface_hub
reads HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE when first imported."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sfedge.runtime import manifest as manifest_io
from sfedge.runtime.errors import BadBundle
from sfedge.runtime.hub import is_hub_id
from test_plan import NEXT_VIDEO_7B

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_repo(hub: Path, repo_id: str, files: dict, commit: str = COMMIT) -> Path:
    """files: name -> bytes or a file to copy. Returns the snapshot folder."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for name, content in files.items():
        data = content.read_bytes() if isinstance(content, Path) else content
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def run(tmp_path, *cmd):
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"),
           "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *cmd], capture_output=True, text=True, env=env, cwd=tmp_path)


@pytest.fixture
def hub(tmp_path):
    return tmp_path / "hf" / "hub"


def test_a_cached_id_resolves_to_its_snapshot_and_commit(tmp_path, hub):
    snapshot = cache_repo(hub, "owner/model", {"config.json": b"{}", "model.safetensors": b"x"})
    code = ("from sfedge.runtime.hub import resolve\n"
            "for kw in ({}, {'file': 'config.json'}, {'revision': '%s'}):\n"
            "    folder, record = resolve('owner/model', **kw)\n"
            "    print(folder, record['repo_id'], record['revision'])\n" % COMMIT)
    got = run(tmp_path, "-c", code)
    assert got.returncode == 0, got.stderr
    assert got.stdout.splitlines() == [f"{snapshot} owner/model {COMMIT}"] * 3


def test_an_uncached_id_offline_is_one_line_naming_the_id_and_the_cache(tmp_path, hub):
    cache_repo(hub, "owner/model", {"config.json": b"{}"})
    cases = [("sf-run", ("sfedge.runtime.cli", "plan", "owner/missing", "--target", "orin-nano-8gb"), "owner/missing"),
             ("sf-run", ("sfedge.runtime.cli", "plan", "owner/model", "--revision", "v2"), "owner/model@v2"),
             ("sf-export", ("sfedge.export.cli", "owner/missing", str(tmp_path / "out")), "owner/missing")]
    for prog, cmd, name in cases:
        got = run(tmp_path, "-m", *cmd)
        lines = got.stderr.strip().splitlines()
        assert got.returncode == 3 and len(lines) == 1, got.stderr
        assert lines[0].startswith(f"{prog}: error: {name}: not in the Hugging Face cache {hub} and HF_HUB_OFFLINE "
                                   f"is set"), lines[0]
    assert not (tmp_path / "out").exists()


def test_sf_run_plan_from_a_cached_hub_config(tmp_path, hub):
    """Only config.json is needed (and cached): the plan of SlowFast-LLaVA-7B's model on an Orin Nano."""
    cache_repo(hub, "llava-hf/LLaVA-NeXT-Video-7B-hf", {"config.json": json.dumps(NEXT_VIDEO_7B).encode()})
    got = run(tmp_path, "-m", "sfedge.runtime.cli", "plan", "llava-hf/LLaVA-NeXT-Video-7B-hf",
              "--target", "orin-nano-8gb")
    assert got.returncode == 5, got.stderr  # it does not fit: the plan says so, and by how much
    assert f"from llava-hf/LLaVA-NeXT-Video-7B-hf@{COMMIT}" in got.stdout
    assert "visual tokens 3680" in got.stdout and "does NOT fit" in got.stdout and "tokens/s" in got.stdout


def test_sf_export_from_a_cached_hub_id_records_it(tmp_path, hub, make_checkpoint):
    ckpt = make_checkpoint()
    snapshot = cache_repo(hub, "owner/tiny-llava", {p.name: p for p in ckpt.iterdir() if p.is_file()})
    out = tmp_path / "bundle"
    got = run(tmp_path, "-m", "sfedge.export.cli", "owner/tiny-llava", str(out), "--revision", COMMIT, "--quiet",
              "--llm-precision", "fp32", "--embeddings", "float32", "--fidelity-tokens", "96", "--frames", "8",
              "--slow-frames", "4", "--vision-variants", "fp32")
    assert got.returncode == 0, got.stderr[-2000:]
    source = manifest_io.load(out)["source"]
    assert source["repo_id"] == "owner/tiny-llava" and source["revision"] == COMMIT
    assert source["checkpoint"] == str(snapshot.resolve())


def test_hub_ids_and_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local" / "ckpt").mkdir(parents=True)
    assert is_hub_id("llava-hf/LLaVA-NeXT-Video-7B-hf") and is_hub_id("owner/name.v1_2")
    assert not is_hub_id("local/ckpt")  # an existing folder is a folder
    assert not any(map(is_hub_id, ["./owner/name", "a/b/c", "name", "/abs/path", "owner/", "../x"]))


def test_source_revision_is_checked_when_present(tiny_bundle, tmp_path):
    import shutil

    b = tmp_path / "b"
    shutil.copytree(tiny_bundle[0], b)
    m = json.loads((b / "manifest.json").read_text())
    m["source"].update(repo_id="owner/name", revision=COMMIT)
    (b / "manifest.json").write_text(json.dumps(m))
    assert manifest_io.load(b)["source"]["revision"] == COMMIT
    m["source"]["revision"] = 7
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BadBundle, match="source.revision' has the wrong type"):
        manifest_io.load(b)
