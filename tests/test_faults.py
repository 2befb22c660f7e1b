"""Faults and hostile inputs: a full disk, a killed export, Ctrl-C during an answer, graphs that reach outside the
bundle, a corpus of broken videos made from real footage. Each gets its specific error and changes no input."""
import errno
import hashlib
import shutil
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest

from conftest import export_tiny
from sfedge.runtime.errors import BadInput, ExportFailed, GraphFailed
from sfedge.runtime.video import demo_video, read_frames


def test_full_disk_during_export_is_a_clear_error_and_leaves_nothing(make_checkpoint, tmp_path, monkeypatch):
    from sfedge.export import llm

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(llm.np, "save", full)
    with pytest.raises(ExportFailed, match="disk full while writing the bundle"):
        export_tiny(make_checkpoint(), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_export_killed_midway_leaves_no_bundle(make_checkpoint, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "sfedge.export.cli", str(make_checkpoint()), str(out),
                             "--llm-precision", "fp32"], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not any(p.name.startswith(".out.partial") for p in tmp_path.iterdir()):
        time.sleep(0.05)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def _default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _interrupt_an_answer(bundle) -> tuple[int, str]:
    proc = subprocess.Popen([sys.executable, "-m", "sfedge.runtime.cli", "ask", str(bundle), "--video",
                             "demo", "-q", "Tell me everything.", "-q", "And then?", "-q", "Anything else?",
                             "--max-new-tokens", "3500", "--vision", "fp32"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # as from a shell: a test earlier in the session may leave SIGINT ignored or blocked, and
                            # a child inherits both
                            preexec_fn=_default_sigint)
    deadline = time.time() + 120
    line = ""
    while time.time() < deadline and "visual tokens" not in line:
        line = proc.stderr.readline()
    proc.stdout.read(1)  # the answers have started streaming (three: the tiny model writes 3,500 tokens in 2.5 s)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=60)[1]
    return proc.returncode, err


def test_ctrl_c_during_an_answer_stops_cleanly(tiny_bundle):
    # In two full-suite runs (of six) the child finished its answers with exit code 0, as if the signal never came;
    # alone, and after every suspect test, it is interrupted. One suspect: CPython swallows a KeyboardInterrupt
    # raised inside a finalizer, which sf-run now guards against (clitools.stop_if_interrupted). One retry stays,
    # as a warning with the first child's stderr in the summary; a second miss fails.
    for attempt in range(2):
        code, err = _interrupt_an_answer(tiny_bundle[0])
        if code != 0:
            break
        warnings.warn(f"Ctrl-C lost by the child (attempt {attempt + 1}); its stderr ends: {err[-1500:]}")
    here = (f"pytest's SIGINT handler {signal.getsignal(signal.SIGINT)}, "
            f"blocked {signal.pthread_sigmask(signal.SIG_BLOCK, [])}")
    assert code == 130 and "sf-run: interrupted" in err and "Traceback" not in err, (attempt, here, err[-2000:])


def test_graph_reaching_outside_the_bundle_is_refused(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    from sfedge.runtime.sessions import Graph

    bundle = tmp_path / "b"
    bundle.mkdir()
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w])
    onnx.save(helper.make_model(g), bundle / "m.onnx", save_as_external_data=True, location="w.bin",
              size_threshold=0)
    shutil.move(bundle / "w.bin", tmp_path / "w.bin")
    m = onnx.load(bundle / "m.onnx", load_external_data=False)
    for entry in m.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = "../w.bin"
    (bundle / "m.onnx").write_bytes(m.SerializeToString())
    with pytest.raises(GraphFailed, match="m.onnx: ONNX Runtime cannot load this graph"):
        Graph(bundle / "m.onnx", ["CPUExecutionProvider"])


def _corpus(tmp_path):
    data = demo_video().read_bytes()
    cases = {f"cut-at-{f}": data[: int(len(data) * f)] for f in (0.01, 0.1, 0.3, 0.6, 0.9)}
    cases["no-header"] = data[64:]
    rng = np.random.default_rng(0)
    for k in range(4):
        flipped = bytearray(data)
        for i in rng.integers(1000, len(data), 200):
            flipped[i] ^= 0xFF
        cases[f"flipped-{k}"] = bytes(flipped)
    cases["zeros"] = bytes(len(data) // 10)
    for name, blob in cases.items():
        p = tmp_path / f"{name} vidéo.mp4"
        p.write_bytes(blob)
        yield p


def test_broken_video_corpus(tmp_path):
    # bigbuckbunny.mp4 keeps its index at the end: any cut, a lost header or zeros is refused; flipped bytes in the
    # frame data leave the index whole, so the frames that still decode are kept.
    cases = list(_corpus(tmp_path))
    assert len(cases) == 11
    for path in cases:
        before = hashlib.sha256(path.read_bytes()).hexdigest()
        t0 = time.time()
        if path.name.startswith("flipped"):
            f = read_frames(path, 16, (32, 32))
            assert 0 < len(f.pixels) <= 16 and f.pixels.dtype == np.uint8 and f.method == "scan"
            short = [f"the container claims 132 frames but {f.total_frames} decode; sampled among those"]
            assert f.notes == ([] if f.total_frames == 132 else short), path.name
        else:
            with pytest.raises(BadInput, match="not a video OpenCV can open") as e:
                read_frames(path, 16, (32, 32))
            assert str(path) in str(e.value)
        assert time.time() - t0 < 30
        assert hashlib.sha256(path.read_bytes()).hexdigest() == before


def test_questions_empty_huge_or_full_of_control_characters():
    from sfedge.runtime.prompt import build, clean_question

    spec = {"prefix": "P", "suffix": "S"}
    assert clean_question("what\x00 is\x1b[31m this?\u200b") == "what is[31m this?"
    with pytest.raises(BadInput, match="empty"):
        build(spec, "\x00\x01 \t")
    with pytest.raises(BadInput, match="at most 20000"):
        build(spec, "x" * 20001)
    with pytest.raises(BadInput, match="prompt style"):
        build(spec, "ok", style="poem")
