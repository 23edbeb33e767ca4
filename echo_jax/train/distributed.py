"""Training as N processes with JAX's own runtime (`jax.distributed`).

Each process runs the same program: it calls `initialize` before anything else touches JAX,
builds only its share of every global batch (`process_slice`) and assembles the global arrays
with `global_batch` (`jax.make_array_from_process_local_data`). Jitted steps then run over the
devices of all processes, the gradient reduced across them by XLA's collectives (gloo on a CPU).

What every process must do alike, because it is collective: the jitted steps and evaluations,
checkpoint saves and restores (orbax), `barrier`, `to_host` of a sharded array and
`all_gather_json`. What only process 0 does (`is_primary`): write the run's files and print
progress. Work that is no collective (the RL loop's rollouts) runs on a process's own devices,
on `local_replica` of the parameters, each process its `process_share`.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from echo_jax.config import ConfigError
from echo_jax.train.sharding import data_parallel

# The launch settings' environment variables. JAX reads JAX_COORDINATOR_ADDRESS itself; the
# other two complete the set for launchers that are none of the clusters JAX detects.
ENV_COORDINATOR_ADDRESS = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
# JAX's cluster detectors that read only environment variables (Open MPI's mpirun, SLURM's
# srun); its others (Cloud TPU, Kubernetes) query a network service, so they need the flags.
AUTO_CLUSTERS = ("ompi", "slurm")


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not an integer") from None


def _detected_cluster():
    """JAX's own detector of the launcher this process runs under (AUTO_CLUSTERS), or None."""
    try:
        from jax._src import clusters  # What jax.distributed.initialize() itself consults.
    except ImportError:  # pragma: no cover - a JAX that moved it: flags and variables still work.
        return None
    for env in clusters.ClusterEnv._cluster_types:  # In JAX's own order of preference.
        if env.name in AUTO_CLUSTERS and env.is_env_present():
            return env
    return None


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Starts `jax.distributed` when this is one of several processes; returns whether it did.

    Each argument left None comes from its environment variable (JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES, JAX_PROCESS_ID), and what is still missing from the launcher, as JAX
    detects it (SLURM's srun, Open MPI's mpirun). Nothing set and no launcher detected, or one
    process: a no-op, the ordinary single-process run. Call it before anything else uses JAX
    (jax.devices, any computation); calling it again once started is a no-op.

    On a CPU the processes' collectives go over gloo (TCP): JAX's default value of
    `jax_cpu_collectives_implementation` (0.10), set here should it be unset.
    """
    if jax.distributed.is_initialized():
        return True
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR_ADDRESS) or None
    if num_processes is None:
        num_processes = _env_int(ENV_NUM_PROCESSES)
    if process_id is None:
        process_id = _env_int(ENV_PROCESS_ID)
    given = (coordinator_address, num_processes, process_id)
    cluster = _detected_cluster() if None in given else None
    count = num_processes
    if count is None and cluster is not None:
        count = cluster.get_process_count()
    if count is not None and count < 1:
        raise ConfigError(f"num_processes must be >= 1, got {count}")
    if count == 1 or (cluster is None and given == (None, None, None)):
        return False  # One process: nothing to coordinate.
    if None in given and cluster is None:
        missing = [
            f"--{flag} (or {env})"
            for value, flag, env in zip(
                given,
                ("coordinator_address", "num_processes", "process_id"),
                (ENV_COORDINATOR_ADDRESS, ENV_NUM_PROCESSES, ENV_PROCESS_ID),
                strict=True,
            )
            if value is None
        ]
        raise ConfigError(
            "a multi-process run needs the coordinator address, process count and process id; "
            f"missing {', '.join(missing)}"
        )
    if None not in (process_id, num_processes) and not 0 <= process_id < num_processes:
        raise ConfigError(f"process_id={process_id} is not in [0, {num_processes})")
    if not jax.config.jax_cpu_collectives_implementation:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address,
        num_processes,
        process_id,
        cluster_detection_method=cluster.name if cluster is not None else "deactivate",
    )
    return True


def is_primary() -> bool:
    """Whether this is process 0, the one that writes a run's files."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process has reached the barrier of this name (a no-op alone)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _row_axis(sharding: NamedSharding) -> int:
    split = [i for i, axis in enumerate(sharding.spec) if axis is not None]
    if len(split) != 1:
        raise ValueError(f"expected a sharding that splits one (row) axis, got {sharding.spec}")
    return split[0]


def process_slice(global_rows: int, sharding: NamedSharding | None = None) -> slice:
    """The rows of a `global_rows`-row batch that this process holds: the ones its devices
    hold under `sharding` (default: `data_parallel(global_rows).batch`; the row axis is the one
    the sharding splits). All of them with one process; the data-parallel mesh orders devices
    by process, so with N processes process p holds the p-th of N equal, contiguous blocks.
    """
    sharding = data_parallel(global_rows).batch if sharding is None else sharding
    axis = _row_axis(sharding)
    shape = (1,) * axis + (global_rows,)
    index_map = sharding.addressable_devices_indices_map(shape)
    spans = sorted({idx[axis].indices(global_rows)[:2] for idx in index_map.values()})
    for (_, stop), (start, _) in zip(spans, spans[1:], strict=False):
        if start != stop:
            raise ValueError(f"this process's rows of {sharding} are not one block: {spans}")
    return slice(spans[0][0], spans[-1][1])


def process_share(n: int) -> slice:
    """This process's contiguous share of `n` items (rollouts, tasks) by process index, the
    shares differing by at most one; for work not tied to a device layout."""
    p, count = jax.process_index(), jax.process_count()
    return slice(p * n // count, (p + 1) * n // count)


def global_batch(local: Any, sharding: NamedSharding, global_rows: int) -> Any:
    """Global jax Arrays of `global_rows` rows, laid out by `sharding`, from `local`: a pytree of
    host arrays holding only this process's rows (`process_slice(global_rows, sharding)`) on the
    axis the sharding splits (0 for DataParallel.batch, 1 for DataParallel.steps).

    A leaf without that axis (a scalar) must be the same on every process; it is replicated.
    A leaf with any other row count is refused, so a process can never silently contribute the
    wrong rows.
    """
    axis = _row_axis(sharding)
    rows = process_slice(global_rows, sharding)
    share = rows.stop - rows.start
    replicated = NamedSharding(sharding.mesh, PartitionSpec())

    def one(x):
        x = np.asarray(x)
        if x.ndim <= axis:
            return jax.make_array_from_process_local_data(replicated, x, x.shape)
        if x.shape[axis] != share:
            raise ValueError(
                f"a leaf of shape {x.shape} has {x.shape[axis]} rows on axis {axis}; this "
                f"process's share of the {global_rows} is {share} (rows {rows.start}:{rows.stop})"
            )
        shape = x.shape[:axis] + (global_rows,) + x.shape[axis + 1 :]
        return jax.make_array_from_process_local_data(sharding, x, shape)

    return jax.tree.map(one, local)


def to_host(tree: Any) -> Any:
    """Numpy copies of a pytree of arrays, the same on every process. Collective when a leaf is
    split across processes (then every process must call it with the same tree)."""

    def one(x):
        if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(one, tree)


def replicate(tree: Any, sharding: NamedSharding) -> Any:
    """`tree` laid out by `sharding` (replicated) on every process's devices; the same on every
    process. Through host copies with several processes: there JAX's (0.10) device_put of an
    array not yet committed to a device (a fresh jnp.zeros) makes one that orbax cannot save."""
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)
    return jax.device_put(jax.device_get(tree), sharding)


def local_replica(tree: Any) -> Any:
    """This process's own copy of replicated arrays (the one on its first device), so that a
    computation on it runs in this process alone rather than as a collective of all; an array
    that this process holds whole (every array of a one-process run) is returned as it is."""

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if not x.is_fully_replicated:
                raise ValueError(f"an array split as {x.sharding} has no copy in one process")
            return x.addressable_data(0)
        return x

    return jax.tree.map(one, tree)


def all_gather_json(items: Sequence[Any]) -> list[Any]:
    """Every process's `items`, concatenated in process order, on every process: how processes
    that each did their `process_share` of a list of work all get the whole list back.

    The items must be JSON values (floats round-trip exactly); each process's list travels
    as compressed JSON bytes through `multihost_utils.process_allgather`, JAX's public
    collective, so no shared filesystem is needed. Collective: every process calls it alike.
    One process: the items themselves.
    """
    if jax.process_count() == 1:
        return list(items)
    data = np.frombuffer(zlib.compress(json.dumps(list(items)).encode(), 1), np.uint8)
    sizes_P = multihost_utils.process_allgather(np.int32(data.size))
    padded = np.zeros(int(sizes_P.max()), np.uint8)
    padded[: data.size] = data
    every_PB = multihost_utils.process_allgather(padded)
    return [
        item
        for p, size in enumerate(sizes_P)
        for item in json.loads(zlib.decompress(every_PB[p, :size].tobytes()))
    ]
