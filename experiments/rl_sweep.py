"""The on-policy experiment: grpo vs echo (the offline ablation's best λ and its neighbours) vs
verifier_free, five seeds each, the same task pool and the same number of iterations.

    python -m experiments.rl_sweep                  # runs, then results/rl.csv, RL.md, plots
    python -m experiments.rl_sweep --report_only    # the report from the finished runs

Every flag of experiments.rl is accepted and passed to each run (the per-run flags --objective,
--lam, --seed and --workdir are set by the grid). Runs are subprocesses, --parallel at a time;
finished runs are skipped, an interrupted one restarts. The pool is chosen once
(ROOT/pool.json) from the start checkpoint. Defaults sized for 2 CPU cores: a 2-task pool,
8 iterations of G=8 rollouts per task.
"""

from __future__ import annotations

import os
import shlex
import sys

from absl import app, flags, logging

from echo_jax import config as C
from echo_jax.objective.objectives import OBJECTIVES
from echo_jax.reports import rl_report, rl_sweep, sweep
from echo_jax.rl.pool import load_pool, make_pool
from experiments import rl as rl_cli  # Defines the per-run flags, forwarded to every run.

flags.DEFINE_list("objectives", list(OBJECTIVES), "Objectives of the grid.")
flags.DEFINE_list("lams", ["auto"], "λ of the echo arms, or 'auto' (from --ablation_csv).")
flags.DEFINE_string(
    "ablation_csv", "results/ablation.csv", "--lams=auto: the offline ablation to pick λ from."
)
flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "Seeds; every arm runs each.")
flags.DEFINE_list(
    "thresholds",
    ["0.8", "0.6"],
    "Success thresholds of steps-to-threshold; the first is rl_summary.json's.",
)
flags.DEFINE_integer("threshold_window", 3, "Iterations of the moving average that must reach it.")
flags.DEFINE_string("root", "runs/rl_sweep", "Folder holding one workdir per run.")
flags.DEFINE_string("results", "results", "Folder for rl.csv, RL.md and plots.")
flags.DEFINE_integer("parallel", 1, "Runs at a time (subprocesses).")
flags.DEFINE_bool("report_only", False, "Only regenerate the report from finished runs.")
flags.DEFINE_string("machine", "", "Where the runs ran, for the report (default: this host).")
FLAGS = flags.FLAGS
FLAGS.set_default("start", "data/warm_start")
FLAGS.set_default("iterations", 8)
FLAGS.set_default("pool_size", 2)

_PER_RUN = ("objective", "lam", "seed", "workdir")
_FORWARDED = ("start", "worlds", "corpus", *(n for n in rl_cli.RL_FLAGS if n != "seed"))


def forwarded_flags() -> list[str]:
    """Every shared experiments.rl flag, spelled out, so each run's command is complete; of
    the loss flags (unset: the start run's value), those given."""
    loss = [FLAGS[name].serialize() for name in rl_cli.LOSS_FLAGS.values()
            if FLAGS[name].present and name not in _PER_RUN]  # fmt: skip
    return [FLAGS[name].serialize() for name in _FORWARDED] + loss


def lams_from_flags() -> list[float]:
    if FLAGS.lams == ["auto"]:
        return rl_sweep.choose_lams(FLAGS.ablation_csv)
    try:
        return [float(x) for x in FLAGS.lams]
    except ValueError as e:
        raise C.ConfigError(f"--lams must be numbers or 'auto' ({e})") from None


def machine() -> str:
    if FLAGS.machine:
        return FLAGS.machine
    import platform

    import jax

    backend = f"JAX {jax.__version__} on {jax.default_backend()}"
    return f"{platform.node()} ({os.cpu_count()} CPUs, {backend})"


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    given = [f"--{name}" for name in _PER_RUN if FLAGS[name].present]
    if given:
        raise SystemExit(f"error: {', '.join(given)} set per run by the grid")
    try:
        rl_cli.rl_config_from_flags()  # Bad settings fail here, before any run starts.
        lams = lams_from_flags()
        arms = sweep.arms(FLAGS.objectives, lams)
        seeds = [int(s) for s in FLAGS.seeds]
    except (C.ConfigError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    pool = FLAGS.pool_file or os.path.join(FLAGS.root, "pool.json")  # One for every run.
    if not os.path.exists(pool) and not FLAGS.report_only:
        os.makedirs(FLAGS.root, exist_ok=True)
        print(f"rl_sweep: choosing the task pool into {pool}", flush=True)
        make_pool(pool, FLAGS.start, rl_cli.rl_config_from_flags(), FLAGS.worlds,
                  FLAGS.corpus or None)  # fmt: skip
    FLAGS.pool_file = pool
    tasks = ", ".join(f"{s}/{t}" for s, t in load_pool(pool)) if os.path.exists(pool) else "?"
    specs = rl_sweep.specs(arms, seeds, FLAGS.root, forwarded_flags())
    # The command that makes the runs: --report_only and --machine only rewrite the report.
    run_args = [a for a in sys.argv[1:] if not a.startswith(("--report_only", "--machine"))]
    command = shlex.join(["python", "-m", "experiments.rl_sweep", *run_args])
    if not FLAGS.report_only:
        print(f"rl_sweep: {len(specs)} runs under {FLAGS.root}, λ {lams}", flush=True)
        outcomes = rl_sweep.run_all(specs, FLAGS.parallel, lambda m: print(m, flush=True))
        failed = [o["name"] for o in outcomes if o["returncode"] != 0]
        if failed:
            print(f"failed runs (see their .log): {', '.join(failed)}", flush=True)
    rows = rl_report.collect(specs)
    if not rows:
        raise SystemExit(f"error: no finished iterations under {FLAGS.root}")
    setup = (
        f"Runs made by `{command}` on {machine()}. Start checkpoint `{FLAGS.start}`; "
        f"each run: the pool of `{FLAGS.pool_file}` ({tasks}) x G={FLAGS.group_size} rollouts "
        f"per iteration (at most {FLAGS.max_steps} tool calls), {FLAGS.iterations} iterations, "
        f"{FLAGS.epochs} epoch(s) of PPO-clip minibatch updates (B={FLAGS.minibatch_size}, "
        f"lr {FLAGS.learning_rate:g}); λ schedule "
        f"{FLAGS.lam_schedule}; held-out pass@1 on {FLAGS.eval_max_tasks or 'all'} "
        f"{FLAGS.eval_split} tasks."
    )
    commands = {spec.name: spec.command for spec in specs}
    thresholds = [float(x) for x in FLAGS.thresholds]
    for path in rl_report.write(rows, FLAGS.results, commands, setup, thresholds,
                                FLAGS.threshold_window):  # fmt: skip
        print(f"wrote {path}")


if __name__ == "__main__":
    app.run(main)
