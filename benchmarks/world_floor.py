"""The world side alone: how fast the evaluate workload of `benchmarks.rollout_throughput` could
run on this machine if the model cost nothing.

    python -m benchmarks.world_floor                       # this tree, 3 replays
    python -m benchmarks.world_floor --baseline=5ffb078    # and that commit's evaluate, A B A B

One `experiments.evaluate` run of this tree (the throughput workload, its default pool) gives
the episodes. Each replay then plays their recorded calls back, with no model at all, through
a fresh `WorldPool` of the engine's settings (servers started, databases reset, tools listed,
warm verifiers, the same threads and the same scenario interleaving), and times it from the
pool's creation to the last verdict. Steps per second of a replay bound what any rollout engine
can reach here with these worlds: the model's compute only adds to the replay's CPU. With
--baseline the other commit's evaluate runs between the replays, so the bound can be read as a
multiple of its steps per second on the same machine at the same time.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import statistics
import tempfile
import time

from benchmarks.common import ROOT, append_result, header
from benchmarks.rollout_throughput import PRESETS, run_side, worktree
from echo_jax.agent.closed_loop import ROLLOUTS, mute_fork_warning
from echo_jax.agent.rollout import EngineConfig, interleave_scenarios, world_pool
from echo_jax.awm.capture_shards import read_shard
from echo_jax.awm.harness import HarnessConfig, run_episode
from echo_jax.awm.replay import ReplayPolicy
from echo_jax.awm.world_format import load_worlds
from echo_jax.config import AgentConfig


def _cpu_s(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def _descendants_cpu_s() -> float:
    """CPU seconds of this process's live descendants and of the children they reaped (world
    servers and verifier workers are not reaped before the pool closes, so RUSAGE_CHILDREN
    misses them)."""
    children, ticks = collections.defaultdict(list), {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children[int(fields[1])].append(int(pid))
        ticks[int(pid)] = sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    total, stack = 0, list(children[os.getpid()])
    while stack:
        pid = stack.pop()
        total += ticks[pid]
        stack += children[pid]
    return total / os.sysconf("SC_CLK_TCK")


def replay(episodes: list[dict], worlds_dir: str) -> dict:
    """Replays the episodes' calls through a fresh pool of the evaluate engine's settings."""
    worlds = load_worlds(worlds_dir, sorted({ep["scenario"] for ep in episodes}))
    config = EngineConfig.of(AgentConfig())
    harness = HarnessConfig(max_tool_calls=config.max_steps)
    self_cpu = _cpu_s(resource.RUSAGE_SELF)
    started = time.perf_counter()
    pool = world_pool(worlds, config)
    pool.prestart(ep["scenario"] for ep in episodes)

    def one(ep: dict) -> dict:
        live = pool.acquire(ep["scenario"])
        try:
            steps = ep["steps"]
            policy = ReplayPolicy([s["action"] for s in steps], [s["observation"] for s in steps])
            world = worlds[ep["scenario"]]
            return run_episode(live.server, live.client, world, ep["task_idx"], policy, harness,
                               None, pool.verifiers)  # fmt: skip
        finally:
            pool.release(live)

    try:
        order = interleave_scenarios([ep["scenario"] for ep in episodes])
        futures = {i: pool.threads.submit(one, episodes[i]) for i in order}
        replayed = {i: f.result() for i, f in futures.items()}
        wall_s = time.perf_counter() - started
        worlds_cpu_s = _descendants_cpu_s()
    finally:
        pool.close()
    steps = sum(len(ep["steps"]) for ep in replayed.values())
    return {
        "wall_s": wall_s,
        "env_steps": steps,
        "env_steps_per_s": steps / wall_s,
        "host_cpu_s": _cpu_s(resource.RUSAGE_SELF) - self_cpu,
        "worlds_cpu_s": worlds_cpu_s,
        "same_rewards": sum(replayed[i]["reward"] == episodes[i]["reward"] for i in replayed),
        "episodes": len(replayed),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--baseline", default="", help="a commit whose evaluate runs between")
    args = parser.parse_args()
    mute_fork_warning()
    flags = PRESETS["cpu"]
    info = header("world_floor", {"flags": flags, "runs": args.runs, "baseline": args.baseline})
    record: dict = {"machine": info, "flags": flags, "runs": args.runs}
    with tempfile.TemporaryDirectory() as tmp:
        cache = f"--jax_cache={os.path.join(ROOT, 'runs', '.jax_cache')}"
        evaluated = run_side(ROOT, [*flags, cache], os.path.join(tmp, "new"))
        episodes = list(read_shard(os.path.join(tmp, "new", ROLLOUTS)))
        print(f"   evaluate: {evaluated['env_steps_per_s']:.1f} env steps/s", flush=True)
        floors, baselines = [], []
        for i in range(args.runs):
            floors.append(replay(episodes, os.path.join(ROOT, "data", "awm_worlds")))
            print(f"   replay {i}: {json.dumps(floors[-1])}", flush=True)
            if args.baseline:
                out = os.path.join(tmp, f"baseline_{i}")
                baselines.append(run_side(worktree(args.baseline), flags, out))
                print(f"   baseline {i}: {baselines[-1]['env_steps_per_s']:.1f} env steps/s",
                      flush=True)  # fmt: skip
    record["evaluate_env_steps_per_s"] = evaluated["env_steps_per_s"]
    record["replays"] = floors
    record["floor_env_steps_per_s"] = statistics.median(r["env_steps_per_s"] for r in floors)
    if baselines:
        record["baseline"] = args.baseline
        record["baseline_env_steps_per_s"] = [r["env_steps_per_s"] for r in baselines]
        pairs = [f["env_steps_per_s"] / b["env_steps_per_s"]
                 for f, b in zip(floors, baselines, strict=True)]  # fmt: skip
        record["floor_over_baseline"] = statistics.median(pairs)
        record["floor_over_baseline_pairs"] = pairs
    print("   result: " + json.dumps(record))
    print("   written to " + append_result("world_floor", record))


if __name__ == "__main__":
    main()
