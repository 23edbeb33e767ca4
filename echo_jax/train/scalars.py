"""TensorBoard scalars beside metrics.jsonl: `tensorboard --logdir runs` plots every run.

    scalars = ScalarWriter(os.path.join(workdir, "tensorboard"))
    scalars.write(step, {"loss": 0.71, "env_ce": 2.3}, prefix="train/")
    scalars.close()

A run's RunDir holds one (`RunDir.scalars`, in WORKDIR/tensorboard). Each writer makes its own
events file (TFRecord framing of tensorboardX's Event protos) when it first writes. Only process
0 writes (distributed.is_primary); on the others every call does nothing. A `write` is one
record of values already on the host, flushed to the OS at once (no fsync, no thread): a killed
run keeps every point it wrote, and callers need not close a writer for its points to count.
"""

from __future__ import annotations

import math
import numbers
import os
import socket
import struct
import time
from collections.abc import Mapping
from typing import Any

from tensorboardX.proto.event_pb2 import Event, SessionLog
from tensorboardX.proto.summary_pb2 import Summary
from tensorboardX.record_writer import masked_crc32c

from echo_jax.train import distributed

EVENTS_PREFIX = "events.out.tfevents"  # TensorBoard reads files whose names contain tfevents.


def tfrecord(data: bytes) -> bytes:
    """One TFRecord: length, its masked CRC-32C, the data, the data's masked CRC-32C."""
    header = struct.pack("<Q", len(data))
    return (
        header
        + struct.pack("<I", masked_crc32c(header))
        + data
        + struct.pack("<I", masked_crc32c(data))
    )


class ScalarWriter:
    """Scalars for TensorBoard in an events file of its own under `logdir`.

    purge_step: the first step this writer will log again after a resume. TensorBoard then
    hides what earlier files logged at that step and beyond, as metrics.jsonl drops those lines.
    """

    def __init__(self, logdir: str | os.PathLike, purge_step: int | None = None):
        self.logdir = os.fspath(logdir)
        self.purge_step = purge_step
        self.path: str | None = None  # The events file, once the first write made it.
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
        self._file.write(tfrecord(event.SerializeToString()))

    def _open(self) -> None:
        os.makedirs(self.logdir, exist_ok=True)
        now = time.time()
        # Names sort by creation time, the order TensorBoard reads a run's files (and purges) in.
        base = os.path.join(
            self.logdir,
            f"{EVENTS_PREFIX}.{int(now)}.{socket.gethostname()}.{int(now * 1e6) % 10**6:06d}",
        )
        self.path, n = base, 0
        while os.path.exists(self.path):
            n += 1
            self.path = f"{base}.{n}"
        self._file = open(self.path, "xb")  # noqa: SIM115 (open across writes until close)
        self._file.write(
            tfrecord(Event(wall_time=now, file_version="brain.Event:2").SerializeToString())
        )
        if self.purge_step is not None:
            start = SessionLog(status=SessionLog.START)
            self._append(Event(wall_time=now, step=self.purge_step, session_log=start))
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
