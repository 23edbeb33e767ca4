"""Data parallelism over every local device: the batch split on a "data" mesh axis, the
parameters and optimiser state replicated. One device is the same program with a mesh of one.

Multi-host: call `jax.distributed.initialize()` before anything else touches JAX. Every host
builds the same global batch (`train.batch_indices` is a pure function of step and seed) and
`jax.device_put` keeps only the rows of that host's devices.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from echo_jax.config import ConfigError

DATA_AXIS = "data"


@dataclasses.dataclass(frozen=True)
class DataParallel:
    mesh: Mesh
    batch: NamedSharding  # Leading (row) axis split over DATA_AXIS.
    steps: NamedSharding  # A stack of batches [K, B, ...]: the row axis (second) split.
    replicated: NamedSharding  # A full copy on every device.

    @property
    def num_devices(self) -> int:
        return int(self.mesh.devices.size)


def data_parallel(batch_size: int, devices: Sequence[jax.Device] | None = None) -> DataParallel:
    """Shardings for `batch_size` rows over `devices` (default: all of them, every host's)."""
    devices = list(jax.devices() if devices is None else devices)
    if batch_size % len(devices):
        raise ConfigError(
            f"batch_size={batch_size} is not divisible by the {len(devices)} devices the batch "
            f"is split over; use a multiple of {len(devices)}"
        )
    mesh = Mesh(np.asarray(devices), (DATA_AXIS,))
    return DataParallel(
        mesh=mesh,
        batch=NamedSharding(mesh, PartitionSpec(DATA_AXIS)),
        steps=NamedSharding(mesh, PartitionSpec(None, DATA_AXIS)),
        replicated=NamedSharding(mesh, PartitionSpec()),
    )
