"""Fuzzing the manifest loader: whatever the manifest says, loading either succeeds or raises BadBundle."""
import copy
import json
import shutil

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sfedge.runtime import manifest
from sfedge.runtime.errors import BadBundle

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=8), kids,
                                                                                 max_size=3), max_leaves=8)


def paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from paths(v, prefix + (k,))


def test_loader_never_fails_with_anything_but_bad_bundle(tiny_bundle, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz") / "b"
    shutil.copytree(tiny_bundle[0], root)
    good = json.loads((root / "manifest.json").read_text())
    all_paths = [p for p in paths(good) if p]

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(all_paths), JSON, st.booleans())
    def check(path, value, delete):
        m = copy.deepcopy(good)
        node = m
        for k in path[:-1]:
            node = node[k]
        if delete:
            del node[path[-1]]
        else:
            node[path[-1]] = value
        (root / "manifest.json").write_text(json.dumps(m))
        try:
            manifest.load(root, verify_hashes=False)
        except BadBundle:
            pass

    check()
