"""The launcher prepares any AWM full_code as AWM's own launcher does (pure text, no server)."""

import ast

import pytest

from echo_jax.awm.launcher import SERVE_FUNCTION, LaunchError, prepare_server_code

URL = "sqlite:////tmp/episode/world.db"

REAL_STYLE = '''"""A scenario server."""
from __future__ import annotations

import os
from fastapi import FastAPI
from sqlalchemy import create_engine
import sqlalchemy

DATABASE_URL = os.getenv("DATABASE_PATH", "sqlite:///outputs/databases/youtube.db")
# engine = create_engine("sqlite:///commented_out.db")
engine = create_engine(DATABASE_URL, connect_args={"check_same_thread": False})
label = "café"; other = create_engine("sqlite:///outputs/databases/other.db")
spread = sqlalchemy.create_engine(
    DATABASE_URL,
    echo=False,
)
app = FastAPI(title="Tube")

if __name__ == "__main__":
    import uvicorn, os

    host = os.getenv("HOST", "0.0.0.0")
    port = int(os.getenv("PORT", "8000"))
    uvicorn.run(app, host=host, port=port, log_level="info")
'''


def _calls(code: str, name: str) -> list[ast.Call]:
    return [
        node
        for node in ast.walk(ast.parse(code))
        if isinstance(node, ast.Call)
        and (getattr(node.func, "id", None) == name or getattr(node.func, "attr", None) == name)
    ]


def test_every_engine_points_at_the_episode_database():
    prepared = prepare_server_code(REAL_STYLE, scenario="tube_1", database_url=URL)
    engines = _calls(prepared, "create_engine")
    assert len(engines) == 3  # One-line, after a non-ASCII literal, and spread over lines.
    for call in engines:
        assert [ast.literal_eval(a) for a in call.args] == [URL]
        assert [(k.arg, ast.literal_eval(k.value)) for k in call.keywords] == [
            ("connect_args", {"check_same_thread": False})
        ]
    assert '# engine = create_engine("sqlite:///commented_out.db")' in prepared  # Comment kept.
    assert 'label = "café"' in prepared


def test_uvicorn_run_becomes_mount_and_serve():
    prepared = prepare_server_code(REAL_STYLE, scenario="tube_1", database_url=URL)
    serves = _calls(prepared, SERVE_FUNCTION)
    assert [ast.unparse(call) for call in serves] == [f"{SERVE_FUNCTION}(app)"]
    # The only uvicorn.run left is the prelude's, on $HOST/$PORT after mounting MCP.
    (run,) = _calls(prepared, "run")
    assert ast.unparse(run) == (
        "uvicorn.run(app, host=os.environ.get('HOST', '127.0.0.1'), port=int(os.environ['PORT']))"
    )
    assert "FastApiMCP(app).mount_http()" in prepared
    tree = ast.parse(prepared)
    # Docstring and the __future__ import stay first; the warnings filter precedes every import.
    assert ast.get_docstring(tree) == "A scenario server."
    assert isinstance(tree.body[1], ast.ImportFrom) and tree.body[1].module == "__future__"
    assert ast.unparse(tree.body[2]) == "import warnings as _echo_awm_warnings"
    assert "DeprecationWarning" in ast.unparse(tree.body[3])


def test_a_one_line_main_block_is_prepared():
    code = (
        "import uvicorn\nfrom fastapi import FastAPI\nfrom sqlalchemy import create_engine\n"
        "engine = create_engine('sqlite:///x.db')\napp = FastAPI()\n"
        'if __name__ == "__main__": uvicorn.run(app, host="0.0.0.0", port=8000)\n'
    )
    prepared = prepare_server_code(code, scenario="s", database_url=URL)
    assert f'if __name__ == "__main__": {SERVE_FUNCTION}(app)\n' in prepared
    compile(prepared, "<prepared>", "exec")


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda c: c.replace('app = FastAPI(title="Tube")', "api = FastAPI()"), "no module-level"),
        (lambda c: c.replace("uvicorn.run(app,", "print(app,"), r"no `uvicorn\.run\(app"),
        (lambda c: c.replace("create_engine(", "make_engine("), "no SQLAlchemy `create_engine"),
        (lambda c: c.replace("app = FastAPI(", "app = FastAPI(("), "does not parse"),
    ],
)
def test_code_that_cannot_be_prepared_names_scenario_and_problem(edit, problem):
    with pytest.raises(LaunchError, match=rf"scenario 'tube_1': .*cannot be prepared.*{problem}"):
        prepare_server_code(edit(REAL_STYLE), scenario="tube_1", database_url=URL)
