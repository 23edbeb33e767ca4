"""TensorBoard scalars: events files read back record by record (TFRecord framing, CRCs checked,
tensorboardX's Event protos) hold exactly the values of metrics.jsonl and eval.jsonl."""

import dataclasses
import math
import os
import struct

import numpy as np
import pytest
from tensorboardX.proto.event_pb2 import Event, SessionLog
from tensorboardX.record_writer import masked_crc32c

from echo_jax.config import EvalConfig
from echo_jax.train import distributed, scalars
from echo_jax.train.evaluation import EVAL_FILE
from echo_jax.train.run_dir import RunDir
from echo_jax.train.scalars import ScalarWriter
from echo_jax.train.trainer import run_experiment
from echo_jax.util.jsonl import read_jsonl
from tests.test_data import small_episode, write_jsonl
from tests.test_train import tiny_config


def read_events(path) -> list[Event]:
    """Every record of one events file; a bad length or CRC fails the test."""
    with open(path, "rb") as f:
        raw = f.read()
    events, at = [], 0
    while at < len(raw):
        header = raw[at : at + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", raw[at + 8 : at + 12])
        assert header_crc == masked_crc32c(header)
        data = raw[at + 12 : at + 12 + length]
        (data_crc,) = struct.unpack("<I", raw[at + 12 + length : at + 16 + length])
        assert len(data) == length and data_crc == masked_crc32c(data)
        events.append(Event.FromString(data))
        at += 16 + length
    return events


def events_files(logdir) -> list[str]:
    return sorted(os.path.join(logdir, n) for n in os.listdir(logdir) if "tfevents" in n)


def read_scalars(logdir) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} over a folder's events files, in TensorBoard's (name) order."""
    out: dict[str, dict[int, float]] = {}
    for path in events_files(logdir):
        for event in read_events(path):
            for value in event.summary.value:
                out.setdefault(value.tag, {})[event.step] = value.simple_value
    return out


def test_a_write_is_one_flushed_record_of_the_real_values(tmp_path):
    writer = ScalarWriter(tmp_path / "tb")
    assert not (tmp_path / "tb").exists()  # Nothing until the first write.
    line = {"step": 3, "loss": 0.5, "n": 2, "none": None, "nan": math.nan, "name": "x", "l": [1]}
    writer.write(3, line, prefix="train/")
    (path,) = events_files(tmp_path / "tb")
    first, second = read_events(path)  # Readable before close: each write is flushed.
    assert first.file_version == "brain.Event:2"
    assert second.step == 3
    assert {v.tag: v.simple_value for v in second.summary.value} == {
        "train/loss": 0.5,
        "train/n": 2,
    }
    writer.write(4, {"step": 4})  # Nothing to plot: no record.
    writer.close()
    assert len(read_events(path)) == 2
    writer.write(5, {"loss": 0.25}, prefix="train/")  # After close: a new file.
    writer.close()
    assert len(events_files(tmp_path / "tb")) == 2
    assert read_scalars(tmp_path / "tb") == {"train/loss": {3: 0.5, 5: 0.25}, "train/n": {3: 2.0}}


def test_a_resumed_run_purges_what_came_after_its_checkpoint(tmp_path):
    run = RunDir(tmp_path)
    run.scalars.write(1, {"loss": 1.0})
    run.scalars.write(2, {"loss": 2.0})
    run.truncate_metrics(after_step=1)  # Resuming from step 1: closes the file.
    run.scalars.write(2, {"loss": 3.0})
    run.close()
    old, new = events_files(tmp_path / RunDir.TENSORBOARD)
    assert len(read_events(old)) == 3
    start = read_events(new)[1]
    assert (start.step, start.session_log.status) == (2, SessionLog.START)
    assert [e.step for e in read_events(new)] == [0, 2, 2]  # Only the new file purges.


def test_only_the_primary_process_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "is_primary", lambda: False)
    writer = scalars.ScalarWriter(tmp_path / "tb")
    writer.write(1, {"loss": 1.0})
    writer.close()
    assert not (tmp_path / "tb").exists()


@pytest.fixture
def tiny_run(tmp_path):
    records = [small_episode(task_idx=i % 3, reward=float(i % 2)) for i in range(6)]
    paths = write_jsonl(tmp_path / "eps.jsonl", records)
    cfg = tiny_config(str(paths), steps=4, checkpoint_every=2)
    cfg = dataclasses.replace(cfg, eval=EvalConfig(every=2, splits=("train",), max_rows=3))
    run_experiment(cfg, str(tmp_path / "w"), log=lambda _: None)
    return tmp_path / "w"


def test_a_training_run_writes_its_metrics_and_evals(tiny_run):
    got = read_scalars(tiny_run / RunDir.TENSORBOARD)
    metrics = RunDir(tiny_run).read_metrics()
    evals = read_jsonl(tiny_run / EVAL_FILE)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4] and [e["step"] for e in evals] == [2, 4]
    want: dict[str, dict[int, float]] = {}
    for prefix, lines in (("train/", metrics), ("eval/", evals)):
        for line in lines:
            for key, value in line.items():
                if key != "step" and value is not None:
                    want.setdefault(prefix + key, {})[line["step"]] = value
    assert "train/loss" in want and "eval/train/env_ce" in want
    assert got.keys() == want.keys()
    for tag, points in want.items():
        assert got[tag].keys() == points.keys(), tag
        steps = sorted(points)
        np.testing.assert_allclose(  # Stored as float32.
            [got[tag][s] for s in steps], [points[s] for s in steps], rtol=1e-6, err_msg=tag
        )
