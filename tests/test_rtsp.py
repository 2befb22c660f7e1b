"""RTSP for real: GStreamer's RTSP server on the loopback address serving H.264 that ffmpeg's libx264 encoded from
real footage (sfedge/bench/rtsp_server.py), watched over TCP and UDP, through a server that stops and comes back,
one that never does, a change of resolution, credentials, and several cameras on one model."""
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sfedge.bench import rtsp_server
from sfedge.runtime import Runtime
from sfedge.runtime.errors import SourceLost
from sfedge.runtime.video import demo_video

MISSING = rtsp_server.available()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=f"no RTSP server here: {MISSING}")

USER, PASSWORD = "viewer", "pw-Zq81x-secret"
RULE = [{"name": "what", "question": "What happens?", "every": "1s", "window": "2s"}]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Real footage as H.264 MPEG-TS: 90 s of bigbuckbunny at 320x180, and 8 s of it then 8 s of bikes at
    256x108."""
    folder = tmp_path_factory.mktemp("rtsp")
    bunny, bikes = str(demo_video()), str(demo_video().with_name("bikes.mp4"))
    return {"cam": rtsp_server.clip(folder / "cam.ts", [(bunny, 320, 180)], 90),
            "res": rtsp_server.clip(folder / "res.ts", [(bunny, 320, 180), (bikes, 256, 108)], 16)}


@pytest.fixture
def rt(tiny_bundle):
    return Runtime.load(tiny_bundle[0], vision_variant="fp32", max_new_tokens=4)


class Server:
    """The RTSP server on a free loopback port, which a test may stop and start again on the same port."""

    def __init__(self, clips, **auth):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.clips, self.auth, self.proc = clips, auth, None
        self.start()

    def start(self):
        self.proc = rtsp_server.start(self.port, self.clips, **self.auth)

    def stop(self):
        self.proc.kill()
        self.proc.wait()

    def url(self, mount="cam", userinfo=""):
        return f"rtsp://{userinfo}127.0.0.1:{self.port}/{mount}"


@pytest.fixture
def server(clips):
    srv = Server(clips)
    yield srv
    srv.stop()


def watch(watcher, until, timeout=60.0, on_record=None):
    """Records until `until(records)` holds (then the watch is stopped), or `timeout` seconds."""
    records, timer = [], threading.Timer(timeout, watcher.stop)
    timer.start()
    try:
        for rec in watcher:
            records.append(rec)
            if on_record:
                on_record(rec, records)
            if until(records):
                watcher.stop()
    finally:
        timer.cancel()
    return records


def answered(records, source=None):
    return [r for r in records if r["kind"] == "answer" and r["answer"] is not None
            and source in (None, r["source"])]


def udp_sockets() -> int:
    """UDP sockets this process holds (RTP and RTCP when RTSP runs over UDP)."""
    inodes = {Path(f"/proc/self/fd/{fd.name}").readlink().name[len("socket:["):-1]
              for fd in Path("/proc/self/fd").iterdir() if fd.exists() and "socket:" in str(fd.readlink())}
    rows = (Path(p).read_text().splitlines()[1:] for p in ("/proc/net/udp", "/proc/net/udp6"))
    return sum(line.split()[9] in inodes for lines in rows for line in lines)


@pytest.mark.parametrize("transport", ["tcp", "udp"])
def test_h264_over_rtsp(rt, server, transport):
    seen = {}

    def look(rec, records):
        if rec["kind"] == "answer" and "udp" not in seen:
            seen["udp"] = udp_sockets()

    records = watch(rt.watch(server.url(), RULE, sample_fps=4, rtsp_transport=transport),
                    lambda rs: len(answered(rs)) >= 3, on_record=look)
    answers = answered(records)
    assert len(answers) >= 3 and records[-1]["kind"] == "end" and records[-1]["reason"] == "stopped"
    assert all(r["source"] == server.url() for r in records)
    assert answers[-1]["window"]["frames"] >= 6 and records[-1]["frames"]["decoded"] >= 25 * 2
    assert (seen["udp"] >= 2) == (transport == "udp")  # RTP and RTCP over UDP, or interleaved on the TCP link


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["tcp", "udp"])
def test_rtsp_server_stops_mid_stream_and_comes_back(rt, server, transport):
    state = {}

    def look(rec, records):
        if rec["kind"] == "answer" and rec["answer"] and "stopped" not in state:
            server.stop()
            state["stopped"] = True
            threading.Timer(2.0, server.start).start()  # back on the same port two seconds later

    records = watch(rt.watch(server.url(), RULE, sample_fps=4, max_outage=30, rtsp_transport=transport),
                    lambda rs: any(r["kind"] == "gap" for r in rs) and len(answered(rs[-3:])) == 3, on_record=look)
    kinds = [r["kind"] for r in records]
    assert "gap" in kinds, kinds
    gap = records[kinds.index("gap")]
    assert gap["stream_end"] > gap["stream_start"] and gap["reopen_attempts"] >= 1
    assert answered(records[kinds.index("gap"):]) and records[-1]["frames"]["reconnects"] >= 1


@pytest.mark.slow
def test_rtsp_stream_that_never_comes_back_is_lost_after_max_outage(rt, server):
    def look(rec, records):
        if rec["kind"] == "answer" and rec["answer"] and server.proc.poll() is None:
            server.stop()

    with pytest.raises(SourceLost, match="giving up"):
        watch(rt.watch(server.url(), RULE, sample_fps=4, max_outage=2), lambda rs: False, on_record=look)


def test_rtsp_stream_whose_resolution_changes(rt, server):
    # 8 s at 320x180, then other footage at 256x108: answers go on across the change, without a gap.
    records = watch(rt.watch(server.url("res"), RULE, sample_fps=4),
                    lambda rs: any(r["window"]["end"] >= 11 for r in answered(rs)))
    assert not [r for r in records if r["kind"] == "gap"]
    after = [r for r in answered(records) if r["window"]["start"] >= 8.5]
    assert after and all(r["window"]["frames"] >= 6 for r in after)


@pytest.mark.slow
def test_many_rtsp_cameras_one_model_and_one_lost(rt, clips):
    """Two cameras on two servers: one stops for good; the other's answers go on, none missing, and its own
    records carry its name."""
    door, yard = Server(clips), Server(clips)
    state = {}

    def look(rec, records):
        if not state and len(answered(records, "door")) >= 2 and len(answered(records, "yard")) >= 2:
            yard.stop()
            state["at"] = rec["window"]["end"]

    try:
        watcher = rt.watch({"door": door.url(), "yard": yard.url()}, RULE, sample_fps=4, max_outage=2)
        records = watch(watcher, lambda rs: state and any(r["kind"] == "lost" for r in rs)
                        and max(r["window"]["end"] for r in answered(rs, "door")) >= state["at"] + 6,
                        on_record=look)
    finally:
        door.stop()
    assert watcher.rt.vision is rt.vision and watcher.rt.llm is rt.llm  # one model for both
    assert all(r["source"] in ("door", "yard") for r in records[:-1])
    lost = [r for r in records if r["kind"] == "lost"]
    assert [r["source"] for r in lost] == ["yard"] and "giving up" in lost[0]["reason"]
    ends = [r["window"]["end"] for r in records if r["kind"] == "answer" and r["source"] == "door"]
    assert ends == pytest.approx([ends[0] + i for i in range(len(ends))])  # every due window of the door answered, none lost
    assert all(r["skipped_due"] == 0 and r["answer"] for r in records if r.get("source") == "door"
               and r["kind"] == "answer")
    end = records[-1]
    assert end["kind"] == "end" and end["sources"]["door"]["state"] == "stopped"
    assert end["sources"]["yard"]["state"].startswith("lost")


def test_credentials_never_appear_in_clear(tiny_bundle, clips, tmp_path):
    srv = Server(clips, user=USER, password=PASSWORD)
    try:
        cmd = [sys.executable, "-m", "sfedge.runtime.cli", "watch", str(tiny_bundle[0]), "-q", "What happens?",
               "--every", "1s", "--window", "2s", "--sample-fps", "4", "--max-new-tokens", "4"]
        # A wrong password: a one-line error naming the source without its password.
        wrong = subprocess.run(cmd + ["--source", srv.url(userinfo=f"{USER}:wrong-{PASSWORD}@")],
                               capture_output=True, text=True, timeout=60)
        assert wrong.returncode == 2 and f"rtsp://{USER}:***@127.0.0.1:{srv.port}/cam" in wrong.stderr
        assert PASSWORD not in wrong.stdout + wrong.stderr
        out = tmp_path / "events.jsonl"
        good = subprocess.Popen(cmd + ["--source", f"door={srv.url(userinfo=f'{USER}:{PASSWORD}@')}",
                                       "--source", srv.url(userinfo=f"{USER}:{PASSWORD}@"), "--out", str(out)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 60
        while time.time() < deadline and (not out.exists() or out.read_text().count('"kind": "answer"') < 4):
            time.sleep(0.2)
        good.send_signal(signal.SIGTERM)
        stdout, stderr = good.communicate(timeout=30)
    finally:
        srv.stop()
    assert good.returncode == 0, stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["source"] for r in records if r["kind"] == "answer"} == {
        "door", f"rtsp://{USER}:***@127.0.0.1:{srv.port}/cam"}
    assert PASSWORD not in stdout + stderr + out.read_text()
    assert f"{USER}:***@" in stderr and records[-1]["sources"]["door"]["label"].startswith(f"rtsp://{USER}:***@")
