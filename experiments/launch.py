"""The launch flags of a run as several processes, one definition for every entry point that
can run so (experiments.train, experiments.rl; docs/cluster.md, "Launch on a cluster").

An entry point imports this module, adopts its flags (`flags.adopt_module_key_flags(launch)`,
so that its --help lists them) and calls `initialize` before anything touches JAX.
"""

from __future__ import annotations

from absl import flags

from echo_jax.config import ConfigError
from echo_jax.train import distributed

flags.DEFINE_string(
    "coordinator_address",
    None,
    "host:port of process 0's coordinator, for a run as several processes (default: "
    "$JAX_COORDINATOR_ADDRESS, or what srun / mpirun tell JAX; none: one process).",
)
flags.DEFINE_integer(
    "num_processes", None, "Processes in the run (default: $JAX_NUM_PROCESSES, srun / mpirun)."
)
flags.DEFINE_integer(
    "process_id", None, "This process's index, 0 .. num_processes-1 (default: $JAX_PROCESS_ID)."
)
FLAGS = flags.FLAGS


def initialize(workdir: str | None) -> bool:
    """`distributed.initialize` from the flags (or the environment); returns whether this is
    one of several processes, which must share one `workdir`, given (a default one is named
    after the time, which the processes need not agree on)."""
    several = distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                                     FLAGS.process_id)  # fmt: skip
    if several and not workdir:
        raise ConfigError("a run as several processes needs --workdir, the same in each")
    return several
