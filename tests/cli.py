"""Runs an entry point the way a user does: `python -m MODULE ARGS` from the repository root."""

import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(__file__), "..")


def run_module(module: str, *args: str, cwd=ROOT, timeout: int = 300):
    """The finished process (text stdout/stderr captured), on the CPU backend."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
