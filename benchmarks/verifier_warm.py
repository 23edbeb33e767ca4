"""Per-verification time, cold (`run_verifier`: a fresh sandboxed interpreter each time) against
warm (`warm_verifier.VerifierPool`: one sandboxed worker that forks a child each time).

    python -m benchmarks.verifier_warm                      # clinic_101 task 0, 30 rounds
    python -m benchmarks.verifier_warm --scenario=library_102 --task=6 --rounds=50

Both sides run the shipped world's own verifier on the same two databases (its seeded initial
state, before and after nothing: the verifier's answer is the same either way), alternating
cold, warm, cold, warm ... so that load on the machine falls on both alike. Each time covers
the whole call: the two read-only snapshots, the sandbox, the verifier, the checked result.
The warm side's first call (which starts the worker) is timed apart, as `warm_start_s`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import ROOT, append_result, header
from echo_jax.awm.verifier import run_verifier
from echo_jax.awm.warm_verifier import VerifierPool
from echo_jax.awm.world_format import load_worlds
from echo_jax.awm.world_server import build_database


def timed(function) -> tuple[float, dict]:
    started = time.perf_counter()
    result = function()
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worlds", default=str(Path(ROOT) / "data" / "awm_worlds"))
    parser.add_argument("--scenario", default="clinic_101")
    parser.add_argument("--task", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    info = header("verifier_warm", vars(args))
    world = load_worlds(args.worlds, [args.scenario])[args.scenario]
    code = world.verifiers[args.task]
    pool = VerifierPool()
    times: dict[str, list[float]] = {"cold": [], "warm": []}
    with tempfile.TemporaryDirectory() as tmp:
        initial, final = Path(tmp) / "initial.db", Path(tmp) / "final.db"
        build_database(world, initial)
        build_database(world, final)
        sides = {
            "cold": lambda: run_verifier(code, initial, final),
            "warm": lambda: pool.run(world.name, code, initial, final),
        }
        try:
            warm_start_s, expected = timed(sides["warm"])
            for r in range(args.rounds):
                for side, call in sides.items():
                    seconds, result = timed(call)
                    if result != expected:
                        raise RuntimeError(f"{side} answered {result}, not {expected}")
                    times[side].append(seconds)
                if (r + 1) % 10 == 0:
                    print(f"   round {r + 1}/{args.rounds}: cold {times['cold'][-1] * 1e3:.1f} ms, "
                          f"warm {times['warm'][-1] * 1e3:.1f} ms", flush=True)  # fmt: skip
        finally:
            pool.close()
    medians = {side: statistics.median(t) for side, t in times.items()}
    record = {
        "machine": info,
        **vars(args),
        "result": expected["result"],
        "cold_median_s": medians["cold"],
        "warm_median_s": medians["warm"],
        "speedup": medians["cold"] / medians["warm"],
        "warm_start_s": warm_start_s,
        "cold_times_s": times["cold"],
        "warm_times_s": times["warm"],
    }
    print(f"   per verification, median of {args.rounds}: cold {medians['cold'] * 1e3:.1f} ms, "
          f"warm {medians['warm'] * 1e3:.1f} ms ({record['speedup']:.1f}x); "
          f"worker start {warm_start_s * 1e3:.0f} ms")  # fmt: skip
    print("   result: " + json.dumps({k: v for k, v in record.items() if "times" not in k}))
    print("   written to " + append_result("verifier_warm", record))


if __name__ == "__main__":
    main()
