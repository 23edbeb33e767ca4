"""The λ ablation: grpo, echo at each λ, verifier_free; several seeds; one results table.

    python -m experiments.sweep                    # the default grid, resumable; writes results/
    python -m experiments.sweep --report_only      # tables, plots, docs/results.md from the CSV
    python -m experiments.sweep --closed_loop=agent   # fill pass@1 / pass@k of finished runs

Every arm shares the training flags of experiments.train (--data, --steps, --model_size, ...);
--objectives, --lams and --seeds choose the grid, which replaces --objective, --lam, --seed and
--workdir. Runs live in <root>/<arm>_seed<s>; a finished run is skipped, an interrupted one
resumed. Outputs in --results: ablation.csv, ablation.json, ABLATION.md, *.png; with the
default --results, the summary section of --page (docs/results.md) too.

The default size (7 arms × 3 seeds × SWEEP_STEPS steps of the tiny model, held-out evaluation
every SWEEP_EVAL_EVERY steps on SWEEP_EVAL_MAX_ROWS rows per set) is chosen to finish on 2 CPU
cores in a little over an hour; docs/results.md gives the costs it was sized from. On an
accelerator raise --steps (and --model_size).
"""

from __future__ import annotations

import os
import shlex
import sys

from absl import app, flags, logging

from echo_jax import config as C
from echo_jax import config_flags
from echo_jax.data.episodes import EpisodeError
from echo_jax.objective.objectives import OBJECTIVES
from echo_jax.reports import ablation_report, results, sweep
from echo_jax.train.run_dir import RunDirError
from echo_jax.util import stop_signals
from experiments import train as train_cli  # Defines the shared training flags.

# Sized for 2 CPU cores (docs/results.md, "Sizing the default sweep").
SWEEP_STEPS = 150
SWEEP_EVAL_EVERY = 50
SWEEP_EVAL_MAX_ROWS = 16

flags.DEFINE_list("objectives", list(OBJECTIVES), "Objectives of the grid.")
flags.DEFINE_list("lams", ["0.005", "0.01", "0.05", "0.1", "0.5"], "λ values of the echo arms.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds; every arm runs each.")
flags.DEFINE_string("root", "runs/sweep", "Folder holding one workdir per run.")
flags.DEFINE_string("results", "results", "Folder for ablation.csv, ABLATION.md and plots.")
flags.DEFINE_bool("report_only", False, "Regenerate the report from <results>/ablation.csv.")
flags.DEFINE_string(
    "page",
    "docs/results.md",
    "Docs page whose results section (between its markers) is rewritten; only for the default "
    "--results folder, so a sweep written elsewhere (a test, a trial) never touches it.",
)
flags.DEFINE_enum(
    "closed_loop",
    "none",
    ["none", "agent"],
    "pass@1 / pass@k per finished run: none (empty columns) or the agent in the AWM worlds "
    "(echo_jax.agent.closed_loop); rerun with 'agent' to fill them in for finished runs.",
)
flags.DEFINE_enum("closed_loop_split", "heldout_tasks", C.SPLITS, "Tasks the agent is run on.")
flags.DEFINE_integer("closed_loop_samples", 4, "K sampled episodes per task (pass@K), + greedy.")
flags.DEFINE_integer("closed_loop_max_tasks", 8, "Fixed random subset of tasks (0: all).")
flags.DEFINE_integer("closed_loop_max_steps", 8, "Tool calls per episode before forced verify.")
flags.DEFINE_integer("closed_loop_max_new_tokens", 128, "Token budget per generated call.")
flags.DEFINE_integer(
    "closed_loop_positions", 16, "Teacher-forced positions for tool-call accuracy (0: skip)."
)
flags.DEFINE_string("worlds", "data/awm_worlds", "AWM-format world folder for --closed_loop.")
JAX_CACHE = config_flags.define_jax_cache_flag()
FLAGS = flags.FLAGS
FLAGS.set_default("data", ["data/corpus"])
FLAGS.set_default("steps", SWEEP_STEPS)
FLAGS.set_default("eval_every", SWEEP_EVAL_EVERY)
FLAGS.set_default("eval_max_rows", SWEEP_EVAL_MAX_ROWS)
FLAGS.set_default("checkpoint_every", SWEEP_EVAL_EVERY)

_PER_RUN = ("objective", "lam", "seed", "workdir", "resume")


def command_line() -> str:
    """The invocation as typed (absl leaves sys.argv alone), for the report."""
    return shlex.join(["python", "-m", "experiments.sweep", *sys.argv[1:]])


def specs_from_flags() -> list[sweep.RunSpec]:
    given = [f"--{name}" for name in _PER_RUN if FLAGS[name].present]
    if given:
        raise C.ConfigError(
            f"{', '.join(given)} set per run by the sweep; use --objectives/--lams/--seeds/--root"
        )
    try:
        lams, seeds = [float(x) for x in FLAGS.lams], [int(x) for x in FLAGS.seeds]
    except ValueError as e:
        raise C.ConfigError(f"--lams must be numbers and --seeds integers ({e})") from None
    arms = sweep.arms(FLAGS.objectives, lams)  # An unregistered objective: a ConfigError.
    base = train_cli.config_from_flags()
    return sweep.grid(base, arms, seeds, FLAGS.root)


def closed_loop_from_flags() -> sweep.ClosedLoopFn | None:
    if FLAGS.closed_loop == "none":
        return None
    return sweep.agent_closed_loop(
        split=FLAGS.closed_loop_split,
        samples=FLAGS.closed_loop_samples,
        max_tasks=FLAGS.closed_loop_max_tasks or None,
        worlds=FLAGS.worlds,
        agent=C.AgentConfig(
            max_steps=FLAGS.closed_loop_max_steps,
            max_new_tokens=FLAGS.closed_loop_max_new_tokens,
        ),
        tool_call_positions=FLAGS.closed_loop_positions,
    )


def write_page(out: str, rows: list[dict], command: str) -> None:
    """The summary section of --page, for the default --results folder only."""
    if FLAGS["results"].present and FLAGS.results != FLAGS["results"].default:
        return
    if not FLAGS.page or not os.path.exists(FLAGS.page):
        return
    if ablation_report.write_section(FLAGS.page, rows, command, out):
        print(f"updated the results section of {FLAGS.page}")


def main(argv: list[str]) -> None:
    stop_signals.stop_on_signals()  # SIGTERM cleans up as Ctrl-C does.
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    out = FLAGS.results
    try:
        if FLAGS.report_only:
            if not os.path.exists(os.path.join(out, results.CSV_NAME)):
                raise C.ConfigError(f"--report_only: no {results.CSV_NAME} in {out}; run the sweep")
            rows, command = ablation_report.load(out)
            for path in ablation_report.write_report(rows, out, command):
                print(f"wrote {path}")
            write_page(out, rows, command)
            return
        specs = specs_from_flags()
        hook = closed_loop_from_flags()
        config_flags.apply_jax_cache(JAX_CACHE)
        command = command_line()
        print(f"sweep: {len(specs)} runs under {FLAGS.root}", flush=True)
        sweep.write_meta(os.path.join(out, results.META_NAME), command, specs)
        csv_path = os.path.join(out, results.CSV_NAME)
        rows = sweep.run_sweep(
            specs,
            closed_loop=hook,
            log=lambda m: print(m, flush=True),
            after_each=lambda rows: results.write_csv(rows, csv_path),  # --report_only mid-way
        )
        results.write_csv(rows, csv_path)
        for path in ablation_report.write_report(rows, out, command):
            print(f"wrote {path}")
        write_page(out, rows, command)
    except (C.ConfigError, EpisodeError, RunDirError, sweep.SweepError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    app.run(main)
