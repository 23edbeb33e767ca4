"""A cgroup per sandbox: its processes capped in number and memory, and killed whole at its end.

RLIMIT_NPROC does not bind a host that runs as root, RLIMIT_AS caps one process and not the
sum, and a process that leaves its session or its parent escapes a process-group kill. A
cgroup holds every process started in it (a child cannot leave without privileges a sandbox
lacks), so `pids.max` and `memory.limit_in_bytes` cap them together (tmpfs pages they write
are charged too) and `kill()` finds every one of them.

The cgroup v1 `pids` and `memory` controllers are used, below this process's own cgroup in
each (so the host's limits still hold). Creating cgroups takes root (or a delegated
hierarchy); where that fails, `SandboxCgroup.create` logs a warning once and returns None: the
sandbox then runs with its rlimits and namespaces only.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import signal
import time
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
CONTROLLERS = ("pids", "memory")
_KILL_PASSES = 500
_names = itertools.count()
_PREFIX = "echo_jax_"
_log = logging.getLogger(__name__)
_warned: list[str] = []


def _own_path(controller: str) -> Path | None:
    """This process's cgroup folder in `controller`'s v1 hierarchy."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, names, path = line.split(":", 2)
            if controller in names.split(","):
                return ROOT / controller / path.lstrip("/")
    return None


def _sweep(parent: Path) -> None:
    """Kill and remove the cgroups of earlier host processes that are gone (killed hosts leave
    theirs behind, and with them anything that outlived its parent-death signal)."""
    for folder in parent.glob(f"{_PREFIX}*"):
        owner = folder.name[len(_PREFIX) :].split("_")[0]
        if owner.isdigit() and not Path(f"/proc/{owner}").exists():
            SandboxCgroup([folder]).kill()


class SandboxCgroup:
    """One sandbox's folders in the pids and memory hierarchies."""

    def __init__(self, folders: list[Path]):
        self.folders = folders

    @classmethod
    def create(cls, what: str, max_processes: int, memory_bytes: int) -> SandboxCgroup | None:
        number = next(_names)
        name = f"{_PREFIX}{os.getpid()}_{number}"
        folders: list[Path] = []
        try:
            for controller in CONTROLLERS:
                parent = _own_path(controller)
                if parent is None or not (parent / "cgroup.procs").exists():
                    raise OSError(f"no cgroup v1 {controller} hierarchy")
                if number == 0:
                    _sweep(parent)
                folder = parent / name
                folder.mkdir()
                folders.append(folder)
            (folders[0] / "pids.max").write_text(str(max_processes))
            (folders[1] / "memory.limit_in_bytes").write_text(str(memory_bytes))
            with contextlib.suppress(OSError):  # Absent without swap accounting.
                (folders[1] / "memory.memsw.limit_in_bytes").write_text(str(memory_bytes))
        except OSError as error:
            for folder in folders:
                with contextlib.suppress(OSError):
                    folder.rmdir()
            if not _warned:
                _warned.append(what)
                _log.warning(
                    "%s runs without a cgroup (no pids or memory cap for the sandbox as a "
                    "whole): %s",
                    what,
                    error,
                )
            return None
        return cls(folders)

    def join_hook(self):
        """A preexec step: the child joins the cgroup before it execs bubblewrap."""
        paths = [str(folder / "cgroup.procs") for folder in self.folders]

        def join() -> None:
            for path in paths:
                fd = os.open(path, os.O_WRONLY)
                try:
                    os.write(fd, str(os.getpid()).encode())
                finally:
                    os.close(fd)

        return join

    def pids(self) -> set[int]:
        found: set[int] = set()
        for folder in self.folders:
            with contextlib.suppress(OSError):
                found |= {int(pid) for pid in (folder / "cgroup.procs").read_text().split()}
        return found

    def kill(self) -> None:
        """SIGKILL every process in the cgroup until none is left, then remove it."""
        for _ in range(_KILL_PASSES):
            left = self.pids()
            if not left:
                break
            for pid in left:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.002)
        for folder in self.folders:
            for _ in range(_KILL_PASSES):  # A killed process leaves its cgroup when reaped.
                try:
                    folder.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.002)
