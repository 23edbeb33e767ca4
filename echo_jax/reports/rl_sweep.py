"""The on-policy experiment: grpo, echo at a few λ, and verifier_free, several seeds each, the
same environment-step budget per arm, all from one starting checkpoint.

Each run is a subprocess `python -m experiments.rl ...` with its own workdir
`<root>/<arm>_seed<s>`, so every row of the results names the exact command that made it.
A run with summary.json is finished and skipped; one without is restarted from scratch (an
iteration is not resumable midway). Runs go `parallel` at a time (1 on a 2-core CPU).
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from echo_jax.reports import results
from echo_jax.reports.sweep import Arm
from echo_jax.rl.loop import SUMMARY, remove_unfinished


@dataclasses.dataclass(frozen=True)
class RLRunSpec:
    arm: Arm
    seed: int
    workdir: str
    argv: tuple[str, ...]  # The experiments.rl command line.

    @property
    def name(self) -> str:
        return f"{self.arm.name}_seed{self.seed}"

    @property
    def command(self) -> str:
        return shlex.join(self.argv)


def choose_lams(csv_path: str, metric: str = "heldout_tasks/action_ce") -> list[float]:
    """The offline ablation's best echo λ by `metric` (mean over seeds; lower is better for
    CE) and its neighbours in the λ grid."""
    rows = [r for r in results.read_csv(csv_path) if r["objective"] == "echo"]
    stats = results.arm_stats(rows, metric)
    if not stats:
        raise ValueError(f"{csv_path} holds no finished echo runs with {metric}")
    best_arm = results.best_arm(stats, metric)
    lams = sorted({r["lam"] for r in rows})
    best = next(r["lam"] for r in rows if r["arm"] == best_arm)
    i = lams.index(best)
    return lams[max(i - 1, 0) : i + 2]


def specs(
    arm_list: Sequence[Arm], seeds: Sequence[int], root: str, common: Sequence[str]
) -> list[RLRunSpec]:
    """One run per (arm, seed); `common` holds the flags every run shares."""
    out = []
    for arm in arm_list:
        for seed in seeds:
            workdir = os.path.join(root, f"{arm.name}_seed{seed}")
            argv = (
                "python",
                "-m",
                "experiments.rl",
                f"--objective={arm.objective}",
                f"--lam={arm.lam:g}",
                f"--seed={seed}",
                f"--workdir={workdir}",
                *common,
            )
            out.append(RLRunSpec(arm, int(seed), workdir, argv))
    return out


def run_all(
    run_specs: Sequence[RLRunSpec], parallel: int = 1, log: Callable[[str], None] = print
) -> list[dict]:
    """Runs every unfinished spec; returns {name, returncode, wall_s} per run attempted."""
    lock = threading.Lock()
    unlocked = log

    def log(message: str) -> None:  # One whole line at a time from the runner threads.
        with lock:
            unlocked(message)

    def one(spec: RLRunSpec) -> dict:
        if os.path.exists(os.path.join(spec.workdir, SUMMARY)):
            log(f"{spec.name}: done, skipped")
            return {"name": spec.name, "returncode": 0, "wall_s": 0.0, "skipped": True}
        if remove_unfinished(spec.workdir):
            log(f"{spec.name}: interrupted earlier; restarting")
        os.makedirs(os.path.dirname(spec.workdir) or ".", exist_ok=True)
        log(f"{spec.name}: {spec.command}")
        t0 = time.perf_counter()
        argv = [sys.executable, *spec.argv[1:]]
        with open(f"{spec.workdir}.log", "w") as out:
            code = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT).returncode
        wall = time.perf_counter() - t0
        log(f"{spec.name}: exit {code} after {wall:.0f}s (log {spec.workdir}.log)")
        return {"name": spec.name, "returncode": code, "wall_s": wall, "skipped": False}

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        return list(pool.map(one, run_specs))
