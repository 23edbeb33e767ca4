"""The cost of ECHO's world-model term: the trainer's jitted steps (its call of
TrainConfig.steps_per_call steps, timed per step) with objective grpo against echo (policy
gradient + λ · env cross-entropy), timed in two fresh processes, interleaved.

python -m benchmarks.echo_overhead                   # tiny preset, B=4, T=1024, V=8192
python -m benchmarks.echo_overhead --preset=small --repeats=15

Both objectives need the same logits and log-probs (grpo still logs the env CE, so the CPU
path projects the same counted targets for both); echo adds masked [B, T] sums only.
Target: echo costs <= 3% more time per step than grpo.
"""

from __future__ import annotations

import argparse
import sys

from benchmarks import common
from benchmarks.train_step_vs_torch import JaxTrainSide, default_loss_path

NAME = "echo_overhead"


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--max_len", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--worker")
    args = parser.parse_args(argv)
    b, t, v = args.batch_size, args.max_len, args.vocab
    if args.worker:
        common.serve(lambda: JaxTrainSide(args.preset, b, t, v, objective=args.worker), args.warmup)
        return
    config = {
        "loss_impl": default_loss_path(),
        "preset": args.preset,
        "B": b,
        "T": t,
        "V": v,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "lam": 0.05,
    }
    machine = common.header(NAME, config)
    argv_w = [
        "-m",
        "benchmarks.echo_overhead",
        f"--preset={args.preset}",
        f"--batch_size={b}",
        f"--max_len={t}",
        f"--vocab={v}",
        f"--warmup={args.warmup}",
    ]
    res = common.compare(argv_w, ["grpo", "echo"], args.repeats)
    # Paired per-round ratios are less exposed to load drift than the ratio of medians.
    import statistics

    paired = statistics.median(
        e / g for e, g in zip(res["echo"]["times_s"], res["grpo"]["times_s"], strict=True)
    )
    overhead = res["echo"]["median_s"] / res["grpo"]["median_s"] - 1
    for s in ("grpo", "echo"):
        print(
            f"   {s:5} median {res[s]['median_s'] * 1e3:8.1f} ms/step  "
            f"peak RSS {res[s]['peak_rss_mb']:6.0f} MB"
        )
    print(
        f"   echo overhead {overhead * 100:+.1f}% (ratio of medians), "
        f"{(paired - 1) * 100:+.1f}% (median of paired ratios); target <= +3%"
    )
    record = {
        "benchmark": NAME,
        "config": config,
        "machine": machine,
        "results": res,
        "overhead": overhead,
        "paired_overhead": paired - 1,
    }
    print("   appended to " + common.append_result(NAME, record))


if __name__ == "__main__":
    main(sys.argv[1:])
