"""SIGTERM stops a run the way Ctrl-C does: by an exception in the main thread.

Python's default for SIGTERM ends the process on the spot, with no `finally`, no `with` exit and
no atexit. A scheduler's preemption, `kill` or `timeout` then left a run's world servers'
folders in /tmp, and a sweep's running child went on alone, where a restarted sweep would
resume the same workdir beside it. As an exception, the stop runs the cleanup the code already
has for Ctrl-C; the last finished checkpoint is what a `--resume` continues from.

The first SIGTERM or SIGINT raises; later ones are ignored, so that they cannot cut that
cleanup short (a sweep forwards its stop to a child that a terminal's Ctrl-C already reached).
SIGKILL still ends a process whose cleanup hangs.
"""

from __future__ import annotations

import signal

STOPPED_BY_SIGTERM = 128 + signal.SIGTERM  # The exit status a shell reports for it.


def stop_on_signals() -> None:
    """Install the handlers; call it from the main thread (Python runs handlers there)."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _stop)


def _stop(signum: int, _frame: object) -> None:
    for other in (signal.SIGTERM, signal.SIGINT):
        signal.signal(other, signal.SIG_IGN)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(STOPPED_BY_SIGTERM)
