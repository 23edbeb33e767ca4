"""Prepare an AWM scenario's `full_code` to run as one episode's world server, as AWM does.

A real AgentWorldModel-1K `full_code` is a plain FastAPI app: it builds its SQLAlchemy engine
from `DATABASE_PATH` with a hard-coded default (or from a literal path), never mounts MCP, and
ends in `if __name__ == "__main__": uvicorn.run(app, host=host, port=port)`. AWM's launcher
(`awm/core/server.py`) therefore rewrites the code before running it, and so does
`prepare_server_code`, a pure text transformation:

- every `create_engine(...)` call is replaced by one on the episode's SQLite URL with
  `connect_args={'check_same_thread': False}` (whatever form the generator wrote);
- every `uvicorn.run(app, ...)` call becomes a call of a prelude function that mounts MCP at
  `/mcp` (fastapi-mcp's `FastApiMCP(app).mount_http()`, unless the code already mounted a route
  there itself) and then serves on `$HOST` (default 127.0.0.1) and `$PORT`;
- a prelude silences deprecation warnings (the real code's `Field(example=...)`,
  `Query(example=...)`, `datetime.utcnow`; FastAPI's own category is a UserWarning subclass).

Unlike AWM's line-based rewrite, calls are found with `ast`, so a `create_engine(` spread over
several lines or mentioned in a comment is handled correctly. Code that cannot be prepared (it
does not parse, has no module-level `app`, no `uvicorn.run(app, ...)` or no `create_engine`)
raises LaunchError naming the scenario and what is missing.
"""

from __future__ import annotations

import ast
import io
import threading

SERVE_FUNCTION = "_echo_awm_serve"
MCP_PATH = "/mcp"

PRELUDE = f'''import warnings as _echo_awm_warnings

_echo_awm_warnings.filterwarnings("ignore", category=DeprecationWarning)
try:
    from fastapi.exceptions import FastAPIDeprecationWarning as _EchoAwmFastAPIWarning
except ImportError:  # FastAPI versions before this category warn with DeprecationWarning.
    pass
else:
    _echo_awm_warnings.filterwarnings("ignore", category=_EchoAwmFastAPIWarning)


def {SERVE_FUNCTION}(app):
    """Mount MCP at {MCP_PATH} unless the code did, serve on $HOST:$PORT (added by echo-jax)."""
    import os

    import uvicorn

    if not any(getattr(route, "path", None) == "{MCP_PATH}" for route in app.routes):
        from fastapi_mcp import FastApiMCP

        FastApiMCP(app).mount_http()
    uvicorn.run(app, host=os.environ.get("HOST", "127.0.0.1"), port=int(os.environ["PORT"]))


'''


class LaunchError(ValueError):
    """A scenario's full_code that cannot be prepared to run; the message names the scenario."""


# CPython 3.11's parser keeps a recursion counter that concurrent ast.parse calls from
# several threads corrupt (SystemError "AST constructor recursion depth mismatch"); the rollout
# engine starts world servers from many threads.
_PARSE_LOCK = threading.Lock()


def _lines(code: str) -> list[str]:
    """Lines with their endings, split where Python's tokenizer splits (\\n, \\r\\n, \\r)."""
    return io.StringIO(code, newline="").readlines()


class _Offsets:
    """Converts ast (line, UTF-8 byte column) positions to offsets into the source string."""

    def __init__(self, code: str):
        self.lines = _lines(code)
        self.starts = [0]
        for line in self.lines:
            self.starts.append(self.starts[-1] + len(line))

    def __call__(self, lineno: int, col_offset: int) -> int:
        line = self.lines[lineno - 1] if lineno <= len(self.lines) else ""
        return self.starts[lineno - 1] + len(line.encode()[:col_offset].decode())


def _is_call_of(node: ast.AST, owner: str | None, name: str) -> bool:
    """node is `name(...)`, `<anything>.name(...)` (owner None) or `owner.name(...)`."""
    if not isinstance(node, ast.Call):
        return False
    func = node.func
    if isinstance(func, ast.Name):
        return owner is None and func.id == name
    if isinstance(func, ast.Attribute) and func.attr == name:
        return owner is None or (isinstance(func.value, ast.Name) and func.value.id == owner)
    return False


def _module_level_statements(body: list[ast.stmt]):
    """Statements run at import: the module body and the blocks of its if/try/with."""
    for statement in body:
        yield statement
        if isinstance(statement, ast.If | ast.Try | ast.With):
            for block in ("body", "orelse", "finalbody", "handlers"):
                for inner in getattr(statement, block, []):
                    yield from _module_level_statements(
                        inner.body if isinstance(inner, ast.ExceptHandler) else [inner]
                    )


def _assigns_app(statement: ast.stmt) -> bool:
    if isinstance(statement, ast.Assign):
        targets = statement.targets
    elif isinstance(statement, ast.AnnAssign) and statement.value is not None:
        targets = [statement.target]
    else:
        return False
    return any(isinstance(t, ast.Name) and t.id == "app" for t in targets)


def _prelude_offset(tree: ast.Module, offsets: _Offsets, code: str) -> int:
    """Where the prelude goes: after the docstring and `from __future__` imports."""
    for index, statement in enumerate(tree.body):
        docstring = (
            index == 0
            and isinstance(statement, ast.Expr)
            and isinstance(statement.value, ast.Constant)
            and isinstance(statement.value.value, str)
        )
        future = isinstance(statement, ast.ImportFrom) and statement.module == "__future__"
        if not (docstring or future):
            return offsets(statement.lineno, 0)
    return len(code)


def prepare_server_code(full_code: str, *, scenario: str, database_url: str) -> str:
    """The runnable server source of `full_code` for one episode's database (module docstring).

    `database_url` is the SQLAlchemy URL of the episode's SQLite file (`sqlite:///PATH`).
    """

    def fail(problem: str) -> LaunchError:
        return LaunchError(
            f"scenario {scenario!r}: gen_envs.jsonl full_code cannot be prepared to run: {problem}"
        )

    try:
        with _PARSE_LOCK:
            tree = ast.parse(full_code, filename="<full_code>")
    except (SyntaxError, ValueError) as error:
        where = f" at line {error.lineno}" if getattr(error, "lineno", None) else ""
        raise fail(f"it does not parse ({type(error).__name__}: {error.args[0]}{where})") from None
    if not any(_assigns_app(s) for s in _module_level_statements(tree.body)):
        raise fail("no module-level `app = FastAPI(...)` to serve")

    offsets = _Offsets(full_code)
    edits: list[tuple[int, int, str]] = []
    found = {"engine": 0, "run": 0}
    for node in ast.walk(tree):
        if _is_call_of(node, None, "create_engine"):
            func = ast.get_source_segment(full_code, node.func)
            kind = "engine"
            replacement = f"{func}({database_url!r}, connect_args={{'check_same_thread': False}})"
        elif _is_call_of(node, "uvicorn", "run") and node.args:
            kind = "run"
            replacement = f"{SERVE_FUNCTION}({ast.get_source_segment(full_code, node.args[0])})"
        else:
            continue
        found[kind] += 1
        start = offsets(node.lineno, node.col_offset)
        end = offsets(node.end_lineno, node.end_col_offset)
        edits.append((start, end, replacement))
    if not found["run"]:
        raise fail("no `uvicorn.run(app, ...)` call to serve the app from")
    if not found["engine"]:
        raise fail("no SQLAlchemy `create_engine(...)` call to point at the episode's database")
    # Calls nested in a replaced call (create_engine(create_engine(...))) go with their parent.
    edits.sort()
    kept: list[tuple[int, int, str]] = []
    for edit in edits:
        if kept and edit[0] < kept[-1][1]:
            continue
        kept.append(edit)
    prelude_at = _prelude_offset(tree, offsets, full_code)
    prepared = full_code
    for start, end, replacement in reversed([(prelude_at, prelude_at, PRELUDE), *kept]):
        prepared = prepared[:start] + replacement + prepared[end:]
    return prepared
