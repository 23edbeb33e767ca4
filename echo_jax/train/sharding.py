"""Data parallelism over every local device: the batch split on a "data" mesh axis, the
parameters and optimiser state replicated. One device is the same program with a mesh of one.

Several processes (echo_jax.train.distributed): the mesh spans every process's devices, ordered by
process, so each process holds one contiguous block of a batch's rows; it builds only those
(`distributed.process_slice`) and `distributed.global_batch` assembles the global arrays.
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
    """Shardings for `batch_size` rows over `devices` (default: all of them, every process's,
    ordered by process so that each process's rows are one block)."""
    if devices is None:
        devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    devices = list(devices)
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
