"""The camera watcher: rules, sources (file, synthetic frames, an HTTP MJPEG stream served here), many sources on
one model, reconnection, signals, and bounded memory over a long stream. RTSP: tests/test_rtsp.py."""
import http.server
import json
import signal
import subprocess
import sys
import threading
import time

import cv2
import numpy as np
import pytest

from sfedge.runtime import Runtime
from sfedge.runtime.errors import BadInput, DoesNotFit, SourceLost
from sfedge.runtime.planner import least_plan, make_plan
from sfedge.runtime.rules import SourceSpec, load_rules, load_sources, parse_duration, rules_from_args
from sfedge.runtime.watch import Source


def frame(i: int, h=48, w=64) -> np.ndarray:
    f = np.zeros((h, w, 3), np.uint8)
    f[:] = (i * 7 % 255, 60, 120)
    f[10:30, (i * 3) % (w - 16):(i * 3) % (w - 16) + 16] = 255
    return f


def write_video(path, seconds: float, fps: int = 10, size=(64, 48)):
    out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    for i in range(int(seconds * fps)):
        out.write(frame(i, size[1], size[0]))
    out.release()
    return path


@pytest.fixture
def rt(tiny_bundle):
    # Each test its own runtime (a load takes a tenth of a second): a patched or half-watched one never reaches
    # the next test, whatever the order.
    return Runtime.load(tiny_bundle[0], vision_variant="fp32", max_new_tokens=6)


# ---- rules -------------------------------------------------------------------------------------------------------

def test_durations():
    assert parse_duration("10s") == 10 and parse_duration("500ms") == 0.5 and parse_duration("2m") == 120
    assert parse_duration("1h") == 3600 and parse_duration(7) == 7 and parse_duration("1.5") == 1.5
    for bad in ("0s", "-3s", "ten seconds", "", True, "5 parsecs"):
        with pytest.raises(BadInput):
            parse_duration(bad)


def test_rules_file(tmp_path):
    f = tmp_path / "rules.yaml"
    f.write_text("- question: Is the door open?\n  every: 5s\n  window: 30s\n  trigger: '(?i)\\byes\\b'\n"
                 "- name: people\n  question: How many people?\n  every: 1m\n  window: 1m\n"
                 "  trigger: {keywords: ['yes', person]}\n")
    a, b = load_rules(f)
    assert (a.name, a.every, a.window) == ("rule-1", 5, 30) and a.triggered("Yes, it is.")
    assert not a.triggered("eyes closed")
    assert (b.name, b.every) == ("people", 60) and b.triggered("A Person walks by") and not b.triggered("persons")


@pytest.mark.parametrize("text, complaint", [
    ("- question: q\n  every: 5s\n", "rule 1: 'window' is missing"),
    ("- question: q\n  every: soon\n  window: 5s\n", "rule 1: every 'soon'"),
    ("- question: ''\n  every: 5s\n  window: 5s\n", "'question' must be non-empty"),
    ("- question: q\n  every: 5s\n  window: 5s\n  trigger: '(unclosed'\n", "not a valid regular expression"),
    ("- question: q\n  every: 5s\n  window: 5s\n  trigger: {keywords: [yes]}\n", "quote it"),
    ("- question: q\n  every: 5s\n  window: 5s\n  colour: red\n", "unknown field(s) colour"),
    ("- {name: a, question: q, every: 5s, window: 5s}\n- {name: a, question: r, every: 5s, window: 5s}\n",
     "two rules are named 'a'"),
    ("question: q\n", "expected a non-empty list of rules"),
    ("- [unclosed\n", "not valid YAML"),
    ("- just a string\n", "rule 1: must be a mapping"),
])
def test_bad_rules_are_refused_naming_file_and_rule(tmp_path, text, complaint):
    f = tmp_path / "rules.yaml"
    f.write_text(text)
    with pytest.raises(BadInput) as e:
        load_rules(f)
    assert str(f) in str(e.value) and complaint in str(e.value)


def test_rules_from_the_command_line():
    a, b = rules_from_args(["q1", "q2"], ["5s"], ["10s", "20s"], None)
    assert (a.every, a.window, b.every, b.window) == (5, 10, 5, 20)
    with pytest.raises(BadInput, match="--window is given 3 times for 2 questions"):
        rules_from_args(["q1", "q2"], None, ["1s", "2s", "3s"])
    with pytest.raises(BadInput, match="no such rules file"):
        load_rules("/nonexistent/rules.yaml")


# ---- the pipeline ------------------------------------------------------------------------------------------------

def test_synthetic_frames_each_encoded_once_and_windows_answered_like_ask(rt, monkeypatch):
    source = [(i / 10, frame(i)) for i in range(10 * 31)]  # 31 s at 10 fps; every 5th frame is sampled
    rules = [{"name": "what", "question": "What happens?", "every": "10s", "window": "20s"},
             {"name": "door", "question": "Is the door open?", "every": "10s", "window": "20s",
              "trigger": {"keywords": ["the"]}}]
    encoded = []
    run = rt.vision.run
    with monkeypatch.context() as m:
        m.setattr(rt.vision, "run", lambda feeds: encoded.append(len(feeds["frames"])) or run(feeds))
        records = list(rt.watch(source, rules, sample_fps=2))
    answers = [r for r in records if r["kind"] == "answer"]
    assert [(r["rule"], r["window"]["end"]) for r in answers] == [
        (n, e) for e in (10.0, 20.0, 30.0) for n in ("what", "door")]
    assert records[-1]["kind"] == "end" and records[-1]["frames"]["encoded"] == 62 == sum(encoded)
    assert records[-1]["frames"]["dropped"] == 0  # an iterable is read with back-pressure
    assert [r["reused_prefix"] for r in answers] == [False, True] * 3  # rules on one window share its KV prefix
    w = answers[2]["window"]  # (0, 20]: 40 frames, more than the plan's 8: sampled uniformly
    assert (w["frames"], w["frames_used"]) == (40, rt.plan.frames)
    for r in answers:
        assert r["triggered"] == (" the " in f" {r['answer'].lower()} ".replace(",", " ").replace(".", " "))
    # The same window through the plain API gives the same answer.
    from sfedge.runtime.video import sample_indices, squash
    kept = [squash(frame(i), rt.size) for i in range(5, 201, 5)]  # (0 s, 20 s] at 2 fps
    pick = sample_indices(len(kept), rt.plan.frames)
    from sfedge.runtime import VisualTokens
    vt = VisualTokens(rt.aggregate(rt.encode_pixels(np.stack(kept)[pick])), [], 0, "stream", {})
    assert rt.ask(vt, "What happens?", max_new_tokens=6).text == answers[2]["answer"]


def test_intervals_count_from_the_first_frame(rt):
    source = [(1000 + i / 2, frame(i)) for i in range(2 * 25)]  # a stream whose clock starts at 1000 s
    answers = [r for r in rt.watch(source, [{"question": "q", "every": "10s", "window": "10s"}], sample_fps=2)
               if r["kind"] == "answer"]
    assert [r["window"]["end"] for r in answers] == [1010.0, 1020.0]
    assert all(r["window"]["frames"] == 20 for r in answers)


def test_bad_sources_and_settings_are_clear(rt, tmp_path, monkeypatch):
    with pytest.raises(BadInput, match="no such video file"):
        rt.watch(tmp_path / "missing.mp4", [{"question": "q", "every": 1, "window": 1}])
    with pytest.raises(BadInput, match="sample rate"):
        rt.watch([], [{"question": "q", "every": 1, "window": 1}], sample_fps=0)
    with pytest.raises(BadInput, match="at least one rule"):
        rt.watch([], [])
    for spec, what in (("http://127.0.0.1:9/none.mjpg", "cannot open this stream"), (57, "cannot open this camera")):
        with pytest.raises(BadInput, match=what):
            list(rt.watch(spec, [{"question": "q", "every": 1, "window": 1}]))
    with monkeypatch.context() as m:
        m.setattr(rt, "qa", object())  # a runtime loaded for question-aware tokens
        with pytest.raises(BadInput, match="uniform SlowFast tokens"):
            rt.watch([], [{"question": "q", "every": 1, "window": 1}])
    with pytest.raises(BadInput, match="item 1: a frame must be uint8 BGR"):
        list(rt.watch([(0, frame(0)), (1, np.zeros((4, 4)))], [{"question": "q", "every": 1, "window": 1}]))


def test_a_live_source_drops_frames_it_cannot_encode_in_time_and_counts_them():
    from sfedge.runtime.watch import QUEUE_FRAMES, FrameFeed

    feed = FrameFeed(Source("rtsp://camera.invalid/stream"), (32, 32), sample_fps=10, realtime=False,
                     max_outage=1)
    for i in range(100):  # 10 s at 10 fps offered while nobody encodes
        feed._offer(i / 10, frame(i))
    assert feed.queue.qsize() == QUEUE_FRAMES  # bounded: never queued without limit
    assert (feed.stats.decoded, feed.stats.sampled, feed.stats.dropped) == (100, 100, 100 - QUEUE_FRAMES)


def test_the_plan_accounts_for_the_ring_buffer(rt):
    base = make_plan(rt.manifest, None, 8, 6)
    ring = make_plan(rt.manifest, None, 8, 6, rings={"cam": (1000, 16)})
    v = rt.manifest["vision"]
    assert ring.total - base.total == 1000 * v["tokens_per_frame"] * v["hidden_size"] * 4 + 16 * 32 * 32 * 3
    with pytest.raises(DoesNotFit):
        make_plan(rt.manifest, base.total + 1000, 8, 6, rings={"cam": (100_000, 16)})


def test_a_watch_plans_its_ring_on_its_own_view_of_the_runtime(rt):
    before = rt.plan
    watcher = rt.watch([(i / 2, frame(i)) for i in range(4)], [{"question": "q", "every": "10s", "window": "20s"}])
    assert rt.plan is before and not any(k.startswith("watch") for k in rt.plan.parts)
    assert any(k.startswith("watch frames: feature ring") for k in watcher.rt.plan.parts)
    assert watcher.rt.llm is rt.llm and watcher.rt.vision is rt.vision  # one model, shared


# ---- many sources, one model -------------------------------------------------------------------------------------

def test_many_sources_share_one_model_and_are_answered_in_due_order(rt, monkeypatch):
    door = [(i / 10, frame(i)) for i in range(10 * 21)]  # 21 s at 10 fps
    yard = [(100 + i / 4, frame(i + 50)) for i in range(4 * 25)]  # 25 s at 4 fps, on a clock starting at 100 s
    rules = [{"name": "what", "question": "What happens?", "every": "10s", "window": "10s"},
             {"name": "who", "question": "Who is there?", "every": "10s", "window": "10s"}]
    encoded = []
    run = rt.vision.run
    with monkeypatch.context() as m:
        m.setattr(rt.vision, "run", lambda feeds: encoded.append(len(feeds["frames"])) or run(feeds))
        watcher = rt.watch({"door": door, "yard": {"url": yard, "questions": ["Is the gate open?"], "every": "5s",
                                                   "window": "5s", "sample_fps": 4}}, rules, sample_fps=2)
        records = list(watcher)
    assert watcher.rt.vision is rt.vision and watcher.rt.llm is rt.llm
    answers = [r for r in records if r["kind"] == "answer"]
    assert [(r["source"], r["rule"], r["window"]["end"]) for r in answers if r["source"] == "door"] == [
        ("door", n, e) for e in (10.0, 20.0) for n in ("what", "who")]
    assert [r["window"]["end"] for r in answers if r["source"] == "yard"] == [105.0, 110.0, 115.0, 120.0]
    assert [r["reused_prefix"] for r in answers if r["source"] == "door"] == [False, True] * 2
    end = records[-1]
    assert end["kind"] == "end" and end["reason"] == "every source ended or was lost"
    assert end["sources"]["door"]["frames"]["encoded"] == 42 and end["sources"]["yard"]["frames"]["encoded"] == 100
    assert end["frames"]["encoded"] == 142 == sum(encoded)  # every frame of both encoded once, in shared batches
    assert max(encoded) == watcher.batch and len(encoded) < 142 / 2  # in batches, not frame by frame


def test_due_questions_are_answered_in_due_order_across_sources(rt, monkeypatch):
    watcher = rt.watch({"a": [], "b": []}, [{"name": "q", "question": "q", "every": "3s", "window": "3s"}])
    a, b = watcher.streams
    a.due, a.newest = {"q": 3.0}, 10.0  # due at 3, 6 and 9
    b.due, b.newest = {"q": 1.5}, 8.0  # due at 1.5, 4.5 and 7.5
    monkeypatch.setattr(watcher, "_answer", lambda stream, rule, due, skipped: (stream.name, due))
    assert list(watcher._answer_due([a, b])) == [("b", 1.5), ("a", 3.0), ("b", 4.5), ("a", 6.0), ("b", 7.5),
                                                 ("a", 9.0)]


def test_sources_file_and_its_errors(tmp_path):
    (tmp_path / "door-rules.yaml").write_text("- {question: 'Is anyone at the door?', every: 10s, window: 20s}\n")
    f = tmp_path / "cameras.yaml"
    f.write_text("- name: door\n  url: rtsp://u:p@10.0.0.7/stream\n  rules: door-rules.yaml\n  sample_fps: 1\n"
                 "- name: yard\n  url: 0\n  questions: ['Is the gate open?']\n  every: 5s\n  max_outage: 2m\n"
                 "  rtsp_transport: udp\n")
    door, yard = load_sources(f)
    assert (door.name, door.target, door.sample_fps, door.rules[0].window) == ("door", "rtsp://u:p@10.0.0.7/stream",
                                                                               1, 20)
    assert (yard.target, yard.rules[0].every, yard.max_outage, yard.rtsp_transport) == (0, 5, 120, "udp")
    for text, complaint in (("- {name: a}\n", "source 'a': 'url' is missing"),
                            ("- {name: a, url: x, colour: red}\n", "unknown field(s) colour"),
                            ("- {name: a, url: x, rtsp_transport: quic}\n", "rtsp_transport 'quic'"),
                            ("- {name: a, url: x, sample_fps: 0}\n", "sample_fps 0"),
                            ("- {name: a, url: x, every: 5s}\n", "every, window and trigger go with questions"),
                            ("- {name: a, url: x, rules: [{question: q, every: 5s}]}\n", "rule 1: 'window' is missing"),
                            ("- {url: x}\n", "source 1: must be a mapping with a name")):
        f.write_text(text)
        with pytest.raises(BadInput) as e:
            load_sources(f)
        assert str(f) in str(e.value) and complaint in str(e.value)


def test_names_and_rules_of_many_sources_are_checked(rt):
    with pytest.raises(BadInput, match="source b: a watch needs at least one rule"):
        rt.watch({"a": {"url": [], "questions": ["q"]}, "b": []})
    two_unnamed = [SourceSpec(None, []), SourceSpec(None, [])]  # both labelled "frames"
    with pytest.raises(BadInput, match="two sources are named 'frames'"):
        rt.watch(two_unnamed, [{"question": "q", "every": 1, "window": 1}])


def test_a_budget_too_small_for_n_sources_is_refused_with_the_largest_n(rt):
    v, rules = rt.manifest["vision"], [{"question": "q", "every": "10s", "window": "60s"}]
    least = least_plan(rt.manifest, rt.plan.frames, max_new_tokens=rt.plan.max_new_tokens,
                       vision_variant=rt.plan.vision_variant)
    per_frame = v["tokens_per_frame"] * v["hidden_size"] * 4
    tight = rt.replanned()
    tight.plan = make_plan(rt.manifest, least.total + 300 * per_frame, rt.plan.frames, rt.plan.max_new_tokens,
                           rt.plan.vision_variant)
    # 60 s at 2 frames/s and one encode batch, and the queue
    ring = (120 + min(tight.plan.encode_chunk, 16) + 1) * per_frame + 16 * 32 * 32 * 3
    fit = 300 * per_frame // ring
    assert 1 <= fit < 4
    with pytest.raises(DoesNotFit) as e:
        tight.watch({n: [] for n in "abcd"}, rules, sample_fps=2)
    assert "4 sources need" in str(e.value) and f"at most {fit} of these sources fit" in str(e.value)
    records = list(tight.watch({n: [(0, frame(0))] for n in "abcd"[:fit]}, rules, sample_fps=2))
    assert records[-1]["kind"] == "end"  # as many as it said fit


def test_cli_watches_named_files_with_one_model(tiny_bundle, tmp_path):
    a, b = write_video(tmp_path / "a.mp4", 6), write_video(tmp_path / "b=1.mp4", 4)
    r = subprocess.run([sys.executable, "-m", "sfedge.runtime.cli", "watch", str(tiny_bundle[0]), "--source",
                        f"door={a}", "--source", str(b), "-q", "What happens?", "--every", "2s", "--window", "2s",
                        "--max-new-tokens", "3"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in r.stdout.splitlines()]
    answers = [x for x in records if x["kind"] == "answer"]  # frames at 0.0 ... 5.9 s and 0.0 ... 3.9 s
    assert sorted((x["source"], x["window"]["end"]) for x in answers) == [(str(b), 2.0), ("door", 2.0), ("door", 4.0)]
    assert set(records[-1]["sources"]) == {"door", str(b)} and "one model for 2 source(s)" in r.stderr


# ---- a real network source ---------------------------------------------------------------------------------------

class MJPEG(http.server.ThreadingHTTPServer):
    """multipart/x-mixed-replace JPEG frames at `fps`; connection n serves `frames_per_connection[n]` frames
    (None: until the server stops) and then drops the client, like a camera that reboots."""

    def __init__(self, frames_per_connection, fps=20):
        self.plan, self.fps, self.connections = list(frames_per_connection), fps, 0
        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}/stream.mjpg"


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        srv = self.server
        n = srv.plan[min(srv.connections, len(srv.plan) - 1)]
        srv.connections += 1
        self.send_response(200)
        self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
        self.end_headers()
        i = 0
        try:
            while n is None or i < n:
                jpg = cv2.imencode(".jpg", frame(i))[1].tobytes()
                self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(jpg)
                                 + jpg + b"\r\n")
                i += 1
                time.sleep(1 / srv.fps)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args):
        pass


def test_http_mjpeg_stream_that_drops_and_comes_back(rt):
    server = MJPEG([50, None])  # 2.5 s of frames, a dropped connection, then frames again
    watcher = rt.watch(server.url, [{"question": "What happens?", "every": "1s", "window": "2s"}], sample_fps=5)
    records = []
    try:
        for rec in watcher:
            records.append(rec)
            if rec["kind"] == "answer" and rec["window"]["end"] >= 5:
                watcher.stop()
    finally:
        server.shutdown()
    kinds = [r["kind"] for r in records]
    assert "gap" in kinds and kinds[-1] == "end" and records[-1]["reason"] == "stopped"
    gap = records[kinds.index("gap")]
    assert gap["stream_end"] > gap["stream_start"] >= 2.0 and gap["reopen_attempts"] >= 1
    after = [r for r in records[kinds.index("gap"):] if r["kind"] == "answer" and r["answer"] is not None]
    assert after and server.connections >= 2 and records[-1]["frames"]["reconnects"] >= 1
    assert all(isinstance(r["answer"], str) for r in records if r["kind"] == "answer" and r["window"]["frames"])


def test_a_stream_that_never_comes_back_ends_with_a_record_then_a_clear_error(rt):
    server = MJPEG([30, 0])  # then every connection is closed at once: no frames ever again
    records = []
    with pytest.raises(SourceLost, match="giving up"):
        for rec in rt.watch(server.url, [{"question": "q", "every": "1s", "window": "1s"}], sample_fps=5,
                            max_outage=1.5):
            records.append(rec)
    server.shutdown()
    assert records[-1]["kind"] == "end" and "giving up" in records[-1]["reason"]
    assert any(r["kind"] == "answer" for r in records)


# ---- the command line --------------------------------------------------------------------------------------------

def test_cli_appends_json_lines_and_stops_cleanly_on_sigterm(tiny_bundle, tmp_path):
    video = write_video(tmp_path / "long.mp4", 120)
    out = tmp_path / "events.jsonl"
    out.write_text('{"kind": "earlier run"}\n')
    cmd = [sys.executable, "-m", "sfedge.runtime.cli", "watch", str(tiny_bundle[0]), "--source", str(video),
           "-q", "What happens?", "--every", "2s", "--window", "4s", "--max-new-tokens", "4", "--out", str(out),
           "--realtime", "--sample-fps", "4"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and len(out.read_text().splitlines()) < 2:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    lines = out.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line complete
    assert records[0] == {"kind": "earlier run"} and records[-1]["kind"] == "end"
    assert records[-1]["reason"] == "stopped" and records[1]["kind"] == "answer"
    assert records[-1]["stream_time"] < 60  # stopped long before the file ended
    assert "SIGTERM" in err and "Traceback" not in err


def test_cli_errors_are_one_line(tiny_bundle, tmp_path):
    def run(*args):
        r = subprocess.run([sys.executable, "-m", "sfedge.runtime.cli", "watch", str(tiny_bundle[0]), *args],
                           capture_output=True, text=True, timeout=60)
        return r.returncode, r.stderr.strip().splitlines()[-1]

    code, line = run("--source", str(tmp_path / "none.mp4"), "-q", "q")
    assert code == 2 and "none.mp4: no such video file" in line
    code, line = run("--source", "0")
    assert code == 2 and "give at least one --question" in line
    bad = tmp_path / "rules.yaml"
    bad.write_text("- question: q\n  every: 5s\n")
    code, line = run("--source", "0", "--rules", str(bad))
    assert code == 2 and "rules.yaml: rule 1: 'window' is missing" in line
    code, line = run("--source", "0", "-q", "q", "--out", str(tmp_path / "no" / "such" / "dir.jsonl"))
    assert code == 2 and "cannot open for appending" in line


# ---- soak --------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_soak_ten_minutes_of_video_memory_stays_flat(demo_bundle, tmp_path):
    """11 minutes of stream time, faster than real time, through the demo bundle (its trained small tower, real
    SmolLM2): resident memory after warm-up grows less than 5%."""
    video = write_video(tmp_path / "soak.mp4", 11 * 60, fps=5, size=(160, 120))
    out = tmp_path / "soak.jsonl"
    r = subprocess.run([sys.executable, "-m", "sfedge.runtime.cli", "watch", str(demo_bundle), "--source",
                        str(video), "-q", "What happens?", "-q", "Is anyone there?", "--every", "60s",
                        "--window", "60s", "--sample-fps", "1", "--max-new-tokens", "8", "--out", str(out)],
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-2000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    answers = [x for x in records if x["kind"] == "answer"]
    assert len(answers) == 2 * 10 and records[-1]["stream_time"] >= 600
    warm = answers[3]["rss_mb"]
    peak = max(x["rss_mb"] for x in answers[3:])
    print(f"soak: rss after warm-up {warm} MB, max after {peak} MB ({(peak - warm) / warm:+.1%}), "
          f"{records[-1]['frames']}")
    assert peak <= warm * 1.05
