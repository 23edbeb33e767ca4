"""On-policy GRPO / ECHO / verifier-free in the local AWM worlds.

    python -m experiments.rl --objective=echo --lam=0.05   # from data/warm_start
    python -m experiments.rl --objective=grpo --start=''   # from scratch (--model_size, --data)
    python -m experiments.rl --probe_only --pool_probe=16   # every task's difficulty at --start

Each iteration samples --group_size rollouts of every task of the pool (chosen once from the
start checkpoint, or read from --pool_file) with the current policy, scores them with the
tasks' verifiers, and updates with echo_loss (PPO-clip on the log-probs the sampler recorded)
on exactly the tokens it sampled. Logic in echo_jax.rl.loop.run_rl; metrics per iteration in
WORKDIR/metrics.jsonl, rollouts in WORKDIR/rollouts/ (capture format).

As N processes (docs/cluster.md, "Launch on a cluster"): the same command in each, with the
same --workdir and --coordinator_address, --num_processes and --process_id (or
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID, or under srun / mpirun nothing).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

from absl import app, flags, logging

from echo_jax import config as C
from echo_jax import config_flags
from echo_jax.config_flags import define_flags, from_flags, replace_from_flags
from echo_jax.data.episodes import EpisodeError
from echo_jax.model.hf_io import is_hf_folder
from echo_jax.objective.objectives import OBJECTIVES, objective_spec
from echo_jax.rl.difficulty import write_task_difficulty
from echo_jax.rl.loop import run_rl
from echo_jax.train import distributed
from echo_jax.train.run_dir import RunDir, RunDirError
from echo_jax.util import stop_signals
from experiments import launch  # --coordinator_address, --num_processes, --process_id

LOSS_FLAGS = define_flags(  # One flag per LossConfig field, as in experiments.train.
    C.LossConfig,
    choices={
        k: v for k, v in config_flags.RUN_CHOICES.items() if k in C.LossConfig.__annotations__
    },
    skip=("advantage",),  # On-policy updates always use group advantages.
    rename={"impl": "loss_impl"},
    optional=True,
    note="Unset: the start run's value (λ: 0 for an objective λ does not scale; --lam at the "
    "first iteration of the schedule).",
)
flags.DEFINE_string(
    "start",
    "data/warm_start",
    "Training run to start from (its model, vocabulary and data settings), or a Hugging Face "
    "checkpoint folder (docs/models.md); '' from scratch.",
)
flags.DEFINE_integer(
    "max_len",
    None,
    "Tokens per row and cache row (default: the start's; DataConfig's for a checkpoint folder); "
    "longer holds long tool lists.",
)
flags.DEFINE_enum("model_size", "tiny", list(C.MODEL_PRESETS), "From scratch: model preset.")
flags.DEFINE_list("data", list(C.DEFAULT_DATA), "From scratch: the data that builds the vocab.")
flags.DEFINE_string("workdir", None, "Run directory (default: runs/rl_<objective>_<time>).")
flags.DEFINE_string("worlds", "data/awm_worlds", "AWM-format world folder.")
flags.DEFINE_string("corpus", "data/corpus", "Corpus whose manifest assigns task splits.")
RL_FLAGS = define_flags(  # One flag per RLConfig field, its help the field's comment.
    C.RLConfig,
    choices={
        "lam_schedule": C.LAM_SCHEDULES,
        "split": C.SPLITS,
        "eval_split": [*C.SPLITS, ""],
    },  # fmt: skip
)
flags.DEFINE_bool(
    "probe_only",
    False,
    "Only probe every task of --split from --start (--pool_probe samples each, --pool_seed) "
    "and write its difficulty table into --difficulty_out; no training.",
)
flags.DEFINE_bool(
    "resume",
    False,
    "Continue the run in --workdir from its last finished iteration (same settings).",
)
flags.DEFINE_string(
    "difficulty_out", "results/task_difficulty.json", "--probe_only: the file of the tables."
)
JAX_CACHE = config_flags.define_jax_cache_flag()
flags.adopt_module_key_flags(config_flags)  # So that --help lists them.
flags.adopt_module_key_flags(launch)
FLAGS = flags.FLAGS


def rl_config_from_flags() -> C.RLConfig:
    return C.validate_rl(from_flags(C.RLConfig, RL_FLAGS))


def run_config_from_flags() -> C.Config:
    """The start run's config (or a fresh one) with the loss flags applied."""
    if FLAGS.start and is_hf_folder(FLAGS.start):  # A checkpoint folder: default settings.
        base = C.Config(model=C.ModelConfig(hf_path=os.path.abspath(FLAGS.start)))
    elif FLAGS.start:
        path = RunDir(FLAGS.start).file(RunDir.CONFIG)
        if not os.path.exists(path):
            raise C.ConfigError(f"--start={FLAGS.start}: no {RunDir.CONFIG}; is it a run?")
        with open(path) as f:
            base = C.Config.from_dict(json.load(f))
    else:
        base = C.Config(
            model=C.MODEL_PRESETS[FLAGS.model_size], data=C.DataConfig(paths=tuple(FLAGS.data))
        )
    objective = FLAGS.objective or base.loss.objective
    uses_lam = objective_spec(objective).uses_lam
    if not uses_lam and FLAGS["lam"].present and FLAGS.lam != 0:
        scaled = "|".join(o for o in OBJECTIVES if objective_spec(o).uses_lam)
        raise C.ConfigError(f"--lam only applies to --objective={scaled}, not {objective}")
    loss = replace_from_flags(dataclasses.replace(base.loss, advantage="group"), LOSS_FLAGS)
    if not uses_lam:
        loss = dataclasses.replace(loss, lam=0.0)
    return C.validate(dataclasses.replace(base, loss=loss))


def probe(rl: C.RLConfig) -> None:
    if not FLAGS.start or not FLAGS.corpus:
        raise C.ConfigError("--probe_only needs --start and --corpus (scripted successes)")
    table = write_task_difficulty(FLAGS.difficulty_out, FLAGS.start, rl, FLAGS.worlds,
                                  FLAGS.corpus)  # fmt: skip
    print(json.dumps({"start": FLAGS.start, "out": FLAGS.difficulty_out,
                      "band_counts": table["band_counts"]}))  # fmt: skip


def main(argv: list[str]) -> None:
    stop_signals.stop_on_signals()  # SIGTERM cleans up as Ctrl-C does.
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    config_flags.apply_jax_cache(JAX_CACHE)
    try:
        rl = rl_config_from_flags()
        cfg = run_config_from_flags()
        if FLAGS.probe_only:
            probe(rl)
            return
        launch.initialize(FLAGS.workdir)  # Before anything touches JAX.
        stamp = time.strftime("%Y%m%d_%H%M%S")
        workdir = FLAGS.workdir or f"runs/rl_{cfg.loss.objective}_{stamp}"
        summary = run_rl(
            workdir,
            rl,
            start=FLAGS.start or None,
            cfg=cfg,
            worlds=FLAGS.worlds,
            corpus_dir=FLAGS.corpus or None,
            resume=FLAGS.resume,
            max_len=FLAGS.max_len,
        )
    except (C.ConfigError, EpisodeError, RunDirError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    if distributed.is_primary():
        print(json.dumps({k: summary[k] for k in ("iterations", "env_steps", "wall_s", "pool")}))


if __name__ == "__main__":
    app.run(main)
