"""The commit a result records, and what counts as a dirty tree."""

import os
import subprocess

import pytest

from echo_jax.util.provenance import git_commit

GIT_ENV = {
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.invalid",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.invalid",
}


@pytest.fixture
def repo(tmp_path):
    def git(*args):
        env = dict(os.environ, **GIT_ENV)
        out = subprocess.run(["git", *args], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    (tmp_path / "results").mkdir()
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "results" / "lines.jsonl").write_text("{}\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "first")
    return tmp_path, git("rev-parse", "HEAD")


def test_clean_dirty_and_ignored_changes(repo):
    path, head = repo
    assert git_commit(repo=path) == head
    assert head.startswith(git_commit(short=True, repo=path))
    (path / "results" / "lines.jsonl").write_text("{}\n{}\n")
    assert git_commit(repo=path) == head + "+dirty"
    assert git_commit(ignore=("results",), repo=path) == head  # Its own output only.
    (path / "code.py").write_text("x = 2\n")
    assert git_commit(ignore=("results",), repo=path) == head + "+dirty"
    assert git_commit(mark_dirty=False, repo=path) == head
    (path / "untracked.py").write_text("")  # Untracked files never make a tree dirty.
    subprocess.run(["git", "checkout", "-q", "code.py"], cwd=path, check=True)
    assert git_commit(ignore=("results",), repo=path) == head


def test_outside_a_repository_is_empty(tmp_path):
    assert git_commit(repo=tmp_path) == ""
