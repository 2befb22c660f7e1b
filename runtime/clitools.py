"""What the three CLIs share: project errors become one line on stderr and a distinct exit code; SIGTERM is
handled like Ctrl-C so cleanup code runs."""
from __future__ import annotations

import os
import signal
import sys

from .errors import SFEdgeError


_signals: list[int] = []  # SIGINT / SIGTERM received by this process


def _interrupt(signum, frame):
    _signals.append(signum)
    raise KeyboardInterrupt


def stop_if_interrupted() -> None:
    """Raise KeyboardInterrupt again if a signal came: CPython swallows one raised while a finalizer runs (it prints
    "Exception ignored in ..." and goes on), so a loop that must stop on Ctrl-C checks here as well."""
    if _signals:
        raise KeyboardInterrupt


def run_cli(prog: str, main_fn) -> int:
    signal.signal(signal.SIGTERM, _interrupt)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # left alone where the shell ignores it
        signal.signal(signal.SIGINT, _interrupt)
    try:
        return main_fn() or 0
    except SFEdgeError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        # Cleanup already ran on the way up (export's finally blocks). Exit at once with 130: an interrupt that
        # reached a library's C++ callback can leave CPython flagged to re-raise it as SIGINT at shutdown.
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
