"""Closed-loop evaluation of a training run's agent in the local AWM worlds.

    python -m experiments.evaluate --checkpoint=runs/echo_x --split=heldout_tasks --samples=4 \
        [--temperature=1.0 --top_p=1.0 --max_steps=30 --max_tasks=N] \
        [--worlds=data/awm_worlds --corpus=data/corpus --out=DIR]

Logic in echo_jax.agent.closed_loop.evaluate_checkpoint; metrics are printed as JSON and written
with the rollouts (capture format) to --out (default CHECKPOINT/closed_loop/<split>_step<step>).
"""

from __future__ import annotations

import json

from absl import app, flags, logging

from echo_jax import config as C
from echo_jax import config_flags
from echo_jax.agent.closed_loop import evaluate_checkpoint
from echo_jax.config_flags import define_flags, from_flags
from echo_jax.util import stop_signals

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Training run workdir, or a Hugging Face checkpoint folder.", required=True
)
_SPLIT = flags.DEFINE_enum("split", "heldout_tasks", C.SPLITS, "Corpus split whose tasks to run.")
_SAMPLES = flags.DEFINE_integer("samples", 4, "Sampled episodes per task (K), besides greedy.")
AGENT_FLAGS = define_flags(C.AgentConfig)  # One flag per AgentConfig field.
flags.adopt_module_key_flags(config_flags)
_MAX_TASKS = flags.DEFINE_integer("max_tasks", None, "Evaluate a fixed random subset of tasks.")
_WORLDS = flags.DEFINE_string("worlds", "data/awm_worlds", "AWM-format world folder.")
_CORPUS = flags.DEFINE_string("corpus", "data/corpus", "Corpus folder ('' : all world tasks).")
_SCENARIOS = flags.DEFINE_list("scenarios", None, "Only these scenarios.")
_POSITIONS = flags.DEFINE_integer(
    "tool_call_positions", 64, "Teacher-forced positions for tool-call accuracy (0: skip)."
)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_MAX_LEN = flags.DEFINE_integer(
    "max_len", None, "Tokens per cache row (default: the run's); longer holds long tool lists."
)
_SEED = flags.DEFINE_integer("seed", 0, "Sampling and task-subset seed.")
_OUT = flags.DEFINE_string("out", None, "Output folder for rollouts and metrics.")
_JAX_CACHE = config_flags.define_jax_cache_flag()


def main(argv: list[str]) -> None:
    stop_signals.stop_on_signals()  # SIGTERM cleans up as Ctrl-C does.
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    config_flags.apply_jax_cache(_JAX_CACHE)
    agent = from_flags(C.AgentConfig, AGENT_FLAGS)
    metrics = evaluate_checkpoint(
        _CHECKPOINT.value,
        _SPLIT.value,
        _SAMPLES.value,
        worlds=_WORLDS.value,
        corpus_dir=_CORPUS.value or None,
        agent=agent,
        max_tasks=_MAX_TASKS.value,
        scenarios=_SCENARIOS.value,
        tool_call_positions=_POSITIONS.value,
        seed=_SEED.value,
        out=_OUT.value,
        step=_STEP.value,
        max_len=_MAX_LEN.value,
    )
    print(json.dumps(metrics, indent=2, sort_keys=True))


if __name__ == "__main__":
    app.run(main)
