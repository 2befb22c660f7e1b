"""The loader refuses a bundle it cannot trust, naming the file and the problem."""
import json
import os
import shutil

import pytest

from sfedge.runtime import manifest
from sfedge.runtime.errors import BadBundle


@pytest.fixture
def bundle(tiny_bundle, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(tiny_bundle[0], dst)
    return dst


def edit(bundle, fn):
    m = json.loads((bundle / "manifest.json").read_text())
    fn(m)
    (bundle / "manifest.json").write_text(json.dumps(m))


def test_a_good_bundle_loads_and_the_hash_cache_skips_rehashing(bundle, tmp_path, monkeypatch):
    cache = manifest.HashCache(tmp_path / "hashes.json")
    m = manifest.load(bundle, hash_cache=cache)
    assert m["schema_version"] == manifest.SCHEMA_VERSION
    known = json.loads((tmp_path / "hashes.json").read_text())
    assert len(known) == len(m["artifacts"])

    hashed = []
    real = manifest.sha256_file
    monkeypatch.setattr(manifest, "sha256_file", lambda p: hashed.append(p.name) or real(p))
    manifest.load(bundle, hash_cache=manifest.HashCache(tmp_path / "hashes.json"))
    assert hashed == []
    # a file whose mtime changed is hashed again, and only that file
    os.utime(bundle / "aggregator.onnx", ns=(1, 1))
    manifest.load(bundle, hash_cache=manifest.HashCache(tmp_path / "hashes.json"))
    assert hashed == ["aggregator.onnx"]


def test_tampered_artifact_is_refused_by_name(bundle, tmp_path):
    target = bundle / "aggregator.onnx"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(BadBundle, match="aggregator.onnx: sha256 differs"):
        manifest.load(bundle)
    # a cache entry from before the change does not hide it: the mtime changed
    cache = manifest.HashCache(tmp_path / "h.json")
    os.utime(target, ns=(1, 1))
    with pytest.raises(BadBundle, match="sha256 differs"):
        manifest.load(bundle, hash_cache=cache)


def test_missing_and_truncated_artifacts(bundle):
    (bundle / "tokenizer.json").unlink()
    with pytest.raises(BadBundle, match="tokenizer.json: listed in the manifest but missing"):
        manifest.load(bundle)


def test_truncated_artifact(bundle):
    p = bundle / "vision.fp32.onnx"
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(BadBundle, match="vision.fp32.onnx: size 100 differs"):
        manifest.load(bundle)


def test_schema_versions_and_broken_manifests(bundle):
    edit(bundle, lambda m: m.update(schema_version=99, toolkit_version="9.0"))
    with pytest.raises(BadBundle, match="schema version 99 .*toolkit 9.0.*reads schema version 1"):
        manifest.load(bundle)
    (bundle / "manifest.json").write_text("{")
    with pytest.raises(BadBundle, match="manifest.json: not valid JSON"):
        manifest.load(bundle)
    (bundle / "manifest.json").unlink()
    with pytest.raises(BadBundle, match="manifest.json: missing"):
        manifest.load(bundle)


def test_missing_field(bundle):
    edit(bundle, lambda m: m["llm"].pop("num_layers"))
    with pytest.raises(BadBundle, match="field 'llm.num_layers' is missing"):
        manifest.load(bundle)


@pytest.mark.parametrize("change, message", [
    (lambda llm: llm.update(prefill_weights="int8"), "'llm.prefill_weights' must be 'int8', beside a 'llm.prefill_gr"),
    (lambda llm: llm.update(prefill_graph="llm/model.onnx"), "of an fp32-cache decoder needs 'llm.prefill_weights'"),
    (lambda llm: llm.update(prefill_graph="llm/model.onnx", prefill_weights="int4"), "must be 'int8'"),
])
def test_prefill_twin_fields_hang_together(bundle, change, message):
    edit(bundle, lambda m: change(m["llm"]))
    with pytest.raises(BadBundle, match=message):
        manifest.load(bundle)


@pytest.mark.parametrize("evil", ["/etc/passwd", "../outside.onnx", "a/../../x", "..\\x"])
def test_paths_leaving_the_bundle_are_refused(bundle, evil):
    edit(bundle, lambda m: m["aggregator"].update(graph=evil))
    with pytest.raises(BadBundle, match="must be a relative path inside the bundle"):
        manifest.load(bundle)


def test_symlink_leading_outside_is_refused(bundle, tmp_path):
    outside = tmp_path / "outside.onnx"
    shutil.copy(bundle / "aggregator.onnx", outside)
    (bundle / "aggregator.onnx").unlink()
    (bundle / "aggregator.onnx").symlink_to(outside)
    with pytest.raises(BadBundle, match="leads outside the bundle folder"):
        manifest.load(bundle)


def test_unlisted_file_used_by_the_runtime_is_refused(bundle):
    edit(bundle, lambda m: m["artifacts"].pop("aggregator.onnx"))
    with pytest.raises(BadBundle, match="'aggregator.onnx' is used but not listed"):
        manifest.load(bundle)
