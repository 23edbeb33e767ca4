"""The package's shape, checked: imports run one way through the layers the README names, no
module outside the world generators passes 400 lines, and the top level stays small."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "echo_jax"
LAYERS = ("util", "config", "config_flags", "awm", "data", "model", "objective", "train",
          "agent", "rl", "reports")  # fmt: skip
LEAVES = {"echo_jax.objective.objectives"}  # Read by config.py; they import only util.


def modules():
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if "worldgen" not in parts:
            yield path, parts


def imported(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("echo_jax"):
            if node.module == "echo_jax":
                yield from (f"echo_jax.{a.name}" for a in node.names)
            else:
                yield node.module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("echo_jax."))


def test_imports_run_one_way():
    wrong = []
    for path, parts in modules():
        if parts[-1] == "__init__" and len(parts) == 1:
            continue
        here = LAYERS.index(parts[0])
        for name in imported(ast.parse(path.read_text())):
            layer = name.split(".")[1]
            if name not in LEAVES and LAYERS.index(layer) > here:
                wrong.append(f"{'/'.join(parts)} imports {name}")
    assert not wrong, wrong
    for leaf in LEAVES:
        path = PACKAGE.joinpath(*leaf.split(".")[1:]).with_suffix(".py")
        assert all(n.startswith("echo_jax.util") for n in imported(ast.parse(path.read_text())))


def test_modules_are_short_and_the_top_level_small():
    long = [f"{'/'.join(p)}: {n}" for path, p in modules()
            if (n := len(path.read_text().splitlines())) > 400]  # fmt: skip
    assert not long, long
    top = [p.name for p in PACKAGE.iterdir() if p.name != "__pycache__"]
    assert len(top) <= 12, sorted(top)
