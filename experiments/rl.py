"""On-policy GRPO / ECHO / verifier-free in the local AWM worlds.

    python -m experiments.rl --objective=echo --lam=0.05   # from data/warm_start
    python -m experiments.rl --objective=grpo --start=''   # from scratch (--model_size, --data)

Each iteration samples --group_size rollouts of --tasks_per_iteration training tasks with the
current policy, scores them with the tasks' verifiers, and updates with echo_loss (PPO-clip on
the sampling policy's log-probs). Logic in echo_jax.rl.run_rl; metrics per iteration in
WORKDIR/metrics.jsonl, rollouts in WORKDIR/rollouts/ (capture format).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

from absl import app, flags, logging

from echo_jax import config as C
from echo_jax.episodes import EpisodeError
from echo_jax.rl import run_rl
from echo_jax.run_dir import RunDir, RunDirError

_R, _L = C.RLConfig(), C.LossConfig()

flags.DEFINE_enum("objective", _L.objective, C.OBJECTIVES, "Which loss terms train the policy.")
flags.DEFINE_float("lam", _L.lam, "λ at the first iteration (objective=echo only).")
flags.DEFINE_float("clip_eps", _L.clip_eps, "PPO clip range.")
flags.DEFINE_string(
    "start",
    "data/warm_start",
    "Training run to start from (its model, vocabulary and data settings); '' from scratch.",
)
flags.DEFINE_enum("model_size", "tiny", list(C.MODEL_PRESETS), "From scratch: model preset.")
flags.DEFINE_list("data", list(C.DEFAULT_DATA), "From scratch: the data that builds the vocab.")
flags.DEFINE_string("workdir", None, "Run directory (default: runs/rl_<objective>_<time>).")
flags.DEFINE_string("worlds", "data/awm_worlds", "AWM-format world folder.")
flags.DEFINE_string("corpus", "data/corpus", "Corpus whose manifest assigns task splits.")
flags.DEFINE_integer("iterations", _R.iterations, "Rollout-then-update rounds (upper bound).")
flags.DEFINE_integer("env_steps", _R.env_steps, "Stop after this many tool calls (0: off).")
flags.DEFINE_integer("tasks_per_iteration", _R.tasks_per_iteration, "Tasks per iteration.")
flags.DEFINE_integer("group_size", _R.group_size, "G: rollouts per task.")
flags.DEFINE_float("temperature", _R.temperature, "Rollout sampling temperature.")
flags.DEFINE_float("top_p", _R.top_p, "Rollout nucleus sampling mass.")
flags.DEFINE_integer("max_new_tokens", _R.max_new_tokens, "Token budget per generated call.")
flags.DEFINE_integer("max_steps", _R.max_steps, "Tool calls per rollout before forced verify.")
flags.DEFINE_integer("epochs", _R.epochs, "Passes over each iteration's rows.")
flags.DEFINE_integer("minibatch_size", _R.minibatch_size, "Rows per update step.")
flags.DEFINE_float("learning_rate", _R.learning_rate, "Constant AdamW learning rate.")
flags.DEFINE_enum("lam_schedule", _R.lam_schedule, C.LAM_SCHEDULES, "λ over iterations.")
flags.DEFINE_float("lam_final", _R.lam_final, "λ at the last iteration (linear schedule).")
flags.DEFINE_float("lam_decay", _R.lam_decay, "Factor per decay (step schedule).")
flags.DEFINE_integer("lam_step_every", _R.lam_step_every, "Iterations per decay (step).")
flags.DEFINE_float("min_valid_call_share", _R.min_valid_call_share, "Env-term rollout filter.")
flags.DEFINE_float("min_parse_share", _R.min_parse_share, "Env-term rollout filter.")
flags.DEFINE_float("format_penalty", _R.format_penalty, "Reward − this × format-error share.")
flags.DEFINE_integer("workers", _R.workers, "Worlds stepped in parallel.")
flags.DEFINE_enum("split", _R.split, C.SPLITS, "Corpus split trained on.")
flags.DEFINE_integer("eval_every", _R.eval_every, "Iterations between held-out pass@1 runs.")
flags.DEFINE_enum(
    "eval_split", _R.eval_split, [*C.SPLITS, "none"], "Split of the held-out pass@1 runs."
)
flags.DEFINE_integer("eval_max_tasks", _R.eval_max_tasks, "Tasks of those runs (0: all).")
flags.DEFINE_integer("seed", _R.seed, "Task draws and sampling keys.")
FLAGS = flags.FLAGS
RL_FLAGS = tuple(f.name for f in dataclasses.fields(C.RLConfig))  # One flag per field.


def rl_config_from_flags() -> C.RLConfig:
    values = {name: FLAGS[name].value for name in RL_FLAGS}
    values["eval_split"] = "" if values["eval_split"] == "none" else values["eval_split"]
    return C.validate_rl(C.RLConfig(**values))


def run_config_from_flags() -> C.Config:
    """The start run's config (or a fresh one) with the loss flags applied."""
    if FLAGS.start:
        path = RunDir(FLAGS.start).file(RunDir.CONFIG)
        if not os.path.exists(path):
            raise C.ConfigError(f"--start={FLAGS.start}: no {RunDir.CONFIG}; is it a run?")
        with open(path) as f:
            base = C.Config.from_dict(json.load(f))
    else:
        base = C.Config(
            model=C.MODEL_PRESETS[FLAGS.model_size], data=C.DataConfig(paths=tuple(FLAGS.data))
        )
    if FLAGS.objective != "echo" and FLAGS["lam"].present and FLAGS.lam != 0:
        raise C.ConfigError(f"--lam only applies to --objective=echo, not {FLAGS.objective}")
    lam = FLAGS.lam if FLAGS.objective == "echo" else 0.0
    loss = dataclasses.replace(  # On-policy updates always use group advantages.
        base.loss, objective=FLAGS.objective, lam=lam, clip_eps=FLAGS.clip_eps, advantage="group"
    )
    return C.validate(dataclasses.replace(base, loss=loss))


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    try:
        rl = rl_config_from_flags()
        cfg = run_config_from_flags()
        workdir = FLAGS.workdir or f"runs/rl_{FLAGS.objective}_{time.strftime('%Y%m%d_%H%M%S')}"
        summary = run_rl(
            workdir,
            rl,
            start=FLAGS.start or None,
            cfg=cfg,
            worlds=FLAGS.worlds,
            corpus_dir=FLAGS.corpus or None,
        )
    except (C.ConfigError, EpisodeError, RunDirError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    print(json.dumps({k: summary[k] for k in ("iterations", "env_steps", "wall_s")}))


if __name__ == "__main__":
    app.run(main)
