"""What the three CLIs share: project errors become one line on stderr and a distinct exit code; SIGTERM is
handled like Ctrl-C so cleanup code runs."""
from __future__ import annotations

import os
import signal
import sys

from .errors import SFEdgeError


def run_cli(prog: str, main_fn) -> int:
    def _term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _term)
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
