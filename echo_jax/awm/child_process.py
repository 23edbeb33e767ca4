"""Guards for the child processes that run world code (world servers, verifiers, capture workers).

Each child gets hard resource limits and a parent-death SIGKILL before it execs, runs as the
leader of its own process group so that it can be killed with everything it spawned, and writes
its output to a file whose end goes into error messages.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

_PR_SET_PDEATHSIG = 1
_STOP_GRACE_S = 3.0
_REAP_WAIT_S = 2.0


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """libc for prctl on Linux; looked up once, as find_library runs a subprocess."""
    name = ctypes.util.find_library("c") if sys.platform.startswith("linux") else None
    return None if name is None else ctypes.CDLL(name, use_errno=True)


def parent_death_hook(signum: int = signal.SIGKILL) -> Callable[[], None]:
    """Return a preexec hook asking Linux to send the child `signum` when its parent thread
    dies."""
    libc = _libc()
    if libc is None:
        return lambda: None
    return lambda: libc.prctl(_PR_SET_PDEATHSIG, signum)


@dataclass(frozen=True)
class ChildLimits:
    """Hard resource limits (soft = hard) of a child process; None leaves one as inherited."""

    address_space_bytes: int | None = None
    cpu_seconds: int | None = None
    file_size_bytes: int | None = None
    open_files: int | None = None


def limiting_preexec(limits: ChildLimits, group=None) -> Callable[[], None]:
    """A preexec hook that joins `group` (a `cgroup.SandboxCgroup`, if any), applies `limits`
    and then arms the parent-death signal."""
    named = {
        resource.RLIMIT_AS: limits.address_space_bytes,
        resource.RLIMIT_CPU: limits.cpu_seconds,
        resource.RLIMIT_FSIZE: limits.file_size_bytes,
        resource.RLIMIT_NOFILE: limits.open_files,
    }
    rlimits = {which: limit for which, limit in named.items() if limit is not None}
    set_death_signal = parent_death_hook()
    join = group.join_hook() if group is not None else (lambda: None)

    def apply() -> None:
        join()
        for which, limit in rlimits.items():
            resource.setrlimit(which, (limit, limit))
        set_death_signal()

    return apply


def kill_process_group(process: subprocess.Popen, grace_s: float = _STOP_GRACE_S) -> None:
    """SIGTERM the process group led by `process`, SIGKILL it after `grace_s`, and reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace_s)
    # Also catches anything the leader spawned that outlived it in the same group (inside the
    # sandbox: bwrap's PID 1 and the server), then waits, briefly, until their parents (not us)
    # have reaped them, so that a stopped server has no process left.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + _REAP_WAIT_S
    with contextlib.suppress(ProcessLookupError):
        while time.monotonic() < deadline:
            os.killpg(process.pid, 0)
            time.sleep(0.005)


def read_tail(path: Path, max_bytes: int) -> str:
    """The last `max_bytes` of a child's output file as text (undecodable bytes replaced), or
    "" once the file is gone: it is read on failure paths, which may race the close that
    removes it, and a failure must still be reported."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - max_bytes))
            return handle.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""
