"""An RL iteration's rollout time, this tree against another commit, at the same settings.

    python -m benchmarks.rl_rollout_time --baseline=5ffb078

Each side runs `experiments.rl` from the shipped warm start in a fresh process: 16 rollouts per
iteration (4 training tasks x G=4), at most 8 tool calls and 128 tokens per call, temperature 1,
no held-out evaluations, for --iterations iterations. The two loops choose their tasks
differently (the baseline draws 4 tasks per iteration; this tree trains on a fixed pool, here
4 tasks given in a pool file), so rollouts differ in length: the comparison is per iteration and
per environment step, median over iterations, from each run's metrics.jsonl. The first
iteration includes compilation on both sides (this tree's cache starts empty).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from benchmarks.common import ROOT, append_result, header
from benchmarks.rollout_throughput import worktree

SHARED = ["--start=data/warm_start", "--group_size=4", "--max_steps=8", "--max_new_tokens=128",
          "--temperature=1.0", "--minibatch_size=4", "--learning_rate=0.0001",
          "--seed=0"]  # fmt: skip
BASELINE_FLAGS = ["--tasks_per_iteration=4", "--eval_split=none"]
POOL = [["clinic_101", 0], ["e_commerce_107", 7], ["e_commerce_110", 2], ["library_102", 6]]


def run_side(tree: str, flags: list[str], workdir: str) -> list[dict]:
    argv = [sys.executable, "-m", "experiments.rl", f"--workdir={workdir}", *SHARED, *flags]
    proc = subprocess.run(argv, cwd=tree, env=dict(os.environ, PYTHONPATH=tree),
                          capture_output=True, text=True)  # fmt: skip
    if proc.returncode:
        raise RuntimeError(f"experiments.rl failed in {tree}:\n{proc.stderr[-3000:]}")
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    return [line for line in lines if line["iteration"] > 0]


def summarize(lines: list[dict]) -> dict:
    totals = [0] + [line["env_steps"] for line in lines]
    steps = [b - a for a, b in zip(totals, totals[1:], strict=False)]
    later = lines[1:] or lines  # Without the compiling first iteration where there are more.
    later_steps = steps[1:] or steps
    return {
        "rollout_s": [line["rollout_s"] for line in lines],
        "env_steps": steps,
        "median_rollout_s": statistics.median(line["rollout_s"] for line in later),
        "median_s_per_env_step": statistics.median(
            line["rollout_s"] / max(n, 1) for line, n in zip(later, later_steps, strict=True)
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", default="5ffb078")
    parser.add_argument("--iterations", type=int, default=6)
    args = parser.parse_args()
    info = header("rl_rollout_time", {"baseline": args.baseline, "iterations": args.iterations})
    record: dict = {"machine": info, "baseline": args.baseline, "iterations": args.iterations}
    with tempfile.TemporaryDirectory() as tmp:
        pool = os.path.join(tmp, "pool.json")
        with open(pool, "w") as f:
            json.dump({"tasks": POOL}, f)
        its = f"--iterations={args.iterations}"
        sides = {
            "baseline": (worktree(args.baseline), [its, *BASELINE_FLAGS]),
            "new": (
                ROOT,
                [
                    its,
                    f"--pool_file={pool}",
                    "--eval_split=",
                    "--slots=16",
                    f"--jax_cache={os.path.join(tmp, 'jax_cache')}",
                ],
            ),  # fmt: skip
        }
        for side, (tree, flags) in sides.items():
            record[side] = summarize(run_side(tree, flags, os.path.join(tmp, side)))
            print(f"   {side}: {json.dumps(record[side])}", flush=True)
    for key in ("median_rollout_s", "median_s_per_env_step"):
        record[f"speedup_{key}"] = record["baseline"][key] / record["new"][key]
    print("   result: " + json.dumps(record))
    print("   written to " + append_result("rl_rollout_time", record))


if __name__ == "__main__":
    main()
