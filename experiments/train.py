"""Train a tiny Flax transformer on captured AWM episodes with grpo, echo or verifier_free.

python -m experiments.train --objective=echo

As N processes (README, "Launch on a cluster"): the same command in each, with
--coordinator_address, --num_processes and --process_id (or JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID, or under srun / mpirun nothing at all).
"""

from __future__ import annotations

import dataclasses
import time

from absl import app, flags, logging

from echo_jax import config as C
from echo_jax.data.episodes import EpisodeError
from echo_jax.train import distributed
from echo_jax.train.run_dir import RunDirError
from echo_jax.train.trainer import TrainingDiverged, run_experiment

_D, _T, _L, _E = C.DataConfig(), C.TrainConfig(), C.LossConfig(), C.EvalConfig()

flags.DEFINE_enum("objective", _L.objective, C.OBJECTIVES, "Which loss terms train the model.")
flags.DEFINE_float("lam", _L.lam, "λ, the env cross-entropy weight (objective=echo only).")
flags.DEFINE_enum(
    "world_loss_target",
    _L.world_loss_target,
    C.WORLD_LOSS_TARGETS,
    "Env-term targets: ENV_OUTPUT only, or all (ENV_OUTPUT + WARNING).",
)
flags.DEFINE_enum(
    "world_loss_normalization",
    _L.world_loss_normalization,
    C.WORLD_LOSS_NORMALIZATIONS,
    "How the env term is normalised.",
)
flags.DEFINE_enum(
    "pg_loss_reduction",
    _L.pg_loss_reduction,
    C.PG_LOSS_REDUCTIONS,
    "How the action term is averaged.",
)
flags.DEFINE_enum(
    "advantage",
    _L.advantage,
    C.ADVANTAGES,
    "Action-term weights: group-relative advantages, or raw rewards (a warm start for RL).",
)
flags.DEFINE_list("data", list(_D.paths), "Episode files or globs (.json, .jsonl, .jsonl.gz).")
flags.DEFINE_string("workdir", None, "Run directory (default: runs/<objective>_<time>).")
flags.DEFINE_bool("resume", False, "Continue the run already in --workdir.")
flags.DEFINE_integer("steps", _T.steps, "Optimiser steps.")
flags.DEFINE_integer("batch_size", _T.batch_size, "Rows per step.")
flags.DEFINE_integer("max_len", _D.max_len, "Tokens per row (T).")
flags.DEFINE_enum(
    "overflow",
    _D.overflow,
    C.OVERFLOW_MODES,
    "Episodes longer than max_len: split into windows, or truncate.",
)
flags.DEFINE_integer(
    "vocab_size", _D.vocab_size, "Cap on the compact vocabulary; 0: full cl100k (--loss_impl)."
)
flags.DEFINE_string(
    "cache_dir", "~/.cache/echo_jax", "Cache of packed arrays by content hash; empty: none."
)
flags.DEFINE_enum(
    "loss_impl",
    _L.impl,
    C.LOSS_IMPLS,
    "plain: [B,T,V] logits; chunked: fused, for large V; auto: chunked on CPU.",
)
flags.DEFINE_integer("chunk_size", _L.chunk_size, "Target tokens per chunk (--loss_impl=chunked).")
flags.DEFINE_bool("canonical_json", _D.canonical_json, "Canonicalise tool-result JSON.")
flags.DEFINE_bool(
    "skip_invalid",
    _D.skip_invalid,
    "Skip invalid or duplicate episodes (logged, grouped by reason) instead of stopping.",
)
flags.DEFINE_integer("seed", _T.seed, "Initialisation and data-order seed.")
flags.DEFINE_float("learning_rate", _T.learning_rate, "Peak AdamW learning rate.")
flags.DEFINE_integer("log_every", _T.log_every, "Steps between metrics lines.")
flags.DEFINE_integer("checkpoint_every", _T.checkpoint_every, "Steps between checkpoints.")
flags.DEFINE_integer(
    "steps_per_call", _T.steps_per_call, "Optimiser steps per jitted call (same training)."
)
flags.DEFINE_enum("model_size", "tiny", list(C.MODEL_PRESETS), "Model preset.")
flags.DEFINE_integer("d_model", None, "Override the preset's width.")
flags.DEFINE_integer("n_layers", None, "Override the preset's depth.")
flags.DEFINE_integer("n_heads", None, "Override the preset's attention heads.")
flags.DEFINE_enum(
    "attention", None, C.ATTENTION_IMPLS, "Override the preset's attention backend (auto)."
)
flags.DEFINE_integer("d_ff", None, "Override the preset's MLP width.")
flags.DEFINE_integer("eval_every", _E.every, "Steps between held-out evals (0: only at the end).")
flags.DEFINE_list(
    "eval_splits",
    list(_E.splits),
    f"Sets evaluated into eval.jsonl, from {', '.join(C.EVAL_SPLITS)}; empty: no evaluation.",
)
flags.DEFINE_integer("eval_max_rows", _E.max_rows, "Rows evaluated per set (fixed subsample).")
flags.DEFINE_string("eval_real", _E.real_path, "The real capture evaluated as set 'real'.")
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
    if FLAGS["lam"].present and FLAGS.objective != "echo":
        raise C.ConfigError(f"--lam only applies to --objective=echo, not {FLAGS.objective}")
    overrides = {k: FLAGS[k].value for k in ("d_model", "n_layers", "n_heads", "d_ff", "attention")}
    model = dataclasses.replace(
        C.MODEL_PRESETS[FLAGS.model_size], **{k: v for k, v in overrides.items() if v is not None}
    )
    return C.validate(
        C.Config(
            model=model,
            loss=dataclasses.replace(
                _L,
                objective=FLAGS.objective,
                lam=FLAGS.lam if FLAGS.objective == "echo" else 0.0,
                world_loss_target=FLAGS.world_loss_target,
                world_loss_normalization=FLAGS.world_loss_normalization,
                pg_loss_reduction=FLAGS.pg_loss_reduction,
                advantage=FLAGS.advantage,
                impl=FLAGS.loss_impl,
                chunk_size=FLAGS.chunk_size,
            ),
            data=dataclasses.replace(
                _D,
                paths=tuple(FLAGS.data),
                max_len=FLAGS.max_len,
                overflow=FLAGS.overflow,
                vocab_size=FLAGS.vocab_size,
                canonical_json=FLAGS.canonical_json,
                cache_dir=FLAGS.cache_dir,
                skip_invalid=FLAGS.skip_invalid,
            ),
            train=dataclasses.replace(
                _T,
                steps=FLAGS.steps,
                batch_size=FLAGS.batch_size,
                seed=FLAGS.seed,
                learning_rate=FLAGS.learning_rate,
                log_every=FLAGS.log_every,
                checkpoint_every=FLAGS.checkpoint_every,
                steps_per_call=FLAGS.steps_per_call,
            ),
            eval=dataclasses.replace(
                _E,
                every=FLAGS.eval_every,
                splits=tuple(FLAGS.eval_splits),
                max_rows=FLAGS.eval_max_rows,
                real_path=FLAGS.eval_real,
            ),
        )
    )


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
        workdir = FLAGS.workdir or f"runs/{FLAGS.objective}_{time.strftime('%Y%m%d-%H%M%S')}"
        run_experiment(cfg, workdir, resume=FLAGS.resume)
    except (C.ConfigError, EpisodeError, RunDirError, TrainingDiverged) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    app.run(main)
