"""Reading episodes from .json / .jsonl / .jsonl.gz files, within bounds on what a file may cost.

Every problem is an EpisodeError naming the file (and line): invalid JSON or UTF-8, a truncated
gzip, a record or file over its size bound, a FIFO or device named as a data file, the same
episode (by content hash) given twice, and whatever `parse_episode` finds in a record. With
`skip_invalid=True` bad episodes are skipped instead, and a SkipReport groups them by reason.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import logging
import os
import stat
import zlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from echo_jax.data.episodes import DEFAULT_MAX_FIELD_CHARS, Episode, EpisodeError, parse_episode

# A record's raw bytes may be this many times the field cap (64 MiB by default; JSON escapes
# take up to 12 bytes per character); beyond that it is refused before it is parsed.
RECORD_BYTES_PER_FIELD_CHAR = 64
# A file may hold at most this many lines (blank ones included), and a .gz file may decompress
# to at most MAX_INFLATE_RATIO x its own size or MIN_INFLATE_BYTES, whichever is larger: well
# above what JSON episodes compress by (the shipped shards' ratio is in the README's bad-input
# table), well below a decompression bomb's (DEFLATE reaches about 1,000x). Both bound the time
# and memory one file can cost.
MAX_LINES_PER_FILE = 1_000_000
MAX_INFLATE_RATIO = 250
MIN_INFLATE_BYTES = 64 << 20

log = logging.getLogger(__name__)


@dataclasses.dataclass
class SkipReport:
    """Episodes left out under skip_invalid, with the error that excluded each."""

    skipped: list[EpisodeError] = dataclasses.field(default_factory=list)  # The first MAX_KEPT.
    loaded: int = 0
    counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    first: dict[str, EpisodeError] = dataclasses.field(default_factory=dict)

    MAX_KEPT = 1000  # Errors kept in full; past that only counted, so memory stays bounded.

    def add(self, error: EpisodeError) -> None:
        if len(self.skipped) < self.MAX_KEPT:
            self.skipped.append(error)
        self.counts[error.reason] += 1
        self.first.setdefault(error.reason, error)

    @property
    def n_skipped(self) -> int:
        return sum(self.counts.values())

    def by_reason(self) -> dict[str, list[EpisodeError]]:
        """The kept errors grouped by reason, the most frequent reason first."""
        groups: dict[str, list[EpisodeError]] = collections.defaultdict(list)
        for error in self.skipped:
            groups[error.reason].append(error)
        return dict(sorted(groups.items(), key=lambda kv: (-self.counts[kv[0]], kv[0])))

    def log(self, where: str) -> None:
        """A warning naming what was skipped and why; nothing when nothing was."""
        if self.counts:
            log.warning("%s: %s", where, self.summary())

    def summary(self) -> str:
        if not self.counts:
            return f"loaded {self.loaded} episodes, skipped none"
        parts = [
            f"{count} x {reason} (first: {self.first[reason].source})"
            for reason, count in sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0]))
        ]
        return f"loaded {self.loaded} episodes, skipped {self.n_skipped} invalid: " + "; ".join(
            parts
        )


def expand_paths(patterns: Sequence[str]) -> list[str]:
    """Files named by paths or globs, in a stable order; an empty match is an error."""
    files: list[str] = []
    for pattern in patterns:
        matches = (
            sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        )
        matches = [m for m in matches if not os.path.isdir(m)]
        if not matches:
            raise EpisodeError(pattern, "<path>", "no episode file matches")
        for match in matches:
            require_regular_file(match, missing_ok=True)
        files.extend(matches)
    return files


def require_regular_file(path: str, missing_ok: bool = False) -> None:
    """Refuse a FIFO, a device (a link to /dev/zero), a socket or a folder named as a data file:
    reading one can block forever or never end."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if missing_ok:
            return
        raise EpisodeError(path, "<file>", "does not exist") from None
    except OSError as e:
        raise EpisodeError(path, "<file>", f"cannot be read: {e.strerror}") from None
    if not stat.S_ISREG(mode):
        kind = (
            "a FIFO"
            if stat.S_ISFIFO(mode)
            else "a device"
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "a folder"
            if stat.S_ISDIR(mode)
            else "a socket or other special file"
        )
        raise EpisodeError(path, "<file>", f"not a regular file ({kind}); refused")


def _raw_records(path: str, max_record_bytes: int) -> Iterator[tuple[bytes | EpisodeError, str]]:
    """(raw bytes or the error reading them, source): one per .json file, one per line.

    Errors are yielded, not raised, so that the caller can skip one bad line and go on; an
    unreadable rest of a file (a truncated gzip) is yielded last.
    """
    require_regular_file(path)
    if path.endswith(".json"):
        if os.path.getsize(path) > max_record_bytes:
            yield _too_big(path, os.path.getsize(path), max_record_bytes), path
            return
        with open(path, "rb") as f:
            yield f.read(), path
        return
    if not path.endswith((".jsonl", ".jsonl.gz")):
        raise EpisodeError(path, "<file>", "unknown extension (expected .json, .jsonl, .jsonl.gz)")
    compressed = path.endswith(".gz")
    opener = gzip.open if compressed else open
    max_bytes = max(MIN_INFLATE_BYTES, MAX_INFLATE_RATIO * os.path.getsize(path))
    lineno = total = 0
    try:
        with opener(path, "rb") as f:
            while True:
                raw = f.readline(max_record_bytes + 1)
                if not raw:
                    break
                lineno += 1
                total += len(raw)
                if lineno > MAX_LINES_PER_FILE:
                    yield _bomb(path, f"more than {MAX_LINES_PER_FILE:,} lines"), path
                    return
                if compressed and total > max_bytes:
                    yield _bomb(path, f"decompresses to more than {max_bytes:,} bytes"), path
                    return
                source = f"{path}:{lineno}"
                if len(raw) > max_record_bytes and not raw.endswith(b"\n"):
                    size = len(raw)
                    while raw and not raw.endswith(b"\n"):  # Skip the rest of the long line.
                        raw = f.readline(max_record_bytes)
                        size += len(raw)
                        total += len(raw)
                        if compressed and total > max_bytes:
                            yield (
                                _bomb(path, f"decompresses to more than {max_bytes:,} bytes"),
                                path,
                            )
                            return
                    yield _too_big(source, size, max_record_bytes), source
                elif raw.strip():
                    yield raw, source
    except (OSError, EOFError, zlib.error) as e:
        where = f"after line {lineno}" if lineno else "at the start"
        yield EpisodeError(path, "<file>", f"cannot be read: {e} ({where})"), path


def _bomb(path: str, what: str) -> EpisodeError:
    return EpisodeError(
        path,
        "<file>",
        f"{what} (limits: {MAX_LINES_PER_FILE:,} lines a file; a .gz file at most "
        f"{MAX_INFLATE_RATIO} x its size or {MIN_INFLATE_BYTES >> 20} MiB); refused",
    )


def _too_big(source: str, size: int, limit: int) -> EpisodeError:
    return EpisodeError(
        source,
        "<record>",
        f"too large: {size:,} bytes, over the limit of {limit:,} "
        f"({RECORD_BYTES_PER_FIELD_CHAR} x max_field_chars)",
    )


def _utf8(raw: bytes, source: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise EpisodeError(source, "<bytes>", f"not UTF-8 (at byte {e.start})") from None


def _decode(text: str, source: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise EpisodeError(source, "<json>", f"invalid JSON: {e}") from None
    except RecursionError:
        raise EpisodeError(source, "<json>", "invalid JSON: nested too deeply") from None
    except ValueError as e:  # e.g. an integer literal past Python's digit limit
        raise EpisodeError(source, "<json>", f"invalid JSON: {e}") from None


def iter_episodes(
    patterns: Sequence[str],
    max_field_chars: int = DEFAULT_MAX_FIELD_CHARS,
) -> Iterator[Episode | EpisodeError]:
    """Every episode under `patterns` in order, or the error that makes it invalid."""
    if max_field_chars < 1:
        raise ValueError(f"max_field_chars must be >= 1, got {max_field_chars}")
    max_record_bytes = RECORD_BYTES_PER_FIELD_CHAR * max_field_chars
    for path in expand_paths(patterns):
        for raw, source in _raw_records(path, max_record_bytes):
            if isinstance(raw, EpisodeError):
                yield raw
                continue
            try:
                yield parse_episode(_decode(_utf8(raw, source), source), source, max_field_chars)
            except EpisodeError as e:
                yield e


def dedupe(
    episodes: Iterable[Episode], skip_invalid: bool = False, report: SkipReport | None = None
) -> list[Episode]:
    """Refuses (or, with skip_invalid, drops) an episode whose content was seen before."""
    first: dict[str, str] = {}
    kept = []
    for ep in episodes:
        seen = first.get(ep.content_hash) if ep.content_hash else None
        if seen is None:
            first[ep.content_hash] = ep.source
            kept.append(ep)
            continue
        error = EpisodeError(ep.source, "<episode>", f"duplicate (same content as {seen})")
        if not skip_invalid:
            raise error
        if report is not None:
            report.add(error)
    return kept


def load_episodes(
    patterns: Sequence[str],
    skip_invalid: bool = False,
    max_field_chars: int = DEFAULT_MAX_FIELD_CHARS,
    report: SkipReport | None = None,
) -> list[Episode]:
    """Every episode under `patterns`, validated; the first bad one raises EpisodeError.

    With `skip_invalid`, bad and duplicate episodes are left out and recorded in `report`
    (logged as a warning, grouped by reason, when no report is passed). A missing file or an
    empty glob is always an error.
    """
    own_report = report is None
    report = SkipReport() if report is None else report
    episodes = []
    for item in iter_episodes(patterns, max_field_chars):
        if isinstance(item, EpisodeError):
            if not skip_invalid:
                raise item
            report.add(item)
        else:
            episodes.append(item)
    episodes = dedupe(episodes, skip_invalid, report)
    report.loaded += len(episodes)
    if own_report:
        report.log(",".join(patterns))
    return episodes
