"""The on-policy grid: arms × seeds of `python -m experiments.rl`, all from one start and one task
pool, each finished run's small files copied into the repository's results.

Each run is a subprocess with its own workdir `<root>/<grid>/<run>` (rollouts, checkpoints:
never committed), so every run names the exact command that made it. A run with summary.json
is finished and skipped; one without continues from its last finished iteration (every
command carries `--resume`). Once finished, its small files (`rl_report.RUN_FILES`) are copied to
`results/rl/<grid>/<run>/`, which is what the report reads: a grid can run in pieces, across
sessions and machines, and a reader regenerates every table from the committed files.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from echo_jax.awm.child_process import parent_death_hook
from echo_jax.objective.objectives import objective_spec
from echo_jax.reports.rl_report import RUN_FILES
from echo_jax.rl.loop import SUMMARY
from echo_jax.train.run_dir import RunDir
from echo_jax.util.choices import ConfigError

LAM_RULE_SHARE = 0.5  # The rule: λ·|∇L_env| = LAM_RULE_SHARE · |∇L_pg| at the start.


@dataclasses.dataclass(frozen=True)
class RLArm:
    """An arm: an objective, its λ, and experiments.rl flags of its own (e.g. weight_verifier)."""

    objective: str
    lam: float = 0.0
    flags: tuple[str, ...] = ()  # "name=value" pairs, passed as --name=value.

    @property
    def name(self) -> str:
        base = f"{self.objective}_lam{self.lam:g}" if self.uses_lam else self.objective
        return "_".join([base, *(f.replace("=", "") for f in self.flags)])

    @property
    def label(self) -> str:
        base = f"{self.objective} λ={self.lam:g}" if self.uses_lam else self.objective
        return " ".join([base, *(f"{f.replace('=', ' ')}" for f in self.flags)])

    @property
    def uses_lam(self) -> bool:
        return objective_spec(self.objective).uses_lam


def parse_arm(spec: str, lam_star: float | None = None) -> RLArm:
    """`objective[:lam][:name=value...]`; lam a number, or L / L/k (the rule's λ, divided)."""
    parts = spec.split(":")
    objective, rest = parts[0], parts[1:]
    lam = 0.0
    if objective_spec(objective).uses_lam:
        if not rest:
            raise ConfigError(f"arm {spec!r}: {objective} needs a λ (a number, L or L/k)")
        token, rest = rest[0], rest[1:]
        if token.startswith("L"):
            if lam_star is None:
                raise ConfigError(f"arm {spec!r} uses the rule's λ, which is not measured")
            lam = lam_star / (float(token[2:]) if token.startswith("L/") else 1.0)
        else:
            lam = float(token)
    if any("=" not in f for f in rest):
        raise ConfigError(f"arm {spec!r}: flags are name=value")
    return RLArm(objective, float(f"{lam:.3g}"), tuple(rest))


@dataclasses.dataclass(frozen=True)
class RLRunSpec:
    arm: RLArm
    seed: int
    workdir: str
    argv: tuple[str, ...]  # The experiments.rl command line.

    @property
    def name(self) -> str:
        return f"{self.arm.name}_seed{self.seed}"

    @property
    def command(self) -> str:
        return shlex.join(self.argv)


def spec_for(arm: RLArm, seed: int, root: str, common: Sequence[str]) -> RLRunSpec:
    workdir = os.path.join(root, f"{arm.name}_seed{seed}")
    argv = (
        "python",
        "-m",
        "experiments.rl",
        f"--objective={arm.objective}",
        f"--lam={arm.lam:g}",
        f"--seed={seed}",
        f"--workdir={workdir}",
        "--resume",
        *common,
        *(f"--{f}" for f in arm.flags),
    )
    return RLRunSpec(arm, int(seed), workdir, argv)


def specs(
    arms_seeds: Sequence[tuple[Sequence[RLArm], Sequence[int]]], root: str, common: Sequence[str]
) -> list[RLRunSpec]:
    """One run per (arm, seed) of each (arms, seeds) group, seed-major within a group, so a
    grid stopped early still holds whole pairs of arms."""
    return [
        spec_for(arm, seed, root, common)
        for arms, seeds in arms_seeds
        for seed in seeds
        for arm in arms
    ]


def export_run(workdir: str, dest: str) -> None:
    """Copies a finished run's small files (not its rollouts or checkpoints) to dest."""
    os.makedirs(dest, exist_ok=True)
    for name in RUN_FILES:
        src = os.path.join(workdir, name)
        if os.path.exists(src):
            tmp = os.path.join(dest, f".{name}.tmp")
            shutil.copyfile(src, tmp)
            os.replace(tmp, os.path.join(dest, name))


def run_all(
    run_specs: Sequence[RLRunSpec],
    results_dir: str,
    parallel: int = 1,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Runs every unfinished spec and exports each finished one into results_dir/<run>;
    returns {name, returncode, wall_s} per run attempted.

    Stopped (SIGTERM or Ctrl-C with `stop_signals`, or any error), it stops its running
    children the same way and waits for their cleanup, so no run goes on without it; a child
    also gets SIGTERM if the sweep is killed outright."""
    lock = threading.Lock()
    unlocked = log
    running: set[subprocess.Popen] = set()
    stopping = threading.Event()

    def log(message: str) -> None:  # One whole line at a time from the runner threads.
        with lock:
            unlocked(message)

    def one(spec: RLRunSpec) -> dict | None:
        dest = os.path.join(results_dir, spec.name)
        if os.path.exists(os.path.join(spec.workdir, SUMMARY)):
            export_run(spec.workdir, dest)
            log(f"{spec.name}: done, skipped")
            return {"name": spec.name, "returncode": 0, "wall_s": 0.0, "skipped": True}
        if os.path.isdir(spec.workdir):
            log(f"{spec.name}: interrupted earlier; resuming")
        os.makedirs(os.path.dirname(spec.workdir) or ".", exist_ok=True)
        t0 = time.perf_counter()
        argv = [sys.executable, *spec.argv[1:]]
        with open(f"{spec.workdir}.log", "a") as out:  # A resumed run's log goes on.
            with lock:  # Either the stop sees this child, or this child is never started.
                if stopping.is_set():
                    return None
                child = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                         preexec_fn=parent_death_hook(signal.SIGTERM))  # fmt: skip
                running.add(child)
                unlocked(f"{spec.name}: {spec.command}")
            code = child.wait()
            with lock:
                running.discard(child)
        wall = time.perf_counter() - t0
        if code == 0:
            export_run(spec.workdir, dest)
        log(f"{spec.name}: exit {code} after {wall:.0f}s (log {spec.workdir}.log)")
        return {"name": spec.name, "returncode": code, "wall_s": wall, "skipped": False}

    pool = ThreadPoolExecutor(max_workers=parallel)
    try:
        return list(pool.map(one, run_specs))
    except BaseException:
        with lock:
            stopping.set()
            for child in running:
                child.terminate()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def lam_by_rule(calibration_workdirs: Sequence[str]) -> dict:
    """λ such that λ·|∇L_env| = LAM_RULE_SHARE·|∇L_pg|, from the first iteration's gradients
    of one-iteration runs at the start (measured at the sampling parameters, so before any
    update: the same for every objective), medians over the runs."""
    pg, env = [], []
    for w in calibration_workdirs:
        first = next(m for m in RunDir(w).read_metrics() if m["iteration"] == 1)
        pg.append(first["grad_norm_pg"])
        env.append(first["grad_norm_env_unscaled"])
    if not np.median(pg) > 0 or not np.median(env) > 0:
        raise ValueError(
            f"the λ rule needs both gradients at the start; measured |∇L_pg| {pg}, "
            f"|∇L_env| {env} (no informative group: a larger low band or more "
            "calibration seeds)"
        )
    lam = LAM_RULE_SHARE * float(np.median(pg)) / float(np.median(env))
    return {
        "rule": f"λ·|∇L_env| = {LAM_RULE_SHARE:g}·|∇L_pg| (medians over runs)",
        "grad_norm_pg": pg,
        "grad_norm_env_unscaled": env,
        "lam": lam,
    }
