"""Sandbox side of a warm verifier worker: one interpreter, a freshly walled child per request.

Started by `warm_verifier` as `python -I -S /sandbox/verifier_worker.py RESPONSE_FD TMP_BYTES`
inside the verifier's bubblewrap wall (`sandbox.worker_argv`), with the host's request folders
read-only at /sandbox/requests. It imports the runner once, checks that it can wall a child in,
says so, then reads requests (frames: `encode_frame`) on stdin. Per request it forks:

- a supervisor (trusted code; no verifier code ever runs in it) that enters new user, mount,
  PID, network, IPC and UTS namespaces and forks
- the verifier's process: PID 1 of its own PID namespace, in a session of its own, which binds
  its request's folder at /db (read-only), covers /sandbox/requests, /proc and /dev/pts with
  empty read-only tmpfs and /tmp and /dev/shm with private ones, joins a session keyring of its
  own, drops every capability, sets the request's rlimits and then runs
  `verifier_runner.finish`: the cold runner's own lock-down, run and size-capped encoding.

The supervisor SIGKILLs the verifier's process at the wall-clock limit (through a pidfd; as
PID 1 of its namespace nothing it left survives it) and reports "timeout", else its exit code.
The worker relays the result bytes (capped), their total size, the exit code and the stderr
tail; the host checks them as it checks a cold runner's result file.

Why this keeps the wall (docs/sandbox.md): a verification shares no interpreter, no writable
file or folder, no /proc, PID, network or IPC namespace, session or keyring with another one or
with the worker; it cannot name the worker's process, nor open another request's files. It does
start as a copy of the worker's memory (fork), which holds the runner and the requests of the
same world in flight: one worker per world, whose verifiers are one trust domain.
"""

import ctypes
import json
import os
import re
import resource
import select
import signal
import struct
import sys
import time

try:
    from echo_jax.awm import verifier_runner
except ImportError:  # In the sandbox: the runner is bound next to this file, on no package path.
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import verifier_runner

REQUESTS_DIR = "/sandbox/requests"
DB_DIR = "/db"
RESULT_FD = 3
# The runner caps its result at 1 MiB and reports a larger one as an error.
MAX_RESULT_BYTES = verifier_runner.MAX_RESULT_BYTES + 4096
MAX_HEADER_BYTES = 1 << 16
MAX_CODE_BYTES = 16 << 20
STDERR_TAIL_BYTES = 8192
_FRAME = struct.Struct(">II")  # header length, body length
_FOLDER = re.compile(r"r[0-9]+")
_LIMITS = {
    "address_space_bytes": resource.RLIMIT_AS,
    "cpu_seconds": resource.RLIMIT_CPU,
    "file_size_bytes": resource.RLIMIT_FSIZE,
    "open_files": resource.RLIMIT_NOFILE,
}
_CLONE_NEW = 0x10000000 | 0x00020000 | 0x20000000 | 0x40000000 | 0x08000000 | 0x04000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_BIND, _MS_REC, _MS_PRIVATE = 4096, 16384, 1 << 18
_PR_SET_PDEATHSIG = 1
_CAPABILITY_VERSION_3 = 0x20080522
_SYS_KEYCTL = {"x86_64": 250, "aarch64": 219}.get(os.uname().machine)
_KEYCTL_JOIN_SESSION_KEYRING = 1
_libc = ctypes.CDLL(None, use_errno=True)


# --- frames: 8 bytes of lengths, a JSON header, raw bytes ------------------------------------


def encode_frame(header: dict, body: bytes = b"") -> bytes:
    head = json.dumps(header).encode("utf-8")
    return _FRAME.pack(len(head), len(body)) + head + body


def _read_exact(fd: int, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise EOFError(f"end of stream with {left} of {size} bytes unread")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_frame(fd: int, max_body: int) -> tuple[dict, bytes]:
    """One frame; ValueError when it breaks the size caps or is no JSON object."""
    head_size, body_size = _FRAME.unpack(_read_exact(fd, _FRAME.size))
    if head_size > MAX_HEADER_BYTES or body_size > max_body:
        raise ValueError(f"frame of {head_size:,} + {body_size:,} bytes is over the caps")
    header = json.loads(_read_exact(fd, head_size).decode("utf-8"))
    if not isinstance(header, dict):
        raise ValueError("frame header is no JSON object")
    return header, _read_exact(fd, body_size)


# --- the two forked processes ----------------------------------------------------------------


def _check(returned: int, what: str) -> None:
    if returned != 0:
        number = ctypes.get_errno()
        raise OSError(number, f"{what}: {os.strerror(number)}")


def _write_file(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _die_with_parent() -> None:
    _check(_libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl")


def _mount(source, target: str, kind, flags: int, options=None) -> None:
    encoded = [None if x is None else x.encode() for x in (source, target, kind, options)]
    _check(_libc.mount(encoded[0], encoded[1], encoded[2], ctypes.c_ulong(flags), encoded[3]),
           f"mount {target}")  # fmt: skip


def _enter_namespaces() -> None:
    """New namespaces for the supervisor's next child, this process's one user id mapped."""
    uid, gid = os.getuid(), os.getgid()
    _check(_libc.unshare(_CLONE_NEW), "unshare")
    _write_file("/proc/self/setgroups", "deny")
    _write_file("/proc/self/uid_map", f"{uid} {uid} 1")
    _write_file("/proc/self/gid_map", f"{gid} {gid} 1")


def _wall_in(folder: str, tmp_bytes: int) -> None:
    """The verifier's own view: its databases at /db, nothing of other requests, no /proc, no
    ptys, a private /tmp and /dev/shm; then no capability left (its user namespace's)."""
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)
    # Read-only, and locked so, like every mount the worker's sandbox made.
    _mount(f"{REQUESTS_DIR}/{folder}", DB_DIR, None, _MS_BIND)
    hidden = _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC
    _mount("tmpfs", REQUESTS_DIR, "tmpfs", hidden, "size=4k,mode=0")
    _mount("tmpfs", "/proc", "tmpfs", hidden, "size=4k,mode=0555")
    _mount("tmpfs", "/dev/pts", "tmpfs", hidden, "size=4k,mode=0555")  # No shared ptys.
    for scratch in ("/tmp", "/dev/shm"):  # Private; the worker's /dev is read-only.
        _mount("tmpfs", scratch, "tmpfs", _MS_NOSUID | _MS_NODEV, f"size={tmp_bytes},mode=0755")
    os.chdir("/tmp")
    if _SYS_KEYCTL is not None:  # A session keyring of its own, not the host's (none: refused).
        _libc.syscall(_SYS_KEYCTL, _KEYCTL_JOIN_SESSION_KEYRING, None)
    header = (ctypes.c_uint32 * 2)(_CAPABILITY_VERSION_3, 0)
    _check(_libc.capset(header, (ctypes.c_uint32 * 6)()), "capset")


def _report(status_fd: int, line: str) -> None:
    os.write(status_fd, (line + "\n").encode()[:4000])


def _close_all_but(keep) -> None:
    low = 0
    for fd in sorted(keep):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 1 << 16)


def _verifier_process(request: dict, code: str, tmp_bytes: int, fds: dict) -> None:
    """PID 1 of the new namespaces: wall itself in, then run the verifier as the cold runner
    does. Never returns."""
    try:
        # A session (and process group) of its own: kill(0) reaches the caller's group across
        # PID namespaces, and its parent's group holds the worker.
        os.setsid()
        _die_with_parent()
        _wall_in(request["folder"], tmp_bytes)
        for name, value in request["limits"].items():
            resource.setrlimit(_LIMITS[name], (value, value))
    except BaseException as error:  # noqa: BLE001 -- the host reruns the request cold
        _report(fds["status"], f"setup failed: {type(error).__name__}: {error}")
        os._exit(0)
    os.close(fds["status"])
    os.dup2(fds["stderr"], 2)
    os.dup2(os.open("/dev/null", os.O_WRONLY), 1)
    os.dup2(fds["result"], RESULT_FD)
    _close_all_but({1, 2, RESULT_FD})
    # As in the cold runner: argv[1] names the result descriptor, and ctypes (which the worker
    # uses) is imported afresh, so that the audit hook sees a verifier's import of it.
    sys.argv[:] = ["/sandbox/verifier_runner.py", str(RESULT_FD)]
    for name in [n for n in sys.modules if n.split(".")[0] in ("ctypes", "_ctypes")]:
        del sys.modules[name]
    payload = {
        "code": code,
        "initial_db_path": f"{DB_DIR}/initial.db",
        "final_db_path": f"{DB_DIR}/final.db",
        "final_answer": request.get("final_answer"),
    }
    verifier_runner.finish(payload, RESULT_FD)


def _supervise(request: dict, code: str, tmp_bytes: int, fds: dict) -> None:
    """The verifier process's parent: namespaces, the wall-clock limit, the exit status."""
    started = time.monotonic()
    _die_with_parent()
    _close_all_but({1, 2, *fds.values()})  # Not the worker's requests, responses, other pipes.
    try:
        _enter_namespaces()
        pid = os.fork()
    except OSError as error:
        _report(fds["status"], f"setup failed: {error}")
        os._exit(0)
    if pid == 0:
        _verifier_process(request, code, tmp_bytes, fds)
    os.close(fds["result"])
    os.close(fds["stderr"])
    pidfd = os.pidfd_open(pid)
    left = request["timeout_s"] - (time.monotonic() - started)
    ended, _, _ = select.select([pidfd], [], [], max(left, 0.0))
    if not ended:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    exit_code = os.waitstatus_to_exitcode(status)
    exit_code = exit_code if exit_code >= 0 else 128 - exit_code  # Killed: 128 + signal.
    _report(fds["status"], f"exit {exit_code}" if ended else "timeout")
    os._exit(0)


# --- the worker's loop -----------------------------------------------------------------------


class _Job:
    """One verification in flight: its supervisor and the three pipes read from it."""

    def __init__(self, request_id, pid: int, pipes: dict):
        self.id, self.pid, self.pipes = request_id, pid, pipes
        self.pidfd = os.pidfd_open(pid)
        self.size = 0  # Bytes written to the result pipe; the first MAX_RESULT_BYTES + 1 kept.
        self.data = {name: bytearray() for name in pipes}

    def read(self, name: str) -> bool | None:
        """Take what the pipe holds now: False at its end, None when it is empty for now."""
        try:
            chunk = os.read(self.pipes[name], 1 << 16)
        except BlockingIOError:
            return None
        kept = self.data[name]
        if name == "result":
            self.size += len(chunk)
            kept += chunk[: max(0, MAX_RESULT_BYTES + 1 - len(kept))]
        else:
            kept += chunk
            del kept[:-STDERR_TAIL_BYTES]
        return bool(chunk)

    def finish(self) -> tuple[dict, bytes]:
        """The response, once the supervisor has exited (and with it every writer)."""
        os.waitpid(self.pid, 0)
        os.close(self.pidfd)
        for name, fd in self.pipes.items():
            while self.read(name):
                pass
            os.close(fd)
        lines = self.data["status"].decode("utf-8", "replace").splitlines()
        stderr = self.data["stderr"].decode("utf-8", "replace")
        header = {"id": self.id, "size": self.size, "stderr": stderr}
        failed = [line for line in lines if line.startswith("setup failed")]
        if failed or not lines:
            header |= {"status": "unavailable", "error": (failed or ["supervisor died"])[0]}
        elif lines[-1] == "timeout":
            header["status"] = "timeout"
        else:
            header |= {"status": "done", "exit": int(lines[-1].split()[1])}
        return header, bytes(self.data["result"]) if header["status"] == "done" else b""


def _start(request: dict, code: str, tmp_bytes: int) -> _Job:
    ends = {name: os.pipe() for name in ("result", "stderr", "status")}
    for stream in (sys.stdout, sys.stderr):
        stream.flush()  # Nothing the worker buffered is written again by a child.
    pid = os.fork()
    if pid == 0:
        try:
            _supervise(request, code, tmp_bytes, {n: w for n, (_, w) in ends.items()})
        finally:
            os._exit(70)
    for read_end, write_end in ends.values():
        os.close(write_end)
        os.set_blocking(read_end, False)
    return _Job(request["id"], pid, {name: r for name, (r, _) in ends.items()})


def _self_test(tmp_bytes: int) -> str | None:
    """None when a child can be walled in here (nested user namespaces, mounts), else why not."""
    request = {"id": 0, "folder": ".", "limits": {}, "timeout_s": 30.0}
    job = _start(request, "", tmp_bytes)
    select.select([job.pidfd], [], [], 60.0)
    header, _ = job.finish()
    return None if header["status"] == "done" else header.get("error", header["status"])


def _send(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data) :]


def serve(response_fd: int, tmp_bytes: int) -> None:
    """Answer requests until stdin ends and every job in flight is done."""
    verifier_runner.preload()
    why_not = _self_test(tmp_bytes)
    _send(response_fd, encode_frame({"ready": why_not is None, "error": why_not}))
    if why_not is not None:
        return
    watched: dict[int, tuple[_Job, str]] = {}  # fd -> its job, and which of the job's fds
    reading = True
    while reading or watched:
        ready, _, _ = select.select([0] * reading + list(watched), [], [])
        for fd in ready:
            if fd == 0:
                try:
                    header, body = read_frame(0, MAX_CODE_BYTES)
                except EOFError:
                    reading = False
                    continue
                if not _FOLDER.fullmatch(str(header.get("folder"))):
                    raise ValueError(f"bad request folder {header.get('folder')!r}")
                job = _start(header, body.decode("utf-8"), tmp_bytes)
                del header, body  # Later children need not start with this request in memory.
                watched[job.pidfd] = (job, "exited")
                watched |= {pipe: (job, name) for name, pipe in job.pipes.items()}
            elif fd in watched:
                job, name = watched[fd]
                if name != "exited":
                    if job.read(name) is False:
                        del watched[fd]  # At its end, select would report it ready forever.
                    continue
                for pipe in [job.pidfd, *job.pipes.values()]:
                    watched.pop(pipe, None)
                _send(response_fd, encode_frame(*job.finish()))


def main() -> None:
    try:
        serve(int(sys.argv[1]), int(sys.argv[2]))
    except BaseException as error:  # noqa: BLE001 -- the host sees the worker go, and why
        print(f"verifier worker failed: {type(error).__name__}: {error}", file=sys.stderr)
        os._exit(1)
    os._exit(0)


if __name__ == "__main__":
    main()
