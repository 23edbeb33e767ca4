"""Run an AWM task verifier out of process, on read-only copies of the initial and final DBs.

Verifier code comes with the world data, so it runs in a fresh `python -I -S` child (see
`verifier_runner`) inside a bubblewrap sandbox (`echo_jax.awm.sandbox`: own user, PID, network,
IPC and mount namespaces; nothing mounted but the interpreter's files and the two database
copies), with a wall-clock timeout, CPU/memory/file-size/process rlimits, a clean environment
and a parent-death kill. Its outcome comes back on a file descriptor of its own, checked here.
It only ever sees snapshot copies of the databases, so it can neither corrupt the live world
nor the pristine initial state.

`warm_verifier` gives the same answers from a long-lived sandboxed worker that forks a child per
verification; the result checks here (`judge`) serve both.

The returned dict has the shape of OpenEnv's AWM `verify_result` (the real capture's last step):
    {"result": "complete" | "others", "execution_status": "success", "raw_result": <returned>}
or, when the verifier failed, {"result": "others", "execution_status": "error" | "timeout",
"error_message": str}. As in OpenEnv, a verifier result other than "complete"/"others" counts as
"others".
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import sqlite3
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from echo_jax.awm import sandbox, seccomp_filter, verifier_runner
from echo_jax.awm.capped_tmpfs import CappedTmpfs
from echo_jax.awm.cgroup import SandboxCgroup
from echo_jax.awm.child_process import (
    ChildLimits,
    kill_process_group,
    limiting_preexec,
    read_tail,
)
from echo_jax.awm.world_server import copy_database

VERIFIER_RESULTS = ("complete", "others")
_TAIL_BYTES = 1 << 20
# The runner caps its result at 1 MiB and reports a larger one as an error.
MAX_RESULT_FILE_BYTES = verifier_runner.MAX_RESULT_BYTES + 4096


@dataclass(frozen=True)
class VerifierLimits(ChildLimits):
    """Per-verification limits; AWM verifiers are a few SQL queries, so these are generous."""

    timeout_s: float = 10.0
    cpu_seconds: int = 10
    address_space_bytes: int = 1 << 30
    file_size_bytes: int = 16 << 20
    open_files: int = 64
    # The sandbox as a whole (`cgroup`): its processes (bwrap's two, the runner and its
    # threads) and their memory, its private /tmp included.
    max_processes: int = 16
    memory_bytes: int = 1 << 30
    # RLIMIT_NPROC=0 is set by the runner itself: bubblewrap has to fork first.


def _read_only_snapshot(source: str | Path, target: Path) -> None:
    """Snapshot a DB (WAL pages included) into a rollback-journal file and make it read-only."""
    copy_database(source, target)
    with contextlib.closing(sqlite3.connect(target)) as connection:
        connection.execute("PRAGMA journal_mode=DELETE")
    target.chmod(0o444)


def _exited_within(process: subprocess.Popen, timeout_s: float) -> bool:
    """Wait for exit on a pidfd: Popen.wait(timeout) sleep-polls, so every verify would wait
    out part of a polling interval (`benchmarks/rollout_throughput.py` reports verify time)."""
    try:
        pidfd = os.pidfd_open(process.pid)
    except (AttributeError, OSError):  # not Linux >= 5.3
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return False
        return True
    try:
        ready, _, _ = select.select([pidfd], [], [], timeout_s)
    finally:
        os.close(pidfd)
    if ready:
        process.wait()
    return bool(ready)


def _failure(status: str, message: str) -> dict[str, Any]:
    return {"result": "others", "execution_status": status, "error_message": message}


def _interpret(outcome: dict[str, Any]) -> dict[str, Any]:
    if outcome["status"] != "success":
        return _failure("error", outcome["error"][:2000])
    raw = outcome["raw_result"]
    if not isinstance(raw, dict) or "result" not in raw:
        return _failure("error", f"Invalid return format: {type(raw).__name__}")
    result = raw["result"] if raw["result"] in VERIFIER_RESULTS else "others"
    return {"result": result, "execution_status": "success", "raw_result": raw}


def _check_result(data: bytes, size: int) -> dict[str, Any] | str:
    """The runner's outcome from the `size` bytes it wrote (`data`: the first of them, at least
    up to the cap), or a message saying what is wrong with it."""
    if size == 0:
        return ""
    if size > MAX_RESULT_FILE_BYTES:
        return (
            f"verifier result is oversized: {size:,} bytes, over the limit of "
            f"{MAX_RESULT_FILE_BYTES:,}"
        )
    text = data.decode("utf-8", errors="replace")
    try:
        outcome, end = json.JSONDecoder().raw_decode(text)
    except (json.JSONDecodeError, RecursionError) as error:
        return f"verifier result is malformed (not JSON: {type(error).__name__}: {error})"[:500]
    if text[end:].strip():
        return "verifier result is malformed: more than one result was written"
    if not isinstance(outcome, dict) or outcome.get("status") not in ("success", "error"):
        return f"verifier result is malformed: expected an outcome object, got {text[:80]!r}"
    if outcome["status"] == "success" and "raw_result" not in outcome:
        return "verifier result is malformed: 'raw_result' missing"
    if outcome["status"] == "error" and not isinstance(outcome.get("error"), str):
        return "verifier result is malformed: 'error' missing or not a string"
    return outcome


def judge(data: bytes, size: int, exit_code: int, stderr_tail: str) -> dict[str, Any]:
    """The verify result from what the runner wrote on its result channel, cold or warm."""
    outcome = _check_result(data, size)
    if isinstance(outcome, dict):
        return _interpret(outcome)
    if outcome:
        return _failure("error", outcome)
    return _failure(
        "error",
        f"verifier process exited with code {exit_code} without a result; "
        f"stderr tail: {stderr_tail[-2000:]}",
    )


def timed_out(limits: VerifierLimits) -> dict[str, Any]:
    return _failure("timeout", f"verifier exceeded {limits.timeout_s:g}s wall-clock")


def read_only_snapshots(
    initial_db_path: str | Path, final_db_path: str | Path, folder: Path
) -> tuple[Path, Path]:
    """initial.db and final.db in `folder`: the copies a verifier sees."""
    initial, final = folder / "initial.db", folder / "final.db"
    _read_only_snapshot(initial_db_path, initial)
    _read_only_snapshot(final_db_path, final)
    return initial, final


def run_verifier(
    code: str,
    initial_db_path: str | Path,
    final_db_path: str | Path,
    final_answer: str | None = None,
    limits: VerifierLimits | None = None,
) -> dict[str, Any]:
    """Run `verify_task_completion` from `code` against copies of the two databases.

    Never raises for anything the verifier does: a missing, malformed, duplicated or oversized
    result is an "error" outcome (a `judge_error` reward). Raises `SandboxUnavailable` when the
    bubblewrap sandbox cannot run and the process-only mode was not chosen. Thread-safe.
    """
    limits = limits or VerifierLimits()
    binary = sandbox.require_sandbox("a verifier")
    with tempfile.TemporaryDirectory(prefix="awm_verify_") as tmp:
        folder = Path(tmp)
        folder.chmod(0o711)  # The runner may drop to its own user id: it must reach the copies.
        initial, final = read_only_snapshots(initial_db_path, final_db_path, folder)
        if binary is None:
            seen_initial, seen_final = str(initial), str(final)
        else:
            seen_initial, seen_final = sandbox.SANDBOX_INITIAL_DB, sandbox.SANDBOX_FINAL_DB
        payload = {
            "code": code,
            "initial_db_path": seen_initial,
            "final_db_path": seen_final,
            "final_answer": final_answer,
        }
        payload_path = folder / "payload.json"
        payload_path.write_text(json.dumps(payload), encoding="utf-8")
        payload_path.chmod(0o600)
        stdout_path, stderr_path, result_path = folder / "stdout", folder / "stderr", folder / "out"
        args_path = folder / "bwrap_args"
        with contextlib.ExitStack() as files:
            stdin = files.enter_context(payload_path.open("rb"))
            stdout = files.enter_context(stdout_path.open("wb"))
            stderr = files.enter_context(stderr_path.open("wb"))
            fd = files.enter_context(result_path.open("wb")).fileno()
            pass_fds = [fd]
            if binary is None:
                argv = [sys.executable, "-I", "-S", verifier_runner.__file__, str(fd)]
            else:
                seccomp_fd = files.enter_context(open(seccomp_filter.bpf_fd(), "rb")).fileno()
                pass_fds.append(seccomp_fd)
                scratch = CappedTmpfs.create("a verifier", sandbox.VERIFIER_TMP_BYTES,
                                         sandbox.VERIFIER_TMP_INODES, parent=folder)  # fmt: skip
                if scratch is not None:  # Unmounted after the cgroup's kill (a callback below).
                    files.callback(scratch.close)
                inner = sandbox.verifier_argv(
                    binary,
                    verifier_runner.__file__,
                    str(initial),
                    str(final),
                    fd,
                    seccomp_fd,
                    scratch,
                )
                # The options go through a file (--args), so the sandbox's PID 1 (bwrap) shows
                # no host path in /proc/1/cmdline.
                split = len(inner) - sandbox.VERIFIER_COMMAND_LENGTH  # options | command
                args_path.write_bytes(b"".join(a.encode() + b"\0" for a in inner[1:split]))
                args_fd = files.enter_context(args_path.open("rb")).fileno()
                pass_fds.append(args_fd)
                argv = [binary, "--args", str(args_fd), *inner[split:]]
            group = SandboxCgroup.create("a verifier", limits.max_processes, limits.memory_bytes)
            files.callback(lambda: group and group.kill())
            process = subprocess.Popen(
                argv,
                cwd=folder,
                env={"PATH": os.defpath, "LANG": "C.UTF-8", "HOME": tmp},
                stdin=stdin,
                stdout=stdout,
                stderr=stderr,
                pass_fds=tuple(pass_fds),
                start_new_session=True,
                preexec_fn=limiting_preexec(limits, group),
            )
            if not _exited_within(process, limits.timeout_s):
                kill_process_group(process, grace_s=0.0)
                return timed_out(limits)
        size = result_path.stat().st_size
        data = result_path.read_bytes() if size <= MAX_RESULT_FILE_BYTES else b""
        return judge(data, size, process.returncode, read_tail(stderr_path, _TAIL_BYTES))
