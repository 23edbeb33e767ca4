"""Child-process side of `verifier.run_verifier`: run one verifier's code and print its result.

(A warm worker's children, `verifier_worker`, run the same steps from `finish` on.)

Started as `python -I -S verifier_runner.py RESULT_FD` (no site-packages, no paths taken from
the environment), normally inside the bubblewrap sandbox of `echo_jax.awm.sandbox` (the wall:
namespaces, only the two databases and the interpreter's files mounted). The parent has already
applied resource limits (CPU, address space, file size, open files) and a clean environment; the
payload comes on stdin and the outcome is written once, as one JSON document, to RESULT_FD.
Everything below is defence in depth inside that wall. Before the verifier's code runs, this
process locks itself down, in this order:

1. reads the payload and imports everything a verifier may use (later imports are refused);
2. caps what the verifier can print (its output never hides the result line);
3. when running as root, switches to an unprivileged user id of its own (1,000,000 + pid), so the
   file permissions hold again (the 0444 database copies become read-only, root-only files
   unreadable) and RLIMIT_NPROC=0 is enforced (root ignores it); then re-arms the parent-death
   signal, which a change of user id clears;
4. makes `sqlite3.connect` open only the two database copies, read-only (`mode=ro`), with
   ATTACH (and so VACUUM INTO, which attaches its target) disabled;
5. installs an audit hook (`sys.addaudithook`, which cannot be removed) that refuses, however
   they are reached (a module attribute, `object.__subclasses__()`, a function's `__globals__`):
   process creation (fork, exec, spawn, system, Popen), `open` of any file except reading the
   standard library (lazy imports), directory listings outside it, imports outside the
   allow-list, ctypes, sockets, file-system changes, any other SQLite database, and loading
   SQLite extensions.

It then executes the verifier with restricted builtins and an import allow-list, calls
`verify_task_completion`, writes the outcome to RESULT_FD and exits at once (no finaliser runs
after it). The parent checks what it reads (one JSON document of the right shape, size-capped).

What the hook alone does not cover (see docs/sandbox.md): a verifier can undo the SQLite connection
settings of step 4 on its own connection (set_authorizer / setlimit) and then write new SQLite
files where its user id may (world-writable folders such as /tmp; 16 MB each, RLIMIT_FSIZE); it
can burn its CPU and memory allowance; it can read world-readable files through SQLite (an
ATTACH, once re-enabled, of another SQLite database); and it decides its own verdict, as every
verifier does. In the process-only mode (no bubblewrap) nothing but this hook stands between
it and the files its user id can reach.
"""

import builtins
import collections  # noqa: F401 -- imported before lock-down, so a verifier's import is cached
import contextlib
import datetime  # noqa: F401
import json
import math  # noqa: F401
import os
import re  # noqa: F401
import resource
import sqlite3
import sys

ALLOWED_MODULES = frozenset({"sqlite3", "json", "math", "re", "datetime", "collections"})
_DENIED_BUILTINS = frozenset(
    {
        "open",
        "exec",
        "eval",
        "compile",
        "input",
        "breakpoint",
        "exit",
        "quit",
        "help",
        "copyright",
        "credits",
        "license",
        "__loader__",
        "__spec__",
    }
)
VERIFY_FUNCTION = "verify_task_completion"
SANDBOX_UID_BASE = 1_000_000
MAX_PRINTED_CHARS = 64 * 1024
MAX_RESULT_BYTES = 1 << 20
_PR_SET_PDEATHSIG = 1
_SIGKILL = 9

# Audit events refused outright, and refused by prefix.
_DENIED_EVENTS = frozenset(
    {
        "os.system",
        "os.exec",
        "os.posix_spawn",
        "os.spawn",
        "os.fork",
        "os.forkpty",
        "os.startfile",
        "pty.spawn",
        "subprocess.Popen",
        "os.kill",
        "os.killpg",
        "os.remove",
        "os.rename",
        "os.rmdir",
        "os.mkdir",
        "os.chmod",
        "os.chown",
        "os.chflags",
        "os.link",
        "os.symlink",
        "os.truncate",
        "os.utime",
        "os.putenv",
        "os.unsetenv",
        "os.setxattr",
        "os.removexattr",
        "os.mkfifo",
        "os.mknod",
        "sqlite3.enable_load_extension",
        "sqlite3.load_extension",
        "sys.addaudithook",
        "resource.setrlimit",
        "resource.prlimit",
        "fcntl.ioctl",
        "mmap.__new__",
        "webbrowser.open",
        "urllib.Request",
        "ftplib.connect",
        "http.client.connect",
        "smtplib.connect",
    }
)
_DENIED_PREFIXES = ("ctypes.", "socket.", "shutil.", "winreg.", "_winapi.")
# Lazy imports that the allowed modules make (datetime.strptime, codecs by name).
_EXTRA_IMPORTS = frozenset({"encodings", "_strptime", "locale", "_locale", "calendar"})


class SandboxViolation(PermissionError):
    """Raised by the audit hook: the verifier tried something the sandbox refuses."""


def _guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
    if level != 0 or name.split(".")[0] not in ALLOWED_MODULES:
        raise ImportError(f"import of '{name}' is not allowed in verifier code")
    return builtins.__import__(name, globals, locals, fromlist, level)


def _restricted_builtins() -> dict:
    allowed = {k: v for k, v in vars(builtins).items() if k not in _DENIED_BUILTINS}
    allowed["__import__"] = _guarded_import
    return allowed


def _read_only_uri(path: str) -> str:
    quoted = path.replace("%", "%25").replace("?", "%3f").replace("#", "%23")
    return f"file:{quoted}?mode=ro"


def _install_read_only_sqlite(paths: list[str]) -> frozenset:
    """sqlite3.connect opens only `paths`, read-only and unable to attach; returns the URIs."""
    uris = {path: _read_only_uri(path) for path in paths}
    real_connect = sqlite3.connect

    def connect(database, *args, **kwargs):
        uri = uris.get(str(database), str(database) if str(database) in uris.values() else None)
        if uri is None:
            raise SandboxViolation(
                f"blocked by the verifier sandbox: sqlite3.connect({str(database)!r}); only "
                "initial_db_path and final_db_path can be opened"
            )
        kwargs["uri"] = True
        connection = real_connect(uri, *args, **kwargs)
        connection.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)  # No ATTACH, no VACUUM INTO.
        return connection

    sqlite3.connect = connect
    sqlite3.dbapi2.connect = connect
    return frozenset(uris.values())


def _drop_privileges() -> str:
    """As root: become a user id of our own and re-arm the parent-death signal."""
    if os.geteuid() != 0:
        return "unprivileged"
    parent = os.getppid()
    uid = SANDBOX_UID_BASE + os.getpid()
    try:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    except OSError:  # e.g. a container without CAP_SETUID: the audit hook still applies.
        return "root"
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, _SIGKILL)
    except (ImportError, OSError, AttributeError):
        pass
    if os.getppid() != parent:  # The parent died before the signal was re-armed.
        os._exit(1)
    return f"uid {uid}"


def _make_audit_hook(allowed_db_uris: frozenset):
    stdlib = os.path.dirname(os.__file__) + os.sep
    allowed_imports = ALLOWED_MODULES | _EXTRA_IMPORTS

    def deny(event: str, detail: str = ""):
        raise SandboxViolation(f"blocked by the verifier sandbox: {event}{detail}")

    def in_stdlib(path) -> bool:
        if not isinstance(path, str | bytes):
            return False
        text = path.decode("utf-8", "replace") if isinstance(path, bytes) else path
        return os.path.normpath(text).startswith(stdlib)

    def hook(event: str, args: tuple) -> None:
        if event in _DENIED_EVENTS or event.startswith(_DENIED_PREFIXES):
            deny(event)
        elif event == "open":
            path, mode, flags = args
            read_only = (
                mode is None or ("r" in str(mode) and "+" not in str(mode))
            ) and flags & os.O_ACCMODE == os.O_RDONLY
            if not (read_only and in_stdlib(path)):
                deny("open", f"({path!r}, {mode!r})")
        elif event in ("os.listdir", "os.scandir"):
            if not in_stdlib(args[0]):
                deny(event, f"({args[0]!r})")
        elif event == "import":
            if args[0].split(".")[0] not in allowed_imports:
                deny("import", f" of {args[0]!r}")
        elif event == "sqlite3.connect" and str(args[0]) not in allowed_db_uris:
            deny("sqlite3.connect", f"({str(args[0])!r})")

    return hook


class _CappedOutput:
    """Stands in for stdout/stderr: passes the first MAX_PRINTED_CHARS through, drops the rest."""

    def __init__(self, target):
        self._target = target
        self._left = MAX_PRINTED_CHARS

    def write(self, text: str) -> int:
        if self._left > 0:
            self._target.write(text[: self._left])
        self._left -= len(text)
        return len(text)

    def flush(self) -> None:
        pass


def _call(function, initial_db_path, final_db_path, final_answer):
    """Pass the arguments the function names (AWM verifiers take 2 or 3), else positionally.

    Reads the code object rather than importing `inspect`, which would double the start-up time.
    """
    code = function.__code__
    parameters = code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]
    offered = {
        "initial_db_path": initial_db_path,
        "final_db_path": final_db_path,
        "final_answer": final_answer,
    }
    named = {key: value for key, value in offered.items() if key in parameters}
    if named:
        return function(**named)
    return function(*list(offered.values())[: code.co_argcount])


def _json_safe(value):
    """The verifier's return value with anything JSON cannot hold turned into strings."""
    return json.loads(json.dumps(value, default=str))


def _error(prefix: str, error: BaseException) -> dict:
    return {"status": "error", "error": f"{prefix}: {type(error).__name__}: {error}"}


def run(payload: dict) -> dict:
    """Compiles and runs the verifier; any failure of the untrusted code becomes an error."""
    namespace = {"__builtins__": _restricted_builtins(), "__name__": "__verifier__"}
    try:
        exec(compile(payload["code"], "<verifier>", "exec"), namespace)
    except BaseException as error:  # noqa: BLE001 -- any failure of untrusted code is reported
        return _error("Compile error", error)
    function = namespace.get(VERIFY_FUNCTION)
    if not callable(function):
        return {"status": "error", "error": f"Function '{VERIFY_FUNCTION}' not found"}
    try:
        result = _call(
            function,
            payload["initial_db_path"],
            payload["final_db_path"],
            payload["final_answer"],
        )
        return {"status": "success", "raw_result": _json_safe(result)}
    except BaseException as error:  # noqa: BLE001
        return _error("Execution error", error)


def preload() -> None:
    """The lazy imports of the allowed modules, done before the lock-down refuses them (once, in
    a warm worker, before it forks)."""
    import _strptime  # noqa: F401 -- datetime.strptime imports it lazily
    import encodings.ascii  # noqa: F401
    import encodings.latin_1  # noqa: F401


def lock_down(payload: dict) -> str:
    """Steps 2-5 of the module docstring; returns who the verifier runs as."""
    preload()
    sys.stdout = _CappedOutput(sys.__stdout__)
    sys.stderr = _CappedOutput(sys.__stderr__)
    who = _drop_privileges()
    uris = _install_read_only_sqlite([payload["initial_db_path"], payload["final_db_path"]])
    sys.addaudithook(_make_audit_hook(uris))
    return who


def _encode_outcome(outcome: dict, dumps=json.dumps) -> bytes:
    """The outcome as one JSON document, or an error naming its size when it is too large."""
    data = dumps(outcome).encode("utf-8")
    if len(data) > MAX_RESULT_BYTES:
        data = dumps(
            {  # `dumps` is the real json.dumps, bound when this module was imported.
                "status": "error",
                "error": f"verifier result too large: {len(data):,} bytes JSON-encoded, over the "
                f"limit of {MAX_RESULT_BYTES:,}",
            }
        ).encode("utf-8")
    return data


def finish(payload: dict, result_fd: int) -> None:
    """Lock down, run the verifier, write its outcome to `result_fd` and exit: the rest of a run
    once the payload is in hand, shared by the cold runner and the warm worker's children."""
    # No new processes (trusted code, before the lock-down; the parent cannot set it before
    # bubblewrap, which itself needs to fork).
    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
    encode, write, dumps = _encode_outcome, os.write, json.dumps  # Kept before the verifier runs.
    lock_down(payload)
    outcome = run(payload)
    try:
        data = encode(outcome)
    except BaseException as error:  # noqa: BLE001 -- e.g. a verifier that patched json.dumps
        data = dumps({"status": "error", "error": f"result not encodable: {type(error).__name__}"})
        data = data.encode("utf-8") if isinstance(data, str) else b""
    for stream in (sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(BaseException):  # A verifier may have broken its streams.
            stream.flush()
    while data:
        data = data[write(result_fd, data) :]
    os._exit(0)  # No finaliser or atexit hook of the verifier's runs after the result.


def main() -> None:
    """argv[1]: the file descriptor the result goes to; the payload comes on stdin."""
    result_fd = int(sys.argv[1])
    payload = json.loads(sys.stdin.buffer.read().decode("utf-8"))
    os.close(0)
    finish(payload, result_fd)


if __name__ == "__main__":
    main()
