"""Warm verifier workers: a verification without a cold interpreter start.

A `WarmWorker` is one long-lived `verifier_worker` process inside a verifier's bubblewrap wall
(`sandbox.worker_argv`) that forks a child per verification, which runs the cold runner's own
lock-down (see that module). The host writes each request's two database snapshots into a
folder of its own under a directory the sandbox binds read-only, sends the request on the
worker's stdin and gets the child's raw result bytes back on a pipe; `verifier.judge` checks
them exactly as it checks a cold runner's result file, so the answers are those of
`run_verifier`.

`VerifierPool` keeps one worker per scenario, started on first use: the verifications of one
worker share its sandbox (they can read each other's snapshots, signal the worker), so a worker
serves one world, whose verifiers are one trust domain. Whatever goes wrong with a worker (it
cannot start, dies, breaks its protocol, stops answering), the request reruns on the cold path
with a warning; a scenario whose workers failed `MAX_FAILURES` times stays cold. The
process-only mode (`sandbox.process_only_opted_in`) is always cold: the worker needs the wall.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import logging
import os
import select
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from echo_jax.awm import sandbox, seccomp_filter, verifier_runner, verifier_worker
from echo_jax.awm.capped_tmpfs import CappedTmpfs
from echo_jax.awm.cgroup import SandboxCgroup
from echo_jax.awm.child_process import ChildLimits, kill_process_group, limiting_preexec, read_tail
from echo_jax.awm.verifier import (
    MAX_RESULT_FILE_BYTES,
    VerifierLimits,
    judge,
    read_only_snapshots,
    run_verifier,
    timed_out,
)

log = logging.getLogger(__name__)

MAX_FAILURES = 3
MAX_WORKERS = 8  # Beyond this many, idle workers are closed, least recently used first.
_START_TIMEOUT_S = 60.0
_ANSWER_GRACE_S = 30.0  # Past a request's own timeout, a worker that has not answered is hung.
_CLOSE_GRACE_S = 2.0
_WORKER_LIMITS = ChildLimits(open_files=1024)  # Per request in flight: three pipes and a pidfd.
# The worker's sandbox as a whole (`cgroup`): the worker, the verifications in flight, and what
# they started, with their memory and the shared /tmp.
_WORKER_PROCESSES = 256
_WORKER_MEMORY_BYTES = 4 << 30
_RLIMITS = ("address_space_bytes", "cpu_seconds", "file_size_bytes", "open_files")

# A worker dies with the thread that started it (bwrap's parent-death signal follows the
# thread), so every worker is started from this one thread, which lives as long as the process.
_starter = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="verifier-worker-start")


class WorkerFailed(RuntimeError):
    """The worker could not start or run a request, died, broke its protocol or hung."""


class WorkerClosed(WorkerFailed):
    """The worker was closed (the pool's end, or evicted as idle) before the request reached it."""


class WarmWorker:
    """One sandboxed worker process; `verify` is thread-safe."""

    def __init__(self, binary: str):
        self.folder = Path(tempfile.mkdtemp(prefix="awm_warm_verify_"))
        self.failure: str | None = None
        self.last_used = time.monotonic()
        self._lock = threading.Lock()  # The request counter, the pending answers, failure.
        self._write_lock = threading.Lock()
        self._pending: dict[int, concurrent.futures.Future] = {}
        self._next_id = 1
        self._log_path = self.folder.with_suffix(".log")
        self._process: subprocess.Popen | None = None
        self._answers = -1
        self._reader: threading.Thread | None = None
        self._group = SandboxCgroup.create("a warm verifier worker", _WORKER_PROCESSES,
                                           _WORKER_MEMORY_BYTES)  # fmt: skip
        # Its /tmp, shared by its verifications, capped in bytes and inodes.
        self._tmp = CappedTmpfs.create("a warm verifier worker", sandbox.VERIFIER_TMP_BYTES,
                                       sandbox.VERIFIER_TMP_INODES,
                                       parent=self.folder.parent)  # fmt: skip
        try:
            self._process, self._answers = _starter.submit(self._spawn, binary).result()
            self._await_ready()
        except BaseException:
            self.close()
            raise
        self._reader = threading.Thread(target=self._read_answers, name="verifier-answers",
                                        daemon=True)  # fmt: skip
        self._reader.start()

    def _spawn(self, binary: str) -> tuple[subprocess.Popen, int]:
        with contextlib.ExitStack() as on_failure:
            read_end, write_end = os.pipe()
            on_failure.callback(os.close, read_end)
            on_failure.callback(os.close, write_end)
            seccomp_fd = seccomp_filter.bpf_fd()
            on_failure.callback(os.close, seccomp_fd)
            inner = sandbox.worker_argv(binary, verifier_runner.__file__, verifier_worker.__file__,
                                        str(self.folder), write_end, seccomp_fd,
                                        self._tmp)  # fmt: skip
            # bwrap's options through a file (--args), as for a cold verifier.
            split = len(inner) - sandbox.WORKER_COMMAND_LENGTH
            with tempfile.TemporaryFile() as args, self._log_path.open("wb") as output:
                args.write(b"".join(a.encode() + b"\0" for a in inner[1:split]))
                args.seek(0)
                process = subprocess.Popen(
                    [binary, "--args", str(args.fileno()), *inner[split:]],
                    cwd=self.folder,
                    env={"PATH": os.defpath, "LANG": "C.UTF-8", "HOME": str(self.folder)},
                    stdin=subprocess.PIPE,
                    stdout=output,
                    stderr=output,
                    pass_fds=(write_end, args.fileno(), seccomp_fd),
                    start_new_session=True,
                    preexec_fn=limiting_preexec(_WORKER_LIMITS, self._group),
                )
            on_failure.pop_all()
        os.close(write_end)
        os.close(seccomp_fd)
        return process, read_end

    def _await_ready(self) -> None:
        poll = select.poll()  # Not select(): the host may hold descriptors past FD_SETSIZE.
        poll.register(self._answers, select.POLLIN)
        ready = poll.poll(_START_TIMEOUT_S * 1000)
        try:
            if not ready:
                raise TimeoutError(f"not ready within {_START_TIMEOUT_S:g}s")
            header, _ = verifier_worker.read_frame(self._answers, 0)
        except (EOFError, OSError, ValueError) as error:
            tail = read_tail(self._log_path, 4000)
            raise WorkerFailed(f"verifier worker did not start: {error}; output: {tail}") from None
        if header.get("ready") is not True:
            raise WorkerFailed(f"verifier worker did not start: {header!r}")

    def _read_answers(self) -> None:
        """Hands each answer to its request; at the stream's end or a broken frame, fails all."""
        try:
            while True:
                header, body = verifier_worker.read_frame(self._answers, MAX_RESULT_FILE_BYTES + 1)
                with self._lock:
                    future = self._pending.pop(header.get("id"), None)
                if future is None:
                    raise ValueError(f"an answer to no request in flight: {header.get('id')!r}")
                future.set_result((header, body))
        except Exception as error:  # noqa: BLE001 -- whatever the worker sent, it is done
            tail = read_tail(self._log_path, 2000)
            self._fail(f"verifier worker stopped answering ({error}); output: {tail}")
        finally:
            os.close(self._answers)

    def _fail(self, why: str, closed: bool = False) -> None:
        """Fail every request in flight; the first failure but a close kills the worker."""
        with self._lock:
            first = self.failure is None
            if first:
                self.failure = why
            pending, self._pending = self._pending, {}
        error = WorkerClosed(why) if closed else WorkerFailed(why)
        for future in pending.values():
            with contextlib.suppress(concurrent.futures.InvalidStateError):
                future.set_exception(error)
        if first and not closed and self._process is not None:
            kill_process_group(self._process, grace_s=0.0)
            if self._group is not None:
                self._group.kill()

    def busy(self) -> bool:
        return bool(self._pending)

    def verify(self, code: str, initial_db_path, final_db_path, final_answer, limits) -> dict:
        """The verify result, as `run_verifier` gives it; WorkerFailed: rerun it cold."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self.failure is not None:
                raise (WorkerClosed if self.failure == "closed" else WorkerFailed)(self.failure)
            request_id, self._next_id = self._next_id, self._next_id + 1
            self._pending[request_id] = future
        self.last_used = time.monotonic()
        folder = self.folder / f"r{request_id}"
        try:
            folder.mkdir(mode=0o700)
            read_only_snapshots(initial_db_path, final_db_path, folder)
            request = {"id": request_id, "folder": folder.name, "final_answer": final_answer,
                       "timeout_s": limits.timeout_s,
                       "limits": {name: getattr(limits, name) for name in _RLIMITS
                                  if getattr(limits, name) is not None}}  # fmt: skip
            self._send(verifier_worker.encode_frame(request, code.encode("utf-8")))
            wait_s = limits.timeout_s + _ANSWER_GRACE_S
            try:
                answer, body = future.result(timeout=wait_s)
            except concurrent.futures.TimeoutError:
                self._fail(f"verifier worker did not answer within {wait_s:g}s")
                raise WorkerFailed(self.failure) from None
        finally:
            with self._lock:
                self._pending.pop(request_id, None)
            shutil.rmtree(folder, ignore_errors=True)
        return self._judge(answer, body, limits)

    def _send(self, frame: bytes) -> None:
        try:
            with self._write_lock:
                fd = self._process.stdin.fileno()
                while frame:
                    frame = frame[os.write(fd, frame) :]
        except (OSError, ValueError) as error:  # A dead worker: broken pipe, closed stdin.
            self._fail(f"verifier worker took no request: {error}")
            raise WorkerFailed(self.failure) from None

    def _judge(self, answer: dict, body: bytes, limits: VerifierLimits) -> dict[str, Any]:
        status = answer.get("status")
        if status == "timeout":
            return timed_out(limits)
        if status != "done":
            raise WorkerFailed(f"verifier worker could not run the request: {answer.get('error')}")
        try:
            return judge(body, int(answer["size"]), int(answer["exit"]), str(answer["stderr"]))
        except Exception as error:  # noqa: BLE001 -- the frame is the sandbox's to forge
            self._fail(f"verifier worker sent a malformed answer: {error!r:.500}")
            raise WorkerFailed(self.failure) from None

    def close(self) -> None:
        """Ends the worker (after its requests in flight, for a moment) and removes its files."""
        self._fail("closed", closed=True)
        if self._process is not None:
            with contextlib.suppress(OSError):
                self._process.stdin.close()
            try:
                self._process.wait(_CLOSE_GRACE_S)
            except subprocess.TimeoutExpired:
                kill_process_group(self._process, grace_s=0.0)
        if self._group is not None:
            self._group.kill()
        if self._tmp is not None:
            self._tmp.close()
        if self._reader is None and self._answers >= 0:
            os.close(self._answers)  # Else the reader closes it, at the stream's end.
        shutil.rmtree(self.folder, ignore_errors=True)
        self._log_path.unlink(missing_ok=True)


@dataclass
class _Slot:
    """A scenario's worker, and how often its workers failed."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    worker: WarmWorker | None = None
    failures: int = 0


class VerifierPool:
    """Warm workers by scenario, started on first use; `run` answers as `run_verifier` does."""

    def __init__(self, max_workers: int = MAX_WORKERS):
        self.max_workers = max_workers
        self._lock = threading.Lock()
        self._slots: dict[str, _Slot] = {}
        self._closed = False

    def run(
        self,
        scenario: str,
        code: str,
        initial_db_path: str | Path,
        final_db_path: str | Path,
        final_answer: str | None = None,
        limits: VerifierLimits | None = None,
    ) -> dict[str, Any]:
        """`run_verifier`'s answer, from `scenario`'s warm worker where one can serve it."""
        limits = limits or VerifierLimits()
        worker = self._worker(scenario)
        if worker is not None:
            try:
                return worker.verify(code, initial_db_path, final_db_path, final_answer, limits)
            except WorkerClosed:
                pass  # Evicted between being handed out and the request: no fault of its own.
            except WorkerFailed as error:
                self._failed(scenario, worker, error)
        return run_verifier(code, initial_db_path, final_db_path, final_answer, limits)

    def _worker(self, scenario: str) -> WarmWorker | None:
        if sandbox.process_only_opted_in():
            return None  # run_verifier logs the process-only warning.
        binary = sandbox.require_sandbox("a verifier")  # SandboxUnavailable, as run_verifier.
        with self._lock:
            if self._closed:
                return None
            slot = self._slots.setdefault(scenario, _Slot())
        with slot.lock:
            if slot.worker is not None and slot.worker.failure is None:
                slot.worker.last_used = time.monotonic()
                return slot.worker
            if slot.failures >= MAX_FAILURES:
                return None
            try:
                slot.worker = WarmWorker(binary)
            except Exception as error:  # noqa: BLE001 -- whatever stops it, verify cold
                slot.failures += 1
                log.warning("%s: %s; this verification runs cold", scenario, error)
                return None
            worker = slot.worker
        if self._closed:  # Closed while this one started.
            worker.close()
            return None
        self._evict(keep=scenario)
        return worker

    def _failed(self, scenario: str, worker: WarmWorker, error: WorkerFailed) -> None:
        log.warning("%s: warm verifier failed (%s); the verification reruns cold", scenario, error)
        with self._lock:
            slot = self._slots.get(scenario)
        if slot is not None:
            with slot.lock:
                slot.failures += 1
                if slot.worker is worker:
                    slot.worker = None
        worker.close()

    def _evict(self, keep: str) -> None:
        """Close the least recently used idle workers beyond `max_workers`."""
        with self._lock:
            slots = [(s.worker.last_used, name) for name, s in self._slots.items()
                     if s.worker is not None and name != keep]  # fmt: skip
            excess = len(slots) + 1 - self.max_workers
            victims = [self._slots[name] for _, name in sorted(slots)[: max(excess, 0)]]
        for slot in victims:
            with slot.lock:
                worker = slot.worker
                if worker is None or worker.busy():
                    continue
                slot.worker = None
            worker.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            slots, self._slots = list(self._slots.values()), {}
        for slot in slots:
            with slot.lock:
                worker, slot.worker = slot.worker, None
            if worker is not None:
                worker.close()


_default: VerifierPool | None = None
_default_lock = threading.Lock()


def default_pool() -> VerifierPool:
    """The process's shared pool (the harness's default), closed at exit."""
    global _default
    with _default_lock:
        if _default is None:
            _default = VerifierPool()
            atexit.register(_default.close)
        return _default
