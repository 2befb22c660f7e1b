"""The camera watcher: standing questions over a live source, for days, in bounded memory.

    for record in rt.watch("rtsp://cam/stream", rules):   # or a file, a V4L2 device, (t, frame) pairs
        print(record)
    for record in rt.watch({"door": "rtsp://cam1/stream", "yard": "rtsp://cam2/stream"}, rules): ...

Each source has a decoding thread that reads it, keeps frames at `sample_fps` and hands them over through a
bounded queue; the caller's thread encodes them as they arrive into the source's ring buffer of per-frame features
that covers its longest window, so a frame is encoded once however many questions look at it. One runtime (one copy
of the model) serves every source: the encoder takes their frames round robin, and due questions are answered in
order of due time across sources. When a rule falls due, its window's features are aggregated into visual tokens
and the question is answered; rules due together on the same window share the visual KV prefix. Live sources drop
frames when encoding falls behind (counted in every record) and are reopened with backoff when they drop (the gap
is reported; a source down longer than its max_outage is given up, and the others go on); files and Python
iterables are read with back-pressure instead, so nothing is dropped and the output does not depend on the
machine's speed.

Stream time is the source's own clock for files and iterables, and seconds since the watch started for cameras and
network streams (so an outage shows as a gap in the windows).
"""
from __future__ import annotations

import math
import os
import queue
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import cv2
import numpy as np

from .errors import BadInput, SourceLost
from .memory import current_rss
from .answer import VisualTokens
from .rules import Rule, as_sources, check_names, check_transport
from .video import sample_indices, squash

QUEUE_FRAMES = 16  # decoded frames waiting for the encoder; beyond this a live source drops frames
BACKOFF = (0.5, 8.0)  # first and longest wait between attempts to reopen a dropped stream, seconds
OPEN_TIMEOUT_MS, READ_TIMEOUT_MS = 10_000, 5_000  # a stalled network stream counts as dropped after this

# OpenCV and FFmpeg print their own warnings for every failed open or dropped connection; our records say it once.
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)


def redact(url: str) -> str:
    """The URL with its password replaced by ***: what records, logs and errors show."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


_OPEN_LOCK = threading.Lock()  # the FFmpeg options travel in a process-wide variable: one open at a time


class Source:
    """A camera index or /dev/video path, a network URL, a video file, or a Python iterable of (t, frame) pairs
    (frame: uint8 BGR [H, W, 3], t: seconds). `label` is what records and errors show (no password)."""

    def __init__(self, spec, rtsp_transport: str = "tcp"):
        self.spec, self.frames, self.transport = spec, None, check_transport(rtsp_transport, "RTSP transport")
        if isinstance(spec, int) or (isinstance(spec, str) and spec.isdigit()):
            self.kind, self.label, self.target = "camera", f"camera {spec}", int(spec)
        elif isinstance(spec, (str, Path)) and str(spec).startswith("/dev/video"):
            self.kind, self.label, self.target = "camera", str(spec), str(spec)
        elif isinstance(spec, str) and "://" in spec:
            self.kind, self.label, self.target = "stream", redact(spec), spec
        elif isinstance(spec, (str, Path)):
            path = Path(spec)
            if not path.is_file():
                raise BadInput(f"{path}: no such video file (a source is a file, a camera index such as 0, "
                               f"/dev/videoN, or a URL such as rtsp://...)")
            self.kind, self.label, self.target = "file", str(path), str(path)
        elif hasattr(spec, "__iter__") and not isinstance(spec, dict):
            self.kind, self.label, self.frames = "frames", "frames", iter(spec)
        else:
            raise BadInput(f"source {spec!r}: expected a file, a camera index, /dev/videoN, a URL or an iterable")

    @property
    def live(self) -> bool:
        return self.kind in ("camera", "stream")

    def open(self):
        """An opened cv2.VideoCapture, or None."""
        if self.kind != "stream":
            cap = cv2.VideoCapture(self.target)
        else:
            with _OPEN_LOCK, _ffmpeg_options(self.transport if self.target.startswith("rtsp") else None):
                cap = cv2.VideoCapture(self.target, cv2.CAP_FFMPEG, [
                    cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, OPEN_TIMEOUT_MS, cv2.CAP_PROP_READ_TIMEOUT_MSEC, READ_TIMEOUT_MS])
        if cap.isOpened():
            return cap
        cap.release()
        return None


@contextmanager
def _ffmpeg_options(transport: str | None):
    """OpenCV reads FFmpeg's options for an open from OPENCV_FFMPEG_CAPTURE_OPTIONS ("key;value|key;value"): the
    user's, with this source's RTSP transport in place of any they gave."""
    name = "OPENCV_FFMPEG_CAPTURE_OPTIONS"
    before = os.environ.get(name)
    if transport is None:
        yield
        return
    kept = [o for o in (before or "").split("|") if o and not o.startswith("rtsp_transport;")]
    os.environ[name] = "|".join([*kept, f"rtsp_transport;{transport}"])
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before


@dataclass
class FeedStats:
    decoded: int = 0
    sampled: int = 0
    dropped: int = 0
    reconnects: int = 0


class FrameFeed(threading.Thread):
    """Decodes the source in its own thread and puts ("frame", t, pixels, arrival), ("gap", start, end, attempts),
    ("end", reason) or ("error", exception) on a bounded queue."""

    def __init__(self, source: Source, size, sample_fps: float, realtime: bool, max_outage: float,
                 wake: threading.Event | None = None):
        super().__init__(daemon=True, name="sfedge-frame-feed")
        self.source, self.size, self.period = source, size, 1.0 / sample_fps
        self.realtime, self.max_outage = realtime, max_outage
        self.wake = wake or threading.Event()  # set on every item put: the watcher waits on all its feeds at once
        self.queue: queue.Queue = queue.Queue(QUEUE_FRAMES)
        self.stats, self.stopping = FeedStats(), threading.Event()
        # Dropping keeps a live source current; a file or iterable waits for the encoder instead.
        self.drops = source.live or realtime
        self._next = 0.0

    def run(self):
        try:
            if self.source.kind == "frames":
                self._iterate()
            else:
                self._capture()
        except Exception as e:  # handed to the caller's thread, which raises it there
            self._send(("error", e))

    def _send(self, item):
        while not self.stopping.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                self.wake.set()
                return
            except queue.Full:
                continue

    def _offer(self, t: float, frame: np.ndarray):
        self.stats.decoded += 1
        if t + 1e-9 < self._next:
            return
        while self._next <= t + 1e-9:
            self._next += self.period
        self.stats.sampled += 1
        item = ("frame", t, squash(frame, self.size), time.monotonic())
        if not self.drops:
            self._send(item)
            return
        try:
            self.queue.put_nowait(item)
            self.wake.set()
        except queue.Full:
            self.stats.dropped += 1

    def _iterate(self):
        for n, item in enumerate(self.source.frames):
            if self.stopping.is_set():
                return
            try:
                t, frame = item
                frame = np.asarray(frame)
                t = float(t)
            except (TypeError, ValueError):
                raise BadInput(f"frames source, item {n}: expected a (seconds, frame) pair") from None
            if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
                raise BadInput(f"frames source, item {n}: a frame must be uint8 BGR [H, W, 3], got "
                               f"{frame.dtype} {list(frame.shape)}")
            self._offer(t, frame)
        self._send(("end", "the frames source is exhausted"))

    def _capture(self):
        cap = self.source.open()
        if cap is None:
            what = {"camera": "camera", "stream": "stream", "file": "video file"}[self.source.kind]
            raise BadInput(f"{self.source.label}: cannot open this {what} (not connected, wrong address or "
                           f"permissions, or a format OpenCV cannot read)")
        fps = cap.get(cv2.CAP_PROP_FPS) if self.source.kind == "file" else 0.0
        if self.source.kind == "file" and not fps > 0:
            cap.release()
            raise BadInput(f"{self.source.label}: the file does not give a frame rate, so its stream time is unknown")
        start, n = time.monotonic(), 0
        try:
            while not self.stopping.is_set():
                ok, frame = cap.read()
                now = time.monotonic() - start
                if not ok:
                    if not self.source.live:
                        self._send(("end", "end of file"))
                        return
                    cap.release()
                    cap, attempts = self._reopen()
                    if cap is None:
                        return
                    self._send(("gap", now, time.monotonic() - start, attempts))
                    continue
                t = n / fps if fps else now
                n += 1
                if self.realtime and fps:
                    time.sleep(max(0.0, start + t - time.monotonic()))
                self._offer(t, frame)
        finally:
            if cap is not None:
                cap.release()

    def _reopen(self):
        lost, wait, attempts = time.monotonic(), BACKOFF[0], 0
        while not self.stopping.wait(wait):
            attempts += 1
            self.stats.reconnects += 1
            cap = self.source.open()
            if cap is not None:
                return cap, attempts
            if time.monotonic() - lost > self.max_outage:
                raise SourceLost(f"{self.source.label}: no frames for {self.max_outage:.0f}s after the stream "
                                 f"dropped ({attempts} attempts to reopen it); giving up")
            wait = min(wait * 2, BACKOFF[1])
        return None, attempts


class FeatureRing:
    """Per-frame features of the most recent frames, preallocated once: memory does not grow with the hours."""

    def __init__(self, capacity: int, shape: tuple):
        self.features = np.zeros((capacity, *shape), np.float32)
        self.times = np.full(capacity, -np.inf)
        self.arrivals = np.zeros(capacity)
        self.next = 0  # frames pushed so far; slot = next % capacity

    def push(self, feats: np.ndarray, times, arrivals):
        for f, t, a in zip(feats, times, arrivals):
            slot = self.next % len(self.times)
            self.features[slot], self.times[slot], self.arrivals[slot] = f, t, a
            self.next += 1

    def window(self, start: float, end: float):
        """Slots of the frames with start < t <= end, in stream order."""
        slots = np.nonzero((self.times > start) & (self.times <= end))[0]
        return slots[np.argsort(self.times[slots])]


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class Stream:
    """One watched source and everything the watcher keeps for it: its feed thread and queue, its ring of encoded
    frames, its rules and when each is next due."""

    def __init__(self, name: str, source: Source, rules: list[Rule], feed: FrameFeed, ring: FeatureRing):
        self.name, self.source, self.rules, self.feed, self.ring = name, source, rules, feed, ring
        self.due = None  # rule -> next due stream time, counted from the first frame's time
        self.newest = -math.inf
        self.encoded, self.encode_s = 0, 0.0
        self.pending = None  # a gap, end or error taken from the queue, handled after the frames before it
        self.state = None  # None while it runs; then why it ended ("end of file", "lost: ...")
        self.lost: SourceLost | None = None  # why it was given up after its max_outage

    def counts(self) -> dict:
        s = self.feed.stats
        return {"decoded": s.decoded, "sampled": s.sampled, "encoded": self.encoded, "dropped": s.dropped,
                "reconnects": s.reconnects}


class Watcher:
    """Iterate to run the watch; each item is one JSON-ready record: kind "answer", "gap", "lost" (a source given up
    after its max_outage; the others go on) or "end" (the last), each with its `source`. `stop()` (from a signal
    handler or another thread) ends it after the current answer.

    `sources`: one source, {name: source or mapping with url and its own rules / sample_fps / max_outage /
    rtsp_transport}, or the list `rules.load_sources` reads; `rules` serve the sources that have none of their own.
    One runtime serves them all: each source has its own decoding thread, queue and ring; the encoder takes their
    frames round robin, in batches of up to a queue's worth, and due questions are answered in order of due
    time across sources."""

    def __init__(self, rt, sources, rules: list[Rule], sample_fps: float = 2.0, realtime: bool = False,
                 max_outage: float = 600.0, max_new_tokens: int | None = None, rtsp_transport: str = "tcp"):
        if rules:
            check_names(rules, "rules")
        if rt.qa is not None:
            raise BadInput("the watcher asks on uniform SlowFast tokens of each window; load the runtime without "
                           "frame_selection / pooling for a watch")
        self.max_new_tokens, self.wake = max_new_tokens, threading.Event()
        specs = as_sources(sources)
        built = []
        for spec in specs:
            fps = spec.sample_fps or sample_fps
            if not fps > 0:
                raise BadInput(f"sample rate {fps!r}: must be a positive number of frames per second")
            source = Source(spec.target, spec.rtsp_transport or rtsp_transport)
            name = spec.name or source.label
            own = spec.rules or rules
            if not own:
                raise BadInput(f"source {name}: a watch needs at least one rule (a question with an interval and a "
                               f"window), for every source")
            built.append((name, source, own, fps, spec.max_outage or max_outage))
        names = [b[0] for b in built]
        if len(set(names)) < len(names):
            raise BadInput(f"two sources are named {next(n for n in names if names.count(n) > 1)!r}; names label "
                           f"the records and must differ")
        # One encode batch, across sources, is at most a queue's worth of frames, as it was for a single source:
        # on a CPU a bigger batch encodes no faster, and the encoder's activations would grow with the sources.
        self.batch = min(rt.plan.encode_chunk, QUEUE_FRAMES)
        # Each ring holds its longest window back from a due time that may lag the newest frame by one encode batch.
        capacity = {name: math.ceil(max(r.window for r in own) * fps) + self.batch + 1
                    for name, _, own, fps, _ in built}
        # Our own view of the runtime, planned with every ring and queue: the caller's runtime keeps its plan.
        self.rt = rt.replanned(rings={n: (c, QUEUE_FRAMES) for n, c in capacity.items()})
        v = rt.manifest["vision"]
        self.streams = [Stream(name, source, own,
                               FrameFeed(source, rt.size, fps, realtime, outage, self.wake),
                               FeatureRing(capacity[name], (v["tokens_per_frame"], v["hidden_size"])))
                        for name, source, own, fps, outage in built]
        self._stop = threading.Event()
        self._turn = 0  # which source the round robin starts with
        self._windows = {}  # (source, end, window) -> VisualTokens: rules due together on one window share its prefix

    def stop(self):
        self._stop.set()

    def __iter__(self):
        for s in self.streams:
            s.feed.start()
        try:
            while not self._stop.is_set() and any(s.state is None for s in self.streams):
                self.wake.clear()  # before looking: a frame put after the look sets it again
                events, batch = self._take()
                for stream, item in events:
                    yield from self._event(stream, item)
                if batch:
                    yield from self._answer_due(self._encode(batch))
                elif not events:
                    self.wake.wait(0.1)
            yield self._end()
            lost = [s.lost for s in self.streams if s.lost]
            if lost and not self._stop.is_set():  # the exit code says a source was lost
                raise lost[0] if len(self.streams) == 1 else SourceLost(
                    f"{len(lost)} of {len(self.streams)} sources lost: " + "; ".join(map(str, lost)))
        finally:
            for s in self.streams:
                s.feed.stopping.set()
            for s in self.streams:
                s.feed.join(timeout=READ_TIMEOUT_MS / 1000 + 1)

    def _take(self):
        """Events held back last turn, and up to one encode chunk of frames taken one source at a time in turn
        (so a busy source cannot starve the others); a source's gap, end or error waits behind its frames."""
        running = [s for s in self.streams if s.state is None]
        events = [(s, s.pending) for s in running if s.pending]
        for s in running:
            s.pending = None
        self._turn = (self._turn + 1) % len(running)
        order = running[self._turn:] + running[:self._turn]
        batch, chunk = [], self.batch
        while len(batch) < chunk:
            took = False
            for s in order:
                if s.pending or len(batch) >= chunk:
                    continue
                try:
                    item = s.feed.queue.get_nowait()
                except queue.Empty:
                    continue
                took = True
                if item[0] == "frame":
                    batch.append((s, item))
                else:
                    s.pending = item
            if not took:
                break
        if not batch:  # nothing to encode first: the held-back events go now
            events += [(s, s.pending) for s in order if s.pending]
            for s in order:
                s.pending = None
        return events, batch

    def _event(self, stream: Stream, item):
        if item[0] == "gap":
            yield {"kind": "gap", "time": _now_iso(), "source": stream.name,
                   "stream_start": round(item[1], 3), "stream_end": round(item[2], 3),
                   "reopen_attempts": item[3], "frames": stream.counts()}
        elif item[0] == "end":
            stream.state = item[1]
        elif isinstance(item[1], SourceLost):  # this source is given up; the others go on
            stream.state, stream.lost = f"lost: {item[1]}", item[1]
            yield {"kind": "lost", "time": _now_iso(), "source": stream.name, "reason": str(item[1]),
                   "stream_time": _stream_time(stream.newest), "frames": stream.counts(),
                   "rss_mb": current_rss() // 10**6}
        else:  # a source that cannot be read at all (a bad address, a bad frame): the watch stops with its error
            stream.state = f"error: {item[1]}"
            yield self._end()
            raise item[1]

    def _encode(self, batch) -> list:
        """Encodes the frames of every source in one batch; the streams that got frames."""
        t0 = time.perf_counter()
        feats = self.rt.encode_pixels(np.stack([item[2] for _, item in batch]))
        per_frame = (time.perf_counter() - t0) / len(batch)
        fed = []
        for stream in dict.fromkeys(s for s, _ in batch):
            mine = [i for i, (s, _) in enumerate(batch) if s is stream]
            items = [batch[i][1] for i in mine]
            stream.ring.push(feats[mine], [it[1] for it in items], [it[3] for it in items])
            stream.encoded += len(mine)
            stream.encode_s += per_frame * len(mine)
            if stream.due is None:
                stream.due = {r.name: items[0][1] + r.every for r in stream.rules}
            stream.newest = items[-1][1]
            fed.append(stream)
        return fed

    def _answer_due(self, streams: list):
        """Every rule now due on these streams, answered in order of due time across them."""
        due = []
        for order, stream in enumerate(streams):
            live = stream.feed.drops  # a live source, or a file played in real time
            for k, rule in enumerate(stream.rules):
                skipped = 0
                while stream.due[rule.name] <= stream.newest + 1e-9:
                    at = stream.due[rule.name]
                    stream.due[rule.name] += rule.every
                    # Live: answer only the latest due window; older ones would describe the past late.
                    if live and stream.due[rule.name] <= stream.newest + 1e-9:
                        skipped += 1
                        continue
                    due.append((at, order, k, stream, rule, skipped))
                    skipped = 0
        for at, _, _, stream, rule, skipped in sorted(due, key=lambda d: d[:3]):
            if self._stop.is_set():
                break
            yield self._answer(stream, rule, at, skipped)
        self._windows.clear()

    def _answer(self, stream: Stream, rule: Rule, due: float, skipped: int) -> dict:
        t0 = time.perf_counter()
        slots = stream.ring.window(due - rule.window, due)
        record = {"kind": "answer", "time": None, "source": stream.name, "rule": rule.name, "question": rule.question,
                  "window": {"start": round(max(0.0, due - rule.window), 3), "end": round(due, 3),
                             "frames": len(slots)}}
        if len(slots) == 0:
            return {**record, "time": _now_iso(), "answer": None, "triggered": False,
                    "note": "no frames in this window (the stream was down): not asked",
                    "skipped_due": skipped, "frames": stream.counts(), "rss_mb": current_rss() // 10**6}
        if len(slots) > self.rt.plan.frames:
            slots = slots[sample_indices(len(slots), self.rt.plan.frames)]
        key = (stream.name, round(due, 6), rule.window)
        vt = self._windows.get(key)
        aggregate = 0.0
        if vt is None:
            tokens = self.rt.aggregate(stream.ring.features[slots])
            aggregate = time.perf_counter() - t0
            times = [round(float(t), 3) for t in stream.ring.times[slots]]
            vt = VisualTokens(tokens, times, len(times), "stream", {"aggregate": aggregate})
            self._windows[key] = vt
        ans = self.rt.ask(vt, rule.question, max_new_tokens=self.max_new_tokens)
        latest_arrival = float(stream.ring.arrivals[slots[-1]])
        return {**record, "time": _now_iso(),
                "window": {**record["window"], "frames_used": len(slots), "first_frame": vt.frame_indices[0],
                           "last_frame": vt.frame_indices[-1]},
                "answer": ans.text, "triggered": rule.triggered(ans.text),
                "latency_s": {"aggregate": round(aggregate, 4), "prefill": round(ans.timings["prefill"], 4),
                              "generate": round(ans.timings["generate"], 4),
                              "answer": round(time.perf_counter() - t0, 4),
                              "since_last_frame": round(time.monotonic() - latest_arrival, 4),
                              "encode_per_frame": round(stream.encode_s / max(stream.encoded, 1), 4)},
                "reused_prefix": ans.reused_prefix, "generated_tokens": ans.generated_tokens,
                "skipped_due": skipped, "frames": stream.counts(), "rss_mb": current_rss() // 10**6}

    def _end(self) -> dict:
        """The last record: one source's as before; with several, their totals and each one's state."""
        states = {s.name: s.state or "stopped" for s in self.streams}
        newest = max(s.newest for s in self.streams)
        if len(self.streams) == 1:
            only = self.streams[0]
            return {"kind": "end", "time": _now_iso(), "source": only.name, "reason": states[only.name],
                    "stream_time": _stream_time(newest), "frames": only.counts(), "rss_mb": current_rss() // 10**6}
        totals = {k: sum(s.counts()[k] for s in self.streams) for k in self.streams[0].counts()}
        errors = [st for st in states.values() if st.startswith("error:")]
        reason = (errors[0] if errors else "stopped" if "stopped" in states.values()
                  else "every source ended or was lost")
        return {"kind": "end", "time": _now_iso(), "source": None, "reason": reason,
                "stream_time": _stream_time(newest), "frames": totals, "rss_mb": current_rss() // 10**6,
                "sources": {s.name: {"label": s.source.label, "state": states[s.name],
                                     "stream_time": _stream_time(s.newest), "frames": s.counts()}
                            for s in self.streams}}


def _stream_time(t: float):
    return round(t, 3) if t > -math.inf else None
