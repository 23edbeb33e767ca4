"""TensorBoard scalars beside metrics.jsonl: `tensorboard --logdir runs` plots every run.

    scalars = ScalarWriter(os.path.join(workdir, "tensorboard"))
    scalars.write(step, {"loss": 0.71, "env_ce": 2.3}, prefix="train/")
    scalars.close()

A run's RunDir holds one (`RunDir.scalars`, in WORKDIR/tensorboard). Each writer makes its own
events file (tensorboardX's synchronous EventsWriter) when it first writes. Only process 0
writes (distributed.is_primary); on the others every call does nothing. A `write` is one record
of values already on the host, flushed at once: a killed run keeps every point it wrote, and
callers need not close a writer for its points to count.
"""

from __future__ import annotations

import math
import numbers
import os
import time
from collections.abc import Mapping
from typing import Any

from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto.event_pb2 import Event, SessionLog
from tensorboardX.proto.summary_pb2 import Summary

from echo_jax.train import distributed


class ScalarWriter:
    """Scalars for TensorBoard in an events file of its own under `logdir`.

    purge_step: the first step this writer will log again after a resume. TensorBoard then
    hides what earlier files logged at that step and beyond, as metrics.jsonl drops those lines.
    """

    def __init__(self, logdir: str | os.PathLike, purge_step: int | None = None):
        self.logdir = os.fspath(logdir)
        self.purge_step = purge_step
        self._file = None
        self._enabled = distributed.is_primary()

    def write(self, step: int, scalars: Mapping[str, Any], prefix: str = "") -> None:
        """A point at `step` for every finite real value in `scalars`, tagged prefix + key.
        Other values (None, NaN for a term with no targets, strings, lists) and the key "step"
        are left out."""
        if not self._enabled:
            return
        values = [
            Summary.Value(tag=prefix + key, simple_value=float(value))
            for key, value in scalars.items()
            if key != "step" and isinstance(value, numbers.Real) and math.isfinite(value)
        ]
        if not values:
            return
        self._append(Event(wall_time=time.time(), step=int(step), summary=Summary(value=values)))
        self._file.flush()

    def _append(self, event: Event) -> None:
        if self._file is None:
            self._open()
        self._file.write_event(event)

    def _open(self) -> None:
        os.makedirs(self.logdir, exist_ok=True)
        # The nanoseconds keep two writers of one second apart, in the order TensorBoard reads
        # a run's files (by name) and purges.
        suffix = f".{time.time_ns() % 10**9:09d}"
        self._file = EventsWriter(os.path.join(self.logdir, "events"), suffix)
        if self.purge_step is not None:
            start = SessionLog(status=SessionLog.START)
            self._append(Event(wall_time=time.time(), step=self.purge_step, session_log=start))
            self.purge_step = None  # Only the first file hides what came before.

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        """Closes the events file; a later write starts a new one."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> ScalarWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
