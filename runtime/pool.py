"""The local pool of `sf-run batch`: N worker processes, each holding one Runtime, fed one video at a time over a
pipe of its own. A worker that dies (killed, out of memory, a crash in a decoder) is replaced and the questions it
had not answered are redone; a video that takes down its worker MAX_ATTEMPTS times is given up, and the driver
writes error rows for what is left of it."""
from __future__ import annotations

import multiprocessing as mp
import signal
import threading
from collections import Counter, deque
from dataclasses import dataclass, field
from multiprocessing.connection import wait

from .answering import answer_video, cause
from .errors import SFEdgeError

MAX_ATTEMPTS = 3


def _worker(conn, bundle, settings, sampling) -> None:
    from .pipeline import Runtime

    try:
        rt = Runtime.load(bundle, settings)
    except Exception as e:  # no worker could run the job: the driver raises it
        conn.send(("failed", e if isinstance(e, SFEdgeError) else SFEdgeError(cause(e))))
        return
    conn.send(("ready", None))
    while (task := conn.recv()) is not None:
        path, jobs = task
        # The driver sends nothing while a video is being answered except "stop": a waiting message means stop.
        for row in answer_video(rt, path, jobs, sampling, stop=conn.poll):
            conn.send(("row", row))
        conn.send(("done", None))


@dataclass
class _Slot:
    proc: object
    conn: object
    ready: bool = False
    leaving: bool = False  # told there is no more work
    task: tuple | None = None  # (path, job dicts) being answered
    answered: set = field(default_factory=set)


def run_local(bundle: str, settings, sampling: dict, groups: list, workers: int, on_row, stop, note) -> None:
    """Answer `groups` ([(path, [Job])]) on `workers` processes; each result row goes to `on_row` as it arrives.
    `stop` (an Event) set: every worker finishes its current answer and the pool returns."""
    ctx = mp.get_context("spawn")  # a fresh interpreter: no inherited ONNX Runtime threads or locks
    todo = deque((path, [j.to_dict() for j in jobs]) for path, jobs in groups)
    attempts = Counter()
    slots = [_start(ctx, bundle, settings, sampling) for _ in range(workers)]
    stopping = False
    try:
        while slots:
            if stop.is_set() and not stopping:
                stopping = True
                todo.clear()
                for s in slots:
                    _send(s, None)
            ready = set(wait([s.conn for s in slots] + [s.proc.sentinel for s in slots], timeout=0.2))
            for s in [s for s in slots if s.conn in ready or s.proc.sentinel in ready]:
                if _serve(s, todo, on_row):
                    continue
                slots.remove(s)
                if not (s.leaving or stopping) and _requeue(s, todo, attempts, note):
                    slots.append(_start(ctx, bundle, settings, sampling))
    finally:
        for s in slots:
            s.proc.kill()
            s.proc.join()


def _start(ctx, bundle, settings, sampling) -> _Slot:
    here, there = ctx.Pipe()
    proc = ctx.Process(target=_worker, args=(there, bundle, settings, sampling), daemon=True)
    # Ctrl-C in a terminal reaches the whole process group: workers start with SIGINT ignored, so that only the
    # driver decides when to stop (after the current answers).
    main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
    try:
        proc.start()
    finally:
        if main:
            signal.signal(signal.SIGINT, old)
    there.close()
    return _Slot(proc, here)


def _serve(s: _Slot, todo: deque, on_row) -> bool:
    """Handle every message waiting from a worker; False once the worker is gone."""
    try:
        while s.conn.poll():
            kind, payload = s.conn.recv()
            if kind == "failed":
                raise payload
            if kind == "row":
                s.answered.add(payload["id"])
                on_row(payload)
            else:  # "ready" or "done": the worker wants the next video
                s.ready, s.task = True, None
                _dispatch(s, todo)
    except (EOFError, OSError):  # its end of the pipe closed: it exited or was killed
        s.proc.join()
    return s.proc.exitcode is None


def _dispatch(s: _Slot, todo: deque) -> None:
    if todo:
        s.task, s.answered = todo.popleft(), set()
        _send(s, s.task)
    else:
        s.leaving = True
        _send(s, None)


def _send(s: _Slot, message) -> None:
    try:
        s.conn.send(message)
    except OSError:  # it died: its sentinel says so and its task is redone
        pass


def _requeue(s: _Slot, todo: deque, attempts: Counter, note) -> bool:
    """A worker died unexpectedly: put back what it had not answered. True when a replacement is needed."""
    code = s.proc.exitcode
    why = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
    if not s.ready:  # once may be the OOM killer's pick; every time is a bundle that cannot load here
        attempts[None] += 1
        if attempts[None] >= MAX_ATTEMPTS:
            raise SFEdgeError(f"worker processes died {attempts[None]} times while loading the bundle (the last "
                              f"{why})")
        note(f"a worker process {why} while loading the bundle: starting another")
        return True
    if s.task is None:
        return bool(todo)
    path, jobs = s.task
    left = [j for j in jobs if j["id"] not in s.answered]
    attempts[path] += 1
    if attempts[path] >= MAX_ATTEMPTS:
        note(f"a worker process {why} on {path} {attempts[path]} times: giving up on its {len(left)} question(s)")
        return bool(todo)
    note(f"a worker process {why} on {path}: restarting it; redoing {len(left)} question(s)")
    todo.appendleft((path, left))
    return True
