"""A sandbox's writable tmpfs capped in bytes and in inodes, mounted by the host and bound in.

bwrap's `--size` caps a tmpfs's bytes but it has no option for `nr_inodes` (bubblewrap 0.11),
so files without content would be bounded only by the memory cgroup. Where the host may mount
(root), it mounts a tmpfs with `size=` and `nr_inodes=` in the run's own folder, the sandbox
gets it by `--bind`, and the host unmounts it when the sandbox has ended. Where it may not,
`CappedTmpfs.create` logs a warning once and returns None: the caller then asks bwrap for a
tmpfs of a capped size only (`--size N --tmpfs PATH`).

A host killed before it unmounts leaves its mounts behind; the next host's first mount detaches
those whose owner process is gone (the mount's source names its pid).
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import logging
import os
from pathlib import Path

_PREFIX = "echo_jax_tmpfs_"
_MNT_DETACH = 2
_MS_NOSUID, _MS_NODEV = 2, 4
_names = itertools.count()
_libc = ctypes.CDLL(None, use_errno=True)
_log = logging.getLogger(__name__)
_warned: list[str] = []


def _mounts() -> list[tuple[str, str]]:
    """(mount point, source) of every mount in this namespace (mountinfo's escapes undone)."""
    found = []
    with contextlib.suppress(OSError), open("/proc/self/mountinfo", encoding="utf-8") as table:
        for line in table:
            fields, _, rest = line.partition(" - ")
            point, source = fields.split(" ")[4], rest.split(" ")[1]
            found.append((point.encode().decode("unicode_escape"), source))
    return found


def owned_mounts(owner: int | None = None) -> list[str]:
    """The mount points of capped tmpfs mounts of host process `owner`, or of any host process
    here (what a test counts)."""
    ours = [(point, source) for point, source in _mounts() if source.startswith(_PREFIX)]
    return [point for point, source in ours if owner is None or source == f"{_PREFIX}{owner}"]


def _umount(path: str) -> bool:
    return _libc.umount2(os.fsencode(path), _MNT_DETACH) == 0


def sweep() -> None:
    """Detach the capped tmpfs mounts of host processes that are gone (a killed host leaves
    them), and remove the folders they made for them."""
    for point, source in _mounts():
        owner = source[len(_PREFIX) :] if source.startswith(_PREFIX) else ""
        if owner.isdigit() and not Path(f"/proc/{owner}").exists():
            _umount(point)
            if os.path.basename(point).startswith(_PREFIX):
                with contextlib.suppress(OSError):
                    os.rmdir(point)


class CappedTmpfs:
    """One mounted tmpfs; `path` is where the host sees it (bind it into the sandbox)."""

    def __init__(self, path: Path, made: bool):
        self.path = path
        self._made = made

    @classmethod
    def create(
        cls, what: str, size_bytes: int, inodes: int, parent: Path | None = None,
        at: Path | None = None,
    ) -> CappedTmpfs | None:  # fmt: skip
        """A tmpfs of `size_bytes` and `inodes` at `at` (an empty folder the caller owns), or at
        a new folder in `parent`; None, with a warning once, where mounting is refused."""
        number = next(_names)
        if number == 0:
            sweep()
        made = at is None
        path = Path(at) if at is not None else Path(parent) / f"{_PREFIX}{os.getpid()}_{number}"
        if made:
            path.mkdir(mode=0o700)
        options = f"size={size_bytes},nr_inodes={inodes},mode=1777".encode()
        flags = _MS_NOSUID | _MS_NODEV
        source = f"{_PREFIX}{os.getpid()}".encode()
        if _libc.mount(source, os.fsencode(path), b"tmpfs", flags, options) != 0:
            error = OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
            if made:
                path.rmdir()
            if not _warned:
                _warned.append(what)
                _log.warning(
                    "%s gets a tmpfs capped in size only, not in inodes (mounting one with "
                    "nr_inodes takes root): %s",
                    what,
                    error,
                )
            return None
        return cls(path, made)

    def close(self) -> None:
        """Unmount (detached: nothing of the sandbox may hold it by then) and remove the folder
        the host made; safe to call twice."""
        if self.path is None:
            return
        _umount(str(self.path))
        if self._made:
            with contextlib.suppress(OSError):
                self.path.rmdir()
        self.path = None


def bwrap_args(tmpfs: CappedTmpfs | None, size_bytes: int, target: str) -> list[str]:
    """bwrap options giving the sandbox `tmpfs` at `target`, or bwrap's own tmpfs of a capped
    size where there is none."""
    if tmpfs is None:
        return ["--size", str(size_bytes), "--tmpfs", target]
    return ["--bind", str(tmpfs.path), target]
