"""Each measurement in a fresh process, so that its peak resident memory and its threads belong to one backend.

The parent runs `python -m sfedge.bench.spawn WORKER ARGS_JSON REPLY_FILE`; the child calls
workers.WORKERS[WORKER](**args) and writes {"result": ...} or {"error": "Type: reason"} to REPLY_FILE. The reply
travels in a file because native libraries (llama.cpp, ONNX Runtime, OpenCV) print to the same stdout, and C stdio
flushes its buffer at exit, after anything Python printed."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path


class WorkerFailed(Exception):
    """A worker raised, or its process died; the message is the reason."""


def run(worker: str, args: dict) -> dict:
    """The worker's result, measured in a process of its own. Paths in `args` travel as strings."""
    with tempfile.TemporaryDirectory(prefix="sf-bench-") as tmp:
        reply_file = Path(tmp) / "reply.json"
        cmd = [sys.executable, "-m", "sfedge.bench.spawn", worker, json.dumps(args, default=str), str(reply_file)]
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        try:
            reply = json.loads(reply_file.read_text())
        except (OSError, json.JSONDecodeError):  # it died before answering: its last words are on stderr
            last = done.stderr.strip().splitlines() or [f"worker exited with code {done.returncode}"]
            raise WorkerFailed(last[-1]) from None
    if "error" in reply:
        raise WorkerFailed(reply["error"])
    return reply["result"]


def child(worker: str, args_json: str, reply_file: str) -> int:
    from .workers import WORKERS

    try:
        reply = {"result": WORKERS[worker](**json.loads(args_json))}
    except Exception as e:  # every failure becomes the reason the parent reports
        traceback.print_exc()
        reply = {"error": f"{type(e).__name__}: {e}"}
    Path(reply_file).write_text(json.dumps(reply))
    return 0 if "result" in reply else 1


if __name__ == "__main__":
    sys.exit(child(*sys.argv[1:]))
