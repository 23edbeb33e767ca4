"""Append-only JSON-lines files (metrics.jsonl, eval.jsonl) read back after a possible kill."""

from __future__ import annotations

import json
import os
from typing import Any


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The complete lines of `path` ([] if there is no file). A line cut short by a kill ends
    the read: everything after it is unreliable."""
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for raw in f:
            try:
                out.append(json.loads(raw))
            except json.JSONDecodeError:
                break
    return out
