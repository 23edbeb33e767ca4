"""Train a tiny Flax transformer on captured AWM episodes with grpo, echo or verifier_free.

python -m experiments.train --objective=echo
python -m experiments.train --help    # every flag: one per Config field, plus those below

As N processes (docs/cluster.md, "Launch on a cluster"): the same command in each, with
--coordinator_address, --num_processes and --process_id (or JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID, or under srun / mpirun nothing at all).
"""

from __future__ import annotations

import time

from absl import app, flags, logging

from echo_jax import config as C
from echo_jax import config_flags
from echo_jax.data.episodes import EpisodeError
from echo_jax.train import distributed
from echo_jax.train.run_dir import RunDirError
from echo_jax.train.trainer import TrainingDiverged, run_experiment

# One flag per field of every Config section, its help the field's comment (--help lists them):
# bare field names, except --data (DataConfig.paths), --loss_impl (LossConfig.impl) and the
# eval_ prefix of EvalConfig's (echo_jax.config_flags.RUN_SECTIONS); plus --model_size.
RUN_FLAGS = config_flags.define_run_flags()
flags.adopt_module_key_flags(config_flags)  # So that --help lists them.
flags.DEFINE_string("workdir", None, "Run directory (default: runs/<objective>_<time>).")
flags.DEFINE_bool("resume", False, "Continue the run already in --workdir.")
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


def config_from_flags() -> C.Config:
    return config_flags.run_config_from_flags(RUN_FLAGS)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
    try:
        cfg = config_from_flags()
        # Before anything touches JAX.
        if (
            distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
            and not FLAGS.workdir
        ):
            raise C.ConfigError("a run as several processes needs --workdir, the same in each")
        workdir = FLAGS.workdir or f"runs/{cfg.loss.objective}_{time.strftime('%Y%m%d-%H%M%S')}"
        run_experiment(cfg, workdir, resume=FLAGS.resume)
    except (C.ConfigError, EpisodeError, RunDirError, TrainingDiverged) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    app.run(main)
