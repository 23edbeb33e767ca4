"""A run's working directory: resolved config, vocabulary, metrics, summary and checkpoints.

A workdir belongs to one configuration: reusing it needs `resume=True` and the same config, so a
sweep can never silently overwrite or mix two runs.

Several processes (echo_jax.train.distributed) share one workdir, on a filesystem they all see:
every process reads it, only process 0 writes its files (config, metrics, summary), and checkpoints
are saved and restored by all of them together (orbax), so every process must call `claim`,
`save`, `restore` and `latest_checkpoint_step` at the same points.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp

from echo_jax.config import Config
from echo_jax.train import distributed
from echo_jax.train.scalars import ScalarWriter
from echo_jax.util.atomic import atomic_open, atomic_write_text
from echo_jax.util.jsonl import read_jsonl

CHECKPOINT_METADATA = "_CHECKPOINT_METADATA"  # Orbax writes it into every finished step dir.


class RunDirError(ValueError):
    """The workdir holds something this run must not touch."""


def config_diff(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """Flattened keys whose values differ. A setting added to Config after a run was saved is
    missing from its config.json; it counts as equal when the wanted value is its default."""
    defaults = flatten(json.loads(Config().to_json()))
    return sorted(
        k
        for k in saved.keys() | wanted.keys()
        if saved.get(k) != wanted.get(k)
        and not (k not in saved and k in defaults and wanted.get(k) == defaults[k])
    )


def config_changes(saved: dict[str, Any], wanted: dict[str, Any]) -> str:
    """ "key: saved -> wanted" of each differing flattened key (config_diff), or ""."""
    diff = config_diff(saved, wanted)
    return ", ".join(f"{k}: {saved.get(k)!r} -> {wanted.get(k)!r}" for k in diff)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level: {"loss": {"lam": 0.1}} -> {"loss.lam": 0.1}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class RunDir:
    CONFIG = "config.json"
    VOCAB = "vocab.json"
    METRICS = "metrics.jsonl"
    TENSORBOARD = "tensorboard"  # Events files of `scalars`.

    def __init__(self, path: str | os.PathLike):
        self.path = os.path.abspath(os.fspath(path))
        self.checkpoint_dir = os.path.join(self.path, "checkpoints")
        self._manager: ocp.CheckpointManager | None = None
        self._keep = 2
        self._config_json = ""
        self._scalars: ScalarWriter | None = None
        self._purge_step: int | None = None

    @classmethod
    def open(cls, path: str | os.PathLike, cfg: Config, resume: bool) -> RunDir:
        """Checks that `path` can hold `cfg`: a new run, or (with resume) the same run continued.

        Writes nothing: `claim` does, once the data has loaded, so a bad input leaves no trace.
        """
        run = cls(path)
        config_path = run.file(cls.CONFIG)
        if os.path.exists(config_path):
            if not resume:
                raise RunDirError(
                    f"{run.path} already holds a run ({cls.CONFIG}); pass --resume to continue "
                    "it, or choose another --workdir"
                )
            with open(config_path) as f:
                saved = flatten(json.load(f))
            wanted = flatten(json.loads(cfg.to_json()))
            changes = config_changes(saved, wanted)
            if changes:
                raise RunDirError(f"{run.path} holds a run with a different config ({changes})")
        run._keep = cfg.train.keep_checkpoints
        run._config_json = cfg.to_json()
        return run

    def claim(self) -> None:
        """Writes the run's config (once); from here on the workdir belongs to this run.

        Every process calls it: it waits until all have checked the workdir (`open`), so none
        mistakes the config that process 0 then writes for an earlier run's."""
        distributed.barrier("echo_jax.train.run_dir.claim")
        if distributed.is_primary() and not os.path.exists(self.file(self.CONFIG)):
            atomic_write_text(self.file(self.CONFIG), self._config_json)

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def _drop_partial_checkpoints(self) -> None:
        """Removes what a kill mid-save can leave: orbax temp dirs and step dirs without metadata.

        Orbax renames a finished temp dir into place, so neither can hold a usable checkpoint;
        left there, a metadata-less step dir would be taken for the latest one.
        """
        if not os.path.isdir(self.checkpoint_dir):
            return
        for name in os.listdir(self.checkpoint_dir):
            path = os.path.join(self.checkpoint_dir, name)
            partial = ".orbax-checkpoint-tmp" in name or (
                name.isdigit() and not os.path.exists(os.path.join(path, CHECKPOINT_METADATA))
            )
            if partial and os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)

    @property
    def manager(self) -> ocp.CheckpointManager:
        if self._manager is None:
            if distributed.is_primary():
                self._drop_partial_checkpoints()
            distributed.barrier("echo_jax.train.run_dir.manager")  # No process sees them before.
            options = ocp.CheckpointManagerOptions(
                max_to_keep=self._keep, create=True, enable_async_checkpointing=False
            )
            self._manager = ocp.CheckpointManager(self.checkpoint_dir, options=options)
        return self._manager

    def latest_checkpoint_step(self) -> int | None:
        if not os.path.isdir(self.checkpoint_dir):
            return None
        return self.manager.latest_step()

    def save(self, state: Any, step: int, meta: dict[str, Any]) -> None:
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state._asdict()), meta=ocp.args.JsonSave(meta)
        )
        self.manager.save(step, args=args)
        self.manager.wait_until_finished()

    def restore(self, template: Any, step: int) -> tuple[Any, dict[str, Any]]:
        """The saved state, shaped like `template` (a NamedTuple of arrays), and its metadata."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template._asdict())
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
        )
        restored = self.manager.restore(step, args=args)
        return type(template)(**restored.state), restored.meta

    def append_metrics(self, line: dict[str, Any]) -> None:
        if not distributed.is_primary():
            return
        with open(self.file(self.METRICS), "a") as f:
            f.write(json.dumps(line) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        return read_jsonl(self.file(self.METRICS))

    def truncate_metrics(self, after_step: int, key: str = "step") -> None:
        """Keeps only complete lines up to `after_step` (of `key`: an RL run counts iterations),
        so a resumed run logs each step once; TensorBoard likewise hides what earlier events
        files logged after it (`scalars`)."""
        self.close()
        self._purge_step = after_step + 1  # For the events file that the next write opens.
        if not distributed.is_primary():
            return
        kept = [m for m in self.read_metrics() if m[key] <= after_step]
        with atomic_open(self.file(self.METRICS)) as f:
            f.writelines(json.dumps(m) + "\n" for m in kept)

    @property
    def scalars(self) -> ScalarWriter:
        """TensorBoard scalars in WORKDIR/tensorboard: `run.scalars.write(step, metrics)`.
        Process 0 only, like the metrics; its events file opens at the first write."""
        if self._scalars is None:
            self._scalars = ScalarWriter(self.file(self.TENSORBOARD), self._purge_step)
            self._purge_step = None
        return self._scalars

    def close(self) -> None:
        """Closes the TensorBoard events file (a later write opens another)."""
        if self._scalars is not None:
            self._scalars.close()
            self._scalars = None

    def write_json(self, name: str, obj: Any) -> None:
        if not distributed.is_primary():
            return
        atomic_write_text(self.file(name), json.dumps(obj, indent=2, sort_keys=True))
