"""Generated sections of markdown pages, between `<!-- NAME:begin ... -->` and `<!-- NAME:end -->`.

The docs pages keep their prose by hand and their tables generated: benchmarks.report writes the
"performance" section of docs/performance.md, experiments.sweep the "results" section of
docs/results.md. Text outside the markers is never touched.
"""

from __future__ import annotations

from echo_jax.util.atomic import atomic_write_text


def splice_section(path: str, section: str, name: str) -> bool:
    """Replaces the text between the lines `<!-- NAME:begin ... -->` and `<!-- NAME:end -->`
    of a markdown file with `section`; False (and nothing written) when it has no markers."""
    with open(path) as f:
        text = f.read()
    begin = text.find(f"<!-- {name}:begin")
    end = text.find(f"<!-- {name}:end -->")
    if begin < 0 or end < begin:
        return False
    after_begin = text.index("\n", begin) + 1
    atomic_write_text(path, text[:after_begin] + section.rstrip() + "\n" + text[end:])
    return True
