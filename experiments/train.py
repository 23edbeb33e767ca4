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
from echo_jax.train.run_dir import RunDirError
from echo_jax.train.trainer import TrainingDiverged, run_experiment
from echo_jax.util import stop_signals
from experiments import launch  # --coordinator_address, --num_processes, --process_id

# One flag per field of every Config section, its help the field's comment (--help lists them):
# bare field names, except --data (DataConfig.paths), --loss_impl (LossConfig.impl) and the
# eval_ prefix of EvalConfig's (echo_jax.config_flags.RUN_SECTIONS); plus --model_size.
RUN_FLAGS = config_flags.define_run_flags()
flags.adopt_module_key_flags(config_flags)  # So that --help lists them.
flags.adopt_module_key_flags(launch)
flags.DEFINE_string("workdir", None, "Run directory (default: runs/<objective>_<time>).")
flags.DEFINE_bool("resume", False, "Continue the run already in --workdir.")
FLAGS = flags.FLAGS


def config_from_flags() -> C.Config:
    return config_flags.run_config_from_flags(RUN_FLAGS)


def main(argv: list[str]) -> None:
    stop_signals.stop_on_signals()  # SIGTERM cleans up as Ctrl-C does.
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
    try:
        cfg = config_from_flags()
        launch.initialize(FLAGS.workdir)  # Before anything touches JAX.
        workdir = FLAGS.workdir or f"runs/{cfg.loss.objective}_{time.strftime('%Y%m%d-%H%M%S')}"
        run_experiment(cfg, workdir, resume=FLAGS.resume)
    except (C.ConfigError, EpisodeError, RunDirError, TrainingDiverged) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    app.run(main)
