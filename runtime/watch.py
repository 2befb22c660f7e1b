"""The camera watcher: standing questions over a live source, for days, in bounded memory.

    for record in rt.watch("rtsp://cam/stream", rules):   # or a file, a V4L2 device, (t, frame) pairs
        print(record)

A decoding thread reads the source, keeps frames at `sample_fps` and hands them over through a bounded queue; the
caller's thread encodes them as they arrive into a ring buffer of per-frame features that covers the longest window,
so a frame is encoded once however many questions look at it. When a rule falls due, its window's features are
aggregated into visual tokens and the question is answered; rules due together on the same window share the visual
KV prefix. Live sources drop frames when encoding falls behind (counted in every record) and are reopened with
backoff when they drop (the gap is reported); files and Python iterables are read with back-pressure instead, so
nothing is dropped and the output does not depend on the machine's speed.

Stream time is the source's own clock for files and iterables, and seconds since the watch started for cameras and
network streams (so an outage shows as a gap in the windows).
"""
from __future__ import annotations

import math
import os
import queue
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import cv2
import numpy as np

from .errors import BadInput, SourceLost
from .memory import current_rss
from .answer import VisualTokens
from .rules import Rule, check_names
from .video import sample_indices, squash

QUEUE_FRAMES = 16  # decoded frames waiting for the encoder; beyond this a live source drops frames
BACKOFF = (0.5, 8.0)  # first and longest wait between attempts to reopen a dropped stream, seconds
OPEN_TIMEOUT_MS, READ_TIMEOUT_MS = 10_000, 5_000  # a stalled network stream counts as dropped after this

# OpenCV and FFmpeg print their own warnings for every failed open or dropped connection; our records say it once.
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)


class Source:
    """A camera index or /dev/video path, a network URL, a video file, or a Python iterable of (t, frame) pairs
    (frame: uint8 BGR [H, W, 3], t: seconds)."""

    def __init__(self, spec):
        self.spec, self.frames = spec, None
        if isinstance(spec, int) or (isinstance(spec, str) and spec.isdigit()):
            self.kind, self.label, self.target = "camera", f"camera {spec}", int(spec)
        elif isinstance(spec, (str, Path)) and str(spec).startswith("/dev/video"):
            self.kind, self.label, self.target = "camera", str(spec), str(spec)
        elif isinstance(spec, str) and "://" in spec:
            self.kind, self.label, self.target = "stream", spec, spec
        elif isinstance(spec, (str, Path)):
            path = Path(spec)
            if not path.is_file():
                raise BadInput(f"{path}: no such video file (a source is a file, a camera index such as 0, "
                               f"/dev/videoN, or a URL such as rtsp://...)")
            self.kind, self.label, self.target = "file", str(path), str(path)
        elif hasattr(spec, "__iter__"):
            self.kind, self.label, self.frames = "frames", "frames", iter(spec)
        else:
            raise BadInput(f"source {spec!r}: expected a file, a camera index, /dev/videoN, a URL or an iterable")

    @property
    def live(self) -> bool:
        return self.kind in ("camera", "stream")

    def open(self):
        """An opened cv2.VideoCapture, or None."""
        if self.kind == "stream":
            cap = cv2.VideoCapture(self.target, cv2.CAP_FFMPEG, [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, OPEN_TIMEOUT_MS,
                                                                  cv2.CAP_PROP_READ_TIMEOUT_MSEC, READ_TIMEOUT_MS])
        else:
            cap = cv2.VideoCapture(self.target)
        if cap.isOpened():
            return cap
        cap.release()
        return None


@dataclass
class FeedStats:
    decoded: int = 0
    sampled: int = 0
    dropped: int = 0
    reconnects: int = 0


class FrameFeed(threading.Thread):
    """Decodes the source in its own thread and puts ("frame", t, pixels, arrival), ("gap", start, end, attempts),
    ("end", reason) or ("error", exception) on a bounded queue."""

    def __init__(self, source: Source, size, sample_fps: float, realtime: bool, max_outage: float):
        super().__init__(daemon=True, name="sfedge-frame-feed")
        self.source, self.size, self.period = source, size, 1.0 / sample_fps
        self.realtime, self.max_outage = realtime, max_outage
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


class Watcher:
    """Iterate to run the watch; each item is one JSON-ready record: kind "answer", "gap" or "end" (the last).
    `stop()` (from a signal handler or another thread) ends it after the current answer."""

    def __init__(self, rt, source, rules: list[Rule], sample_fps: float = 2.0, realtime: bool = False,
                 max_outage: float = 600.0, max_new_tokens: int | None = None):
        if not rules:
            raise BadInput("a watch needs at least one rule (a question with an interval and a window)")
        check_names(rules, "rules")
        if not sample_fps > 0:
            raise BadInput(f"sample rate {sample_fps!r}: must be a positive number of frames per second")
        if rt.qa is not None:
            raise BadInput("the watcher asks on uniform SlowFast tokens of each window; load the runtime without "
                           "frame_selection / pooling for a watch")
        self.rules, self.max_new_tokens = rules, max_new_tokens
        self.source = source if isinstance(source, Source) else Source(source)
        longest = max(r.window for r in rules)
        # The ring holds the longest window back from a due time that may lag the newest frame by one encode batch.
        capacity = math.ceil(longest * sample_fps) + rt.plan.encode_chunk + 1
        # Our own view of the runtime, planned with the ring and queue: the caller's runtime keeps its plan.
        self.rt = rt.replanned(ring_frames=capacity, queued_frames=QUEUE_FRAMES)
        v = rt.manifest["vision"]
        self.ring = FeatureRing(capacity, (v["tokens_per_frame"], v["hidden_size"]))
        self.feed = FrameFeed(self.source, rt.size, sample_fps, realtime, max_outage)
        self.encoded, self.encode_s = 0, 0.0
        self.due = None  # rule -> next due stream time, counted from the first frame's time
        self._stop = threading.Event()
        self._windows = {}  # (end, window) -> VisualTokens: rules due together on one window share its KV prefix

    def stop(self):
        self._stop.set()

    def __iter__(self):
        self.feed.start()
        newest, pending = -math.inf, None
        try:
            while not self._stop.is_set():
                try:
                    item = pending or self.feed.queue.get(timeout=0.1)
                except queue.Empty:
                    continue
                pending = None
                if item[0] == "frame":
                    batch = [item]
                    while len(batch) < self.rt.plan.encode_chunk:
                        try:
                            nxt = self.feed.queue.get_nowait()
                        except queue.Empty:
                            break
                        if nxt[0] != "frame":
                            pending = nxt  # handled next turn, after this batch
                            break
                        batch.append(nxt)
                    self._encode(batch)
                    if self.due is None:
                        self.due = {r.name: batch[0][1] + r.every for r in self.rules}
                    newest = batch[-1][1]
                    yield from self._answer_due(newest)
                elif item[0] == "gap":
                    yield {"kind": "gap", "time": _now_iso(), "source": self.source.label,
                           "stream_start": round(item[1], 3), "stream_end": round(item[2], 3),
                           "reopen_attempts": item[3], "frames": self._frame_counts()}
                elif item[0] == "end":
                    yield self._end(item[1], newest)
                    return
                else:
                    yield self._end(f"error: {item[1]}", newest)
                    raise item[1]
            yield self._end("stopped", newest)
        finally:
            self.feed.stopping.set()
            self.feed.join(timeout=READ_TIMEOUT_MS / 1000 + 1)

    def _encode(self, batch):
        t0 = time.perf_counter()
        feats = self.rt.encode_pixels(np.stack([b[2] for b in batch]))
        self.encode_s += time.perf_counter() - t0
        self.encoded += len(batch)
        self.ring.push(feats, [b[1] for b in batch], [b[3] for b in batch])

    def _answer_due(self, newest: float):
        live = self.feed.drops  # a live source, or a file played in real time
        for rule in self.rules:
            skipped = 0
            while self.due[rule.name] <= newest + 1e-9:
                due = self.due[rule.name]
                self.due[rule.name] += rule.every
                # Live: answer only the latest due window; older ones would describe the past late.
                if live and self.due[rule.name] <= newest + 1e-9:
                    skipped += 1
                    continue
                if self._stop.is_set():
                    return
                yield self._answer(rule, due, skipped)
                skipped = 0
        self._windows.clear()

    def _answer(self, rule: Rule, due: float, skipped: int) -> dict:
        t0 = time.perf_counter()
        slots = self.ring.window(due - rule.window, due)
        record = {"kind": "answer", "time": None, "rule": rule.name, "question": rule.question,
                  "window": {"start": round(max(0.0, due - rule.window), 3), "end": round(due, 3),
                             "frames": len(slots)}}
        if len(slots) == 0:
            return {**record, "time": _now_iso(), "answer": None, "triggered": False,
                    "note": "no frames in this window (the stream was down): not asked",
                    "skipped_due": skipped, "frames": self._frame_counts(), "rss_mb": current_rss() // 10**6}
        if len(slots) > self.rt.plan.frames:
            slots = slots[sample_indices(len(slots), self.rt.plan.frames)]
        key = (round(due, 6), rule.window)
        vt = self._windows.get(key)
        aggregate = 0.0
        if vt is None:
            tokens = self.rt.aggregate(self.ring.features[slots])
            aggregate = time.perf_counter() - t0
            times = [round(float(t), 3) for t in self.ring.times[slots]]
            vt = VisualTokens(tokens, times, len(times), "stream", {"aggregate": aggregate})
            self._windows[key] = vt
        ans = self.rt.ask(vt, rule.question, max_new_tokens=self.max_new_tokens)
        latest_arrival = float(self.ring.arrivals[slots[-1]])
        return {**record, "time": _now_iso(),
                "window": {**record["window"], "frames_used": len(slots), "first_frame": vt.frame_indices[0],
                           "last_frame": vt.frame_indices[-1]},
                "answer": ans.text, "triggered": rule.triggered(ans.text),
                "latency_s": {"aggregate": round(aggregate, 4), "prefill": round(ans.timings["prefill"], 4),
                              "generate": round(ans.timings["generate"], 4),
                              "answer": round(time.perf_counter() - t0, 4),
                              "since_last_frame": round(time.monotonic() - latest_arrival, 4),
                              "encode_per_frame": round(self.encode_s / max(self.encoded, 1), 4)},
                "reused_prefix": ans.reused_prefix, "generated_tokens": ans.generated_tokens,
                "skipped_due": skipped, "frames": self._frame_counts(), "rss_mb": current_rss() // 10**6}

    def _frame_counts(self) -> dict:
        s = self.feed.stats
        return {"decoded": s.decoded, "sampled": s.sampled, "encoded": self.encoded, "dropped": s.dropped,
                "reconnects": s.reconnects}

    def _end(self, reason: str, newest: float) -> dict:
        return {"kind": "end", "time": _now_iso(), "reason": reason,
                "stream_time": round(newest, 3) if newest > -math.inf else None, "frames": self._frame_counts(),
                "rss_mb": current_rss() // 10**6}
