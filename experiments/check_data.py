"""Validate episode files, corpus folders or AWM world folders (logic in echo_jax.data.check_data).

    python -m experiments.check_data data/awm_e_commerce_33_task0.json runs/capture0 data/awm_worlds

Prints a summary (counts, tokens per role, rewards, reward types) and every problem found, each
naming its file, line and field; exits with status 1 when there is any.
"""

from __future__ import annotations

from absl import app, flags

from echo_jax.data.check_data import check
from echo_jax.data.episodes import DEFAULT_MAX_FIELD_CHARS

_MAX_FIELD_CHARS = flags.DEFINE_integer(
    "max_field_chars", DEFAULT_MAX_FIELD_CHARS, "Longest string value accepted in an episode."
)


def main(argv: list[str]) -> None:
    paths = argv[1:]
    if not paths:
        raise app.UsageError("give one or more episode files, globs, corpus or world folders")
    if _MAX_FIELD_CHARS.value < 1:
        raise SystemExit(f"error: --max_field_chars must be >= 1, got {_MAX_FIELD_CHARS.value}")
    report = check(paths, _MAX_FIELD_CHARS.value)
    print(report.text())
    if not report.ok:
        raise SystemExit(f"error: {len(report.errors)} problem(s) found")


if __name__ == "__main__":
    app.run(main)
