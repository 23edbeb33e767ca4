"""The on-policy grid in ECHO's own regime: sparse reward, from a start that never solves most
pool tasks, grpo against echo seed by seed.

    python -m experiments.rl_sweep                  # runs, then results/RL.md and the rest
    python -m experiments.rl_sweep --report_only    # the report from results/rl/*/ alone

The pool is drawn once by difficulty band (--pool_difficulty, made by `experiments.rl
--probe_only`) into ROOT/<grid>/pool.json. An arm is `objective[:λ][:flag=value...]`; λ may be
L (or L/k): the λ of the rule λ·|∇L_env| = 0.5·|∇L_pg|, measured before any grid run by
one-iteration runs at the start (--calibration_seeds) and written into grid.json. The primary
arms run on --seeds, then the secondary ones on --secondary_seeds, seed by seed. Finished runs
are skipped and an interrupted one resumes from its last finished iteration; each finished
run's small files go to results/rl/<grid>/<run>/ (commit them), the rollouts and checkpoints
stay in ROOT. Every flag of experiments.rl is passed to each run.
"""

from __future__ import annotations

import glob
import json
import os
import platform
import shlex
import subprocess
import sys

from absl import app, flags, logging

from echo_jax import config as C
from echo_jax.reports import rl_markdown, rl_report, rl_sweep
from echo_jax.rl.pool import make_pool
from echo_jax.util import stop_signals
from echo_jax.util.atomic import atomic_write_text
from experiments import rl as rl_cli  # Defines the per-run flags, forwarded to every run.

flags.DEFINE_string("grid", "sparse", "The grid's name: results/rl/<grid>/ and ROOT/<grid>/.")
flags.DEFINE_enum("regime", "sparse", list(rl_report.REGIMES), "Which regime the grid is.")
flags.DEFINE_string(
    "title", "Sparse reward: a pool the start (almost) never solves", "The grid's heading in RL.md."
)
flags.DEFINE_list("primary_arms", ["grpo", "echo:L"], "Arms run on --seeds.")
flags.DEFINE_list(
    "secondary_arms",
    ["echo:L/4", "echo:L:weight_verifier=0", "verifier_free"],
    "Arms run on --secondary_seeds, after the primary ones.",
)
flags.DEFINE_list("seeds", [str(s) for s in range(8)], "Seeds of the primary arms.")
flags.DEFINE_list("secondary_seeds", [str(s) for s in range(4)], "Seeds of the secondary arms.")
flags.DEFINE_list(
    "calibration_seeds",
    ["100", "101", "102", "103"],
    "Seeds of the one-iteration runs that measure the λ rule's gradients.",
)
flags.DEFINE_string("root", "runs/rl_sweep", "Folder holding one workdir per run.")
flags.DEFINE_string("results", "results", "Folder of RL.md, rl_summary.json, plots and rl/.")
flags.DEFINE_integer("parallel", 1, "Runs at a time (subprocesses).")
flags.DEFINE_bool("report_only", False, "Only regenerate the report from results/rl/*/.")
flags.DEFINE_string("machine", "", "Where the runs run, for the report (default: this host).")
FLAGS = flags.FLAGS
FLAGS.set_default("start", "data/warm_start_bc")
FLAGS.set_default("pool_difficulty", "results/task_difficulty.json")
FLAGS.set_default("iterations", 12)
FLAGS.set_default("eval_every", 0)
FLAGS.set_default("eval_max_tasks", 16)

_PER_RUN = ("objective", "lam", "seed", "workdir")
_FORWARDED = ("start", "worlds", "corpus", *(n for n in rl_cli.RL_FLAGS if n != "seed"))


def forwarded_flags() -> list[str]:
    """Every shared experiments.rl flag, spelled out, so each run's command is complete; of
    the loss flags (unset: the start run's value), those given."""
    loss = [
        FLAGS[name].serialize()
        for name in rl_cli.LOSS_FLAGS.values()
        if FLAGS[name].present and name not in _PER_RUN
    ]
    return [FLAGS[name].serialize() for name in _FORWARDED] + loss


def machine() -> str:
    if FLAGS.machine:
        return FLAGS.machine
    import jax

    backend = f"JAX {jax.__version__} on {jax.default_backend()}"
    return f"{platform.node()} ({os.cpu_count()} CPUs, {backend})"


def commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def calibrate(root: str, results_dir: str, common: list[str]) -> dict:
    """The λ rule's measurement: one-iteration grpo runs at the start (their gradients are
    taken before the update, so the objective does not matter)."""
    arm = rl_sweep.RLArm("grpo")
    extra = ["--iterations=1", "--eval_split=", "--heldout_ce_rows=0"]
    runs = [
        rl_sweep.spec_for(arm, int(s), os.path.join(root, "calibration"), [*common, *extra])
        for s in FLAGS.calibration_seeds
    ]
    outcomes = rl_sweep.run_all(
        runs,
        os.path.join(results_dir, "calibration"),
        FLAGS.parallel,
        lambda m: print(m, flush=True),
    )
    if any(o["returncode"] for o in outcomes):
        raise SystemExit("error: a calibration run failed (see its .log)")
    rule = rl_sweep.lam_by_rule([r.workdir for r in runs])
    return rule | {"commands": [r.command for r in runs]}


def setup_text(pool: dict, lam_rule: dict | None) -> str:
    tasks = ", ".join(
        f"{s}/{t} ({pool.get('bands', {}).get(f'{s}/{t}', '?')})" for s, t in pool["tasks"]
    )
    text = (
        f"Start `{FLAGS.start}`; pool ({len(pool['tasks'])} tasks, band at the start in "
        f"brackets): {tasks}. Each iteration G={FLAGS.group_size} rollouts per task (at most "
        f"{FLAGS.max_steps} tool calls), {FLAGS.epochs} epoch(s) of PPO-clip minibatches "
        f"(B={FLAGS.minibatch_size}, lr {FLAGS.learning_rate:g}), "
        f"{'no step' if FLAGS.skip_empty_updates else 'a step'} on a minibatch without "
        f"gradient, {FLAGS.iterations} iterations; greedy pass@1 at the start and the end on "
        f"{FLAGS.eval_max_tasks or 'all'} fixed {FLAGS.eval_split} tasks (eval_seed "
        f"{FLAGS.eval_seed}), teacher-forced CE on {FLAGS.heldout_ce_rows} rows of each "
        f"held-out corpus split. Runs on {machine()} at commit {commit()}."
    )
    if lam_rule:
        text += f" λ by the rule {lam_rule['rule']}, measured at the start: {lam_rule['lam']:.3g}."
    return text


def main(argv: list[str]) -> None:
    stop_signals.stop_on_signals()  # SIGTERM cleans up as Ctrl-C does.
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    grids = sorted(
        os.path.dirname(p)
        for p in glob.glob(os.path.join(FLAGS.results, "rl", "*", rl_report.GRID_FILE))
    )
    if FLAGS.report_only:
        for path in rl_markdown.write(grids, FLAGS.results):
            print(f"wrote {path}")
        return
    given = [f"--{name}" for name in _PER_RUN if FLAGS[name].present]
    if given:
        raise SystemExit(f"error: {', '.join(given)} set per run by the grid")
    try:
        rl_cli.rl_config_from_flags()  # Bad settings fail here, before any run starts.
        root = os.path.join(FLAGS.root, FLAGS.grid)
        results_dir = os.path.join(FLAGS.results, "rl", FLAGS.grid)
        os.makedirs(root, exist_ok=True)
        pool_path = FLAGS.pool_file or os.path.join(root, "pool.json")
        if not os.path.exists(pool_path):
            print(f"rl_sweep: choosing the task pool into {pool_path}", flush=True)
            make_pool(
                pool_path,
                FLAGS.start,
                rl_cli.rl_config_from_flags(),
                FLAGS.worlds,
                FLAGS.corpus or None,
            )
        FLAGS.pool_file = pool_path
        with open(pool_path, encoding="utf-8") as f:
            pool = json.load(f)
        common = forwarded_flags()
        specs_arms = [*FLAGS.primary_arms, *FLAGS.secondary_arms]
        lam_rule = None
        if any(":L" in a for a in specs_arms):
            lam_rule = calibrate(root, results_dir, common)
        lam = lam_rule["lam"] if lam_rule else None
        primary = [rl_sweep.parse_arm(a, lam) for a in FLAGS.primary_arms]
        secondary = [rl_sweep.parse_arm(a, lam) for a in FLAGS.secondary_arms]
        seeds = [int(s) for s in FLAGS.seeds]
        secondary_seeds = [int(s) for s in FLAGS.secondary_seeds]
    except (C.ConfigError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    specs = rl_sweep.specs([(primary, seeds), (secondary, secondary_seeds)], root, common)
    command = shlex.join(["python", "-m", "experiments.rl_sweep", *sys.argv[1:]])
    arms = {
        a.name: {
            "objective": a.objective,
            "lam": a.lam,
            "flags": list(a.flags),
            "label": a.label,
            "role": role,
        }
        for role, group in (("primary", primary), ("secondary", secondary))
        for a in group
    }
    grid = {
        "name": FLAGS.grid,
        "regime": FLAGS.regime,
        "title": FLAGS.title,
        "command": command,
        "setup": setup_text(pool, lam_rule),
        "arms": arms,
        "pool": pool,
        "lam_rule": lam_rule,
        "runs": {s.name: s.command for s in specs},
    }
    os.makedirs(results_dir, exist_ok=True)
    atomic_write_text(
        os.path.join(results_dir, rl_report.GRID_FILE),
        json.dumps(grid, indent=1, sort_keys=True) + "\n",
    )
    print(f"rl_sweep: {len(specs)} runs under {root}", flush=True)
    outcomes = rl_sweep.run_all(specs, results_dir, FLAGS.parallel, lambda m: print(m, flush=True))
    failed = [o["name"] for o in outcomes if o["returncode"] != 0]
    if failed:
        print(f"failed runs (see their .log): {', '.join(failed)}", flush=True)
    grids = sorted({*grids, results_dir})
    for path in rl_markdown.write(grids, FLAGS.results):
        print(f"wrote {path}")


if __name__ == "__main__":
    app.run(main)
