"""Sandbox side of a warm verifier worker: one interpreter, a fork per request.

Started by `warm_verifier` as `python -I -S /sandbox/verifier_worker.py RESPONSE_FD` inside a
verifier's bubblewrap wall (`sandbox.worker_argv`), with the host's request folders read-only at
/sandbox/requests. It imports the runner once, says it is ready, then reads requests (frames:
`encode_frame`) on stdin. Per request it forks a child that starts a session of its own, sets
the request's rlimits, keeps only its result and stderr pipes and runs `verifier_runner.finish`:
the cold runner's own lock-down (RLIMIT_NPROC=0, read-only SQLite, audit hook, restricted
builtins, the privilege drop where it runs as root), run and size-capped encoding, on its
request's two snapshots. So no two verifications share an interpreter.

The worker SIGKILLs a child at its wall-clock limit and reports "timeout", else relays the
child's result bytes (capped), their total size, its exit code and stderr tail; the host checks
them as it checks a cold runner's result file. After each request it kills any process of the
sandbox that is neither bubblewrap, itself nor a child in flight (RLIMIT_NPROC=0 leaves none
where it binds, which is not where the host runs as root) and empties /tmp, the only place a
child can write (the rest of the sandbox is read-only). The wall is bubblewrap's; see
docs/sandbox.md for what verifications of one world can still do to each other.
"""

import contextlib
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
SCRATCH_DIR = "/tmp"
RESULT_FD = 3
# The runner caps its result at 1 MiB and reports a larger one as an error.
MAX_RESULT_BYTES = verifier_runner.MAX_RESULT_BYTES + 4096
MAX_HEADER_BYTES = 1 << 16
MAX_CODE_BYTES = 16 << 20
STDERR_TAIL_BYTES = 8192
_FRAME = struct.Struct(">II")  # header length, body length
_FOLDER = re.compile(r"r[0-9]+")
_TIDY_PASSES = 200
_PR_SET_DUMPABLE = 4
_LIMITS = {
    "address_space_bytes": resource.RLIMIT_AS,
    "cpu_seconds": resource.RLIMIT_CPU,
    "file_size_bytes": resource.RLIMIT_FSIZE,
    "open_files": resource.RLIMIT_NOFILE,
}


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


# --- the verifier's process ------------------------------------------------------------------


def _close_all_but(keep) -> None:
    low = 0
    for fd in sorted(keep):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 1 << 16)


def _child(request: dict, code: str, fds: dict) -> None:
    """The forked child: the request's limits, then the cold runner's steps. Never returns."""
    try:
        os.setsid()  # As a cold verifier (bwrap --new-session): kill(0) reaches itself only.
        for name, value in request["limits"].items():
            resource.setrlimit(_LIMITS[name], (value, value))
    except BaseException as error:  # noqa: BLE001 -- the host reruns the request cold
        os.write(fds["status"], f"setup failed: {type(error).__name__}: {error}".encode()[:4000])
        os._exit(0)
    os.dup2(fds["stderr"], 2)
    os.dup2(os.open("/dev/null", os.O_WRONLY), 1)
    os.dup2(fds["result"], RESULT_FD)
    _close_all_but({1, 2, RESULT_FD})  # Not the worker's requests, responses or other pipes.
    sys.argv[:] = ["/sandbox/verifier_runner.py", str(RESULT_FD)]  # As in the cold runner.
    folder = f"{REQUESTS_DIR}/{request['folder']}"
    payload = {
        "code": code,
        "initial_db_path": f"{folder}/initial.db",
        "final_db_path": f"{folder}/final.db",
        "final_answer": request.get("final_answer"),
    }
    verifier_runner.finish(payload, RESULT_FD)


# --- the worker's loop -----------------------------------------------------------------------


class _Job:
    """One verification in flight: its child, its deadline and the pipes read from it."""

    def __init__(self, request: dict, pid: int, pipes: dict):
        self.id, self.pid, self.pipes = request["id"], pid, pipes
        self.pidfd = os.pidfd_open(pid)
        self.deadline = time.monotonic() + float(request["timeout_s"])
        self.timed_out = False
        self.size = 0  # Bytes written to the result pipe; the first MAX_RESULT_BYTES + 1 kept.
        self.data = {name: bytearray() for name in pipes}

    def kill(self) -> None:
        """Past its deadline: SIGKILL (any process it started goes in `_tidy`)."""
        self.timed_out = True
        signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)

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

    def reap(self) -> None:
        """Once the child has exited."""
        _, self.status = os.waitpid(self.pid, 0)
        os.close(self.pidfd)

    def finish(self) -> tuple[dict, bytes]:
        """The response, once the child is reaped and nothing it started lives on."""
        for name, fd in self.pipes.items():
            while self.read(name):
                pass
            os.close(fd)
        header = {"id": self.id, "size": self.size}
        header["stderr"] = self.data["stderr"].decode("utf-8", "replace")
        failed = self.data["status"].decode("utf-8", "replace")
        if failed:
            header |= {"status": "unavailable", "error": failed}
        elif self.timed_out:
            header["status"] = "timeout"
        else:
            exit_code = os.waitstatus_to_exitcode(self.status)
            exit_code = exit_code if exit_code >= 0 else 128 - exit_code  # Killed: 128 + signal.
            header |= {"status": "done", "exit": exit_code}
        return header, bytes(self.data["result"]) if header["status"] == "done" else b""


def _start(request: dict, code: str) -> _Job:
    ends = {name: os.pipe() for name in ("result", "stderr", "status")}
    for stream in (sys.stdout, sys.stderr):
        stream.flush()  # Nothing the worker buffered is written again by a child.
    pid = os.fork()
    if pid == 0:
        try:
            _child(request, code, {n: w for n, (_, w) in ends.items()})
        finally:
            os._exit(70)
    for read_end, write_end in ends.values():
        os.close(write_end)
        os.set_blocking(read_end, False)
    return _Job(request, pid, {name: r for name, (r, _) in ends.items()})


def _alive(pid: str) -> bool:
    """Whether any thread of `pid` runs: a zombie leader may hide live threads behind it."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/stat", "rb") as stat:
                if stat.read().rsplit(b")", 1)[1].split()[0] != b"Z":
                    return True
        except (OSError, IndexError):
            continue
    return False


def _strays(keep: set) -> list[int]:
    """The live processes of the sandbox not in `keep` (zombies are bubblewrap's to reap)."""
    return [
        int(entry)
        for entry in os.listdir("/proc")
        if entry.isdigit() and int(entry) not in keep and _alive(entry)
    ]


def _tidy(jobs) -> None:
    """Housekeeping after a request: no process of the sandbox but bubblewrap (PID 1), this
    worker and the children in flight (a child whose RLIMIT_NPROC=0 does not bind, as where
    the host runs as root, may have started some); nothing left in the scratch folder."""
    keep = {1, os.getpid(), *(job.pid for job in jobs)}
    for _ in range(_TIDY_PASSES):
        strays = _strays(keep)
        if not strays:
            break
        for pid in strays:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.005)
    else:  # Ending the worker ends its sandbox, and the host reruns what was in flight cold.
        raise RuntimeError(f"processes left by a verifier outlive SIGKILL: {strays[:10]}")
    for folder, dirs, _ in os.walk(SCRATCH_DIR):  # A folder a child made unreadable, opened.
        for name in dirs:
            with contextlib.suppress(OSError):
                os.chmod(os.path.join(folder, name), 0o700, follow_symlinks=False)
    try:
        for folder, dirs, files in os.walk(SCRATCH_DIR, topdown=False):
            for name in dirs + files:
                path = os.path.join(folder, name)
                try:
                    if os.path.isdir(path) and not os.path.islink(path):
                        os.rmdir(path)
                    else:
                        os.unlink(path)
                except OSError:
                    pass
    except (OSError, RecursionError):
        pass


def _send(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data) :]


def _undumpable() -> None:
    """No process of the worker's user id may open its /proc/<pid>/mem or /proc/<pid>/fd (a
    verification's child shares that id): it would write the worker's memory or inject a
    request on its stdin. Children inherit this (they fork, never exec)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    failed = libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0
    errno = ctypes.get_errno()
    del libc, ctypes
    for name in [name for name in sys.modules if name.split(".")[0] in ("ctypes", "_ctypes")]:
        del sys.modules[name]  # A child's `import ctypes` must reach its audit hook afresh.
    if failed:
        raise OSError(errno, "prctl(PR_SET_DUMPABLE, 0) failed")


def serve(response_fd: int) -> None:
    """Answer requests until stdin ends and every job in flight is done."""
    _undumpable()
    verifier_runner.preload()
    _send(response_fd, encode_frame({"ready": True}))
    jobs: dict[int, _Job] = {}  # pidfd -> its job
    watched: dict[int, tuple[_Job, str]] = {}  # pipe -> its job, and which of the job's pipes
    reading = True
    while reading or jobs:
        now = time.monotonic()
        for job in jobs.values():
            if not job.timed_out and job.deadline <= now:
                job.kill()
        deadlines = [job.deadline - now for job in jobs.values() if not job.timed_out]
        wait = max(min(deadlines), 0.0) if deadlines else None
        ready, _, _ = select.select([0] * reading + list(jobs) + list(watched), [], [], wait)
        # Requests last: a new job's descriptors may reuse the numbers of ones closed here.
        for fd in sorted(ready, key=lambda fd: fd == 0):
            if fd == 0:
                try:
                    header, body = read_frame(0, MAX_CODE_BYTES)
                except EOFError:
                    reading = False
                    continue
                if not _FOLDER.fullmatch(str(header.get("folder"))):
                    raise ValueError(f"bad request folder {header.get('folder')!r}")
                job = _start(header, body.decode("utf-8"))
                del header, body  # Later children need not start with this request in memory.
                jobs[job.pidfd] = job
                watched |= {pipe: (job, name) for name, pipe in job.pipes.items()}
            elif fd in watched:
                job, name = watched[fd]
                if job.read(name) is False:
                    del watched[fd]  # At its end, select would report it ready forever.
            elif fd in jobs:
                job = jobs.pop(fd)
                for pipe in job.pipes.values():
                    watched.pop(pipe, None)
                job.reap()
                _tidy(jobs.values())
                _send(response_fd, encode_frame(*job.finish()))


def main() -> None:
    try:
        serve(int(sys.argv[1]))
    except BaseException as error:  # noqa: BLE001 -- the host sees the worker go, and why
        print(f"verifier worker failed: {type(error).__name__}: {error}", file=sys.stderr)
        os._exit(1)
    os._exit(0)


if __name__ == "__main__":
    main()
