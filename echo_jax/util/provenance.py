"""Which code made a result: the repository's commit, recorded by runs, sweeps, captures and
benchmarks alike."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

_REPO = Path(__file__).resolve().parent  # Inside the checkout that holds this package.


def git_commit(
    short: bool = False,
    mark_dirty: bool = True,
    ignore: Sequence[str] = (),
    repo: str | Path = _REPO,
) -> str:
    """HEAD's hash, with '+dirty' when tracked files other than those under `ignore` (paths
    from the repository root, e.g. a benchmark's own results folder) differ from it; '' outside
    a repository or without git."""

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", *args], cwd=repo, capture_output=True, text=True, timeout=10, check=True
        )
        return done.stdout.strip()

    try:
        head = git("rev-parse", *(["--short"] if short else []), "HEAD")
        if not mark_dirty:
            return head
        top = git("rev-parse", "--show-toplevel")
        excluded = [f":(top,exclude){p}" for p in ignore]
        dirty = git(
            "-C", top, "status", "--porcelain", "--untracked-files=no", "--", ".", *excluded
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return head + ("+dirty" if dirty else "")
