"""Shared benchmark machinery: one fresh worker process per side, timed runs interleaved across
sides (A B A B ...), medians, per-process peak RSS, and a JSON line of results with machine info.

A worker is this same script started with `--worker=SIDE`; it builds its side, warms up, says
"ready", then answers each "run" line from the parent with one timed run. Its peak RSS
(`ru_maxrss` of that process alone) is reported when it quits, so each side's memory is that of
a fresh process that never held the other side's arrays.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

from echo_jax.util.provenance import git_commit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# Environment variables that change how fast either side runs; a line records those set, and
# benchmarks.report gives such a line a row of its own.
PERF_ENV = (
    "GLIBC_TUNABLES",
    "LD_PRELOAD",
    "XLA_FLAGS",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
)


def machine_info() -> dict:
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "jax": _version("jax"),
        "jaxlib": _version("jaxlib"),
        "torch": _version("torch"),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        # The results folder is this machinery's own output: a line appended by an earlier
        # benchmark of the same run does not make the code dirty.
        "git_commit": git_commit(short=True, ignore=("benchmarks/results",)) or "unknown",
        "env": {k: os.environ[k] for k in PERF_ENV if k in os.environ},
    }


# echo_jax.config.LossConfig()'s defaults, written out so the PyTorch side never imports the
# trainer; every benchmark of the loss uses these.
LOSS_KWARGS = dict(
    objective="echo",
    lam=0.05,
    world_loss_target="env_only",
    world_loss_normalization="full_observation_tokens",
    pg_loss_reduction="sequence_mean",
)


def append_result(name: str, record: dict) -> str:
    """Appends the record, with the machine's load at the end of the run, as one JSON line."""
    record = {**record, "load_avg_1m_end": machine_info()["load_avg_1m"]}
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}.jsonl")
    with open(path, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
    return path


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def synthetic_targets(b: int, t: int, seed: int = 0):
    """Roles [B, T] int32 with a realistic mix (a context prefix, then action / env / warning
    turns of 16-95 tokens, a padded end) and advantages [B] float32."""
    import numpy as np

    rng = np.random.default_rng(seed)
    role = np.full((b, t), 1, np.int32)
    for row in range(b):
        pos = t // 8
        while pos < t:
            span = int(rng.integers(16, 96))
            role[row, pos : pos + span] = rng.choice([2, 3, 3, 4])
            pos += span
        role[row, t - t // 16 :] = 0
    return role, rng.normal(size=(b,)).astype(np.float32)


# ---- the worker side ------------------------------------------------------------------------


class Bench:
    """What a worker runs: `prepare` (untimed, e.g. fresh inputs for donation) then `run`
    (timed; must block until the work is done). `info` is reported once, after warm-up.
    A run that does `steps_per_run` units of work (train steps in one call) is reported per
    unit."""

    steps_per_run: int = 1

    def prepare(self) -> None:
        pass

    def run(self) -> None:
        raise NotImplementedError

    def info(self) -> dict:
        return {}


def serve(make: Callable[[], Bench], warmup: int) -> None:
    """The worker loop: build, warm up, then one timed run per "run" line on stdin."""
    rss_start = peak_rss_mb()
    bench = make()
    for _ in range(warmup):
        bench.prepare()
        bench.run()
    out = sys.stdout
    info = {"rss_after_import_mb": rss_start, "steps_per_run": bench.steps_per_run}
    print("ready " + json.dumps({**info, **bench.info()}), file=out)
    out.flush()
    for line in sys.stdin:
        if line.strip() == "run":
            bench.prepare()
            t0 = time.perf_counter()
            bench.run()
            print(f"time {time.perf_counter() - t0!r}", file=out, flush=True)
        else:
            break
    print("peak " + json.dumps({"peak_rss_mb": peak_rss_mb()}), file=out, flush=True)


# ---- the parent side ------------------------------------------------------------------------


class Worker:
    def __init__(self, side: str, argv: Sequence[str], env: dict[str, str] | None = None):
        self.side = side
        self.proc = subprocess.Popen(
            [sys.executable, *argv, f"--worker={side}"],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=dict(os.environ, **(env or {})),
        )
        self.info = self._expect("ready")
        self.times: list[float] = []

    def _expect(self, tag: str):
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"worker {self.side} exited (rc={self.proc.wait()})")
            if line.startswith(tag + " "):
                return json.loads(line[len(tag) + 1 :])

    def run(self) -> float:
        """One timed run, in seconds per unit of work (Bench.steps_per_run)."""
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        self.times.append(float(self._expect("time")) / self.info["steps_per_run"])
        return self.times[-1]

    def close(self) -> dict:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        peak = self._expect("peak")
        self.proc.wait()
        return peak


def compare(
    argv: Sequence[str],
    sides: Sequence[str],
    repeats: int,
    log: Callable[[str], None] = print,
    sequential_start: bool = True,
) -> dict[str, dict]:
    """Starts one worker per side, times `repeats` runs of each, interleaved A B A B ...

    Returns per side: median and all times (s, per unit of work), peak RSS of its process, and
    its info.
    """
    workers = []
    for side in sides:
        log(f"  starting {side} ...")
        workers.append(Worker(side, argv))
        if sequential_start:
            log(f"  {side} ready: {json.dumps(workers[-1].info)}")
    for r in range(repeats):
        line = []
        for w in workers:
            line.append(f"{w.side} {w.run():.4f}s")
        log(f"  round {r + 1}/{repeats}: " + ", ".join(line))
    out = {}
    for w in workers:
        peak = w.close()
        out[w.side] = {
            "median_s": statistics.median(w.times),
            "times_s": w.times,
            **peak,
            **w.info,
        }
    return out


def worker_side(argv: Sequence[str]) -> str | None:
    for arg in argv:
        if arg.startswith("--worker="):
            return arg.split("=", 1)[1]
    return None


def header(name: str, config: dict) -> dict:
    info = machine_info()
    print(f"== {name}")
    print("   machine: " + json.dumps(info))
    print("   config:  " + json.dumps(config))
    return info
