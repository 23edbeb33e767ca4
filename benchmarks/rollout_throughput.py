"""Closed-loop rollout throughput: environment steps and generated tokens per second, and where
the wall time goes, for `experiments.evaluate` on the shipped checkpoint.

    python -m benchmarks.rollout_throughput                       # this tree, 3 runs
    python -m benchmarks.rollout_throughput --baseline=5ffb078    # and another commit, A B A B

Each run is the evaluate command itself in a fresh process (imports, compilation, world
servers and all), with the workload of the issue that asked for it: 8 training tasks, a greedy
episode and 4 samples each, no teacher-forced positions. With --baseline the other commit runs
from a git worktree, interleaved with this tree's runs, and the ratios are taken pair by pair.
Env steps per second are the episodes' steps over the evaluation's own wall time
(metrics.json's wall_s: model load to written rollouts). The engine's breakdown (decode,
extend, idle waiting for worlds, host loop; tool calls and verifications summed over episodes,
which overlap the loop) comes from this tree's metrics.

This tree's runs share a persistent compilation cache that starts empty (`--jax_cache`, on by
default in `experiments.evaluate`; the baseline has none): its first run compiles, the later
ones load. The record keeps both: `*_cold` from the first pair, `*_warm` the median of the
others.

--preset=gpu is the configuration for a GPU machine: more episodes in flight over the whole
training split.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks.common import ROOT, append_result, header

PRESETS = {
    "cpu": ["--split=train", "--max_tasks=8", "--samples=4", "--tool_call_positions=0"],
    "gpu": ["--split=train", "--max_tasks=64", "--samples=8", "--tool_call_positions=0",
            "--slots=64", "--servers_per_scenario=4"],
}  # fmt: skip


def run_side(tree: str, flags: list[str], out: str) -> dict:
    """One evaluate run from `tree`; its metrics and the process's wall time."""
    argv = [
        sys.executable,
        "-m",
        "experiments.evaluate",
        "--checkpoint=data/warm_start",
        f"--out={out}",
        *flags,
    ]  # Each tree's own worlds: their code follows its launcher.
    env = dict(os.environ, PYTHONPATH=tree)
    started = time.perf_counter()
    proc = subprocess.run(argv, cwd=tree, env=env, capture_output=True, text=True)
    process_s = time.perf_counter() - started
    if proc.returncode:
        raise RuntimeError(f"evaluate failed in {tree}:\n{proc.stderr[-3000:]}")
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    steps = metrics["mean_steps"] * metrics["episodes"]
    return {
        "process_s": process_s,
        "wall_s": metrics["wall_s"],
        "env_steps": steps,
        "env_steps_per_s": steps / metrics["wall_s"],
        "decode_tokens_per_s": metrics["decode_tokens_per_s"],
        "pass@1_greedy": metrics["pass@1_greedy"],
        "pass@1": metrics.get("pass@1"),
        "rollout": metrics.get("rollout"),
    }


def worktree(rev: str) -> str:
    path = os.path.join(tempfile.gettempdir(), f"echo_jax_{rev}")
    if not os.path.isdir(path):
        subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", path, rev], check=True,
                       capture_output=True)  # fmt: skip
    return path


def shares(rollout: dict) -> dict:
    wall = rollout["wall_s"]
    out = {f"{k}_share": rollout[k] / wall for k in ("decode_s", "extend_s", "wait_s", "host_s")}
    out |= {f"{k}_summed_share": rollout[k] / wall for k in ("tool_s", "verify_s")}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--baseline", default="", help="a commit to run side by side")
    args = parser.parse_args()
    flags = PRESETS[args.preset]
    info = header("rollout_throughput", {"preset": args.preset, "flags": flags,
                                         "runs": args.runs, "baseline": args.baseline})  # fmt: skip
    sides = {"new": ROOT} | ({"baseline": worktree(args.baseline)} if args.baseline else {})
    results: dict[str, list[dict]] = {side: [] for side in sides}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            for side, tree in sides.items():
                if side == "baseline" and args.preset == "gpu":
                    continue
                cache = [f"--jax_cache={os.path.join(tmp, 'jax_cache')}"] if side == "new" else []
                r = run_side(tree, flags + cache, os.path.join(tmp, f"{side}_{i}"))
                results[side].append(r)
                print(f"   {side} run {i}: {r['env_steps_per_s']:.1f} env steps/s, "
                      f"{r['decode_tokens_per_s']:.0f} tokens/s, wall {r['wall_s']:.1f}s, "
                      f"greedy pass@1 {r['pass@1_greedy']:.2f}", flush=True)  # fmt: skip

    def median(side: str, key: str) -> float:
        return statistics.median(r[key] for r in results[side])

    record = {"machine": info, "preset": args.preset, "flags": flags, "runs": args.runs}
    for key in ("env_steps_per_s", "decode_tokens_per_s", "wall_s", "process_s",
                "pass@1_greedy", "pass@1"):  # fmt: skip
        record[f"new_{key}"] = median("new", key)
    for key in ("env_steps_per_s", "decode_tokens_per_s", "wall_s"):
        record[f"new_{key}_cold"] = results["new"][0][key]
        if args.runs > 1:
            record[f"new_{key}_warm"] = statistics.median(r[key] for r in results["new"][1:])
    warm = results["new"][1:] or results["new"]  # Shares without the compiling run.
    record["new_shares"] = {k: statistics.median(shares(r["rollout"])[k] for r in warm)
                            for k in shares(warm[0]["rollout"])}  # fmt: skip
    if results.get("baseline"):
        record["baseline"] = args.baseline
        for key in ("env_steps_per_s", "decode_tokens_per_s", "wall_s", "pass@1_greedy", "pass@1"):
            record[f"baseline_{key}"] = median("baseline", key)
        for key in ("env_steps_per_s", "decode_tokens_per_s"):
            pairs = [a[key] / b[key] for a, b in zip(results["new"], results["baseline"],
                                                       strict=True)]  # fmt: skip
            record[f"speedup_{key}"] = statistics.median(pairs)
            record[f"speedup_{key}_pairs"] = pairs
            record[f"speedup_{key}_cold"] = pairs[0]
            if len(pairs) > 1:
                record[f"speedup_{key}_warm"] = statistics.median(pairs[1:])
    print("   result: " + json.dumps(record))
    print("   written to " + append_result("rollout_throughput", record))


if __name__ == "__main__":
    main()
