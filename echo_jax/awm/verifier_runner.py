"""Child-process side of `verifier.run_verifier`: run one verifier's code and print its result.

Started as `python -I -S verifier_runner.py PAYLOAD.json` (no site-packages, no paths taken from
the environment) by the parent, which has already applied resource limits. It executes the
verifier with restricted builtins and an import allow-list, calls `verify_task_completion`, and
prints the outcome as the last stdout line prefixed with the parent's random marker, so whatever
the verifier itself prints cannot be mistaken for the result.

The restrictions are defence in depth, not a sandbox: Python code can reach unrestricted objects
through introspection. The process boundary, rlimits, clean environment and database copies are
what keep a hostile verifier away from the capture.
"""

import builtins
import collections
import datetime
import json
import math
import re
import sqlite3
import sys

ALLOWED_MODULES = frozenset({"sqlite3", "json", "math", "re", "datetime", "collections"})
_ALLOWED_LOADED = (sqlite3, json, math, re, datetime, collections)  # imported before lock-down
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


def _guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
    if level != 0 or name.split(".")[0] not in ALLOWED_MODULES:
        raise ImportError(f"import of '{name}' is not allowed in verifier code")
    return builtins.__import__(name, globals, locals, fromlist, level)


def _restricted_builtins() -> dict:
    allowed = {k: v for k, v in vars(builtins).items() if k not in _DENIED_BUILTINS}
    allowed["__import__"] = _guarded_import
    return allowed


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


def run(payload: dict) -> dict:
    namespace = {"__builtins__": _restricted_builtins(), "__name__": "__verifier__"}
    try:
        exec(compile(payload["code"], "<verifier>", "exec"), namespace)
    except BaseException as error:  # noqa: BLE001 -- any failure of untrusted code is reported
        return {"status": "error", "error": f"Compile error: {type(error).__name__}: {error}"}
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
        return {"status": "error", "error": f"Execution error: {type(error).__name__}: {error}"}


def main() -> None:
    with open(sys.argv[1], encoding="utf-8") as handle:
        payload = json.load(handle)
    outcome = run(payload)
    sys.stdout.flush()
    sys.__stdout__.write("\n" + payload["marker"] + json.dumps(outcome) + "\n")
    sys.__stdout__.flush()


if __name__ == "__main__":
    main()
