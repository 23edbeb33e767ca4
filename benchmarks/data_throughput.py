"""Data pipeline throughput: episodes/s through load + render + tokenise + pack
(`echo_jax.data.dataset.load_packed`), cold (no cache) and from the packed-array cache
(`echo_jax.data.data_cache`: a hit costs hashing the input files and reading one .npz).

python -m benchmarks.data_throughput                     # data/corpus if it has shards,
python -m benchmarks.data_throughput --replicas=400      # else the shipped episode x N

Cold and cached runs alternate in one process after a warm-up (tokenizer tables built).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

from benchmarks import common

NAME = "data_throughput"
SHIPPED = os.path.join(common.ROOT, "data", "awm_e_commerce_33_task0.json")
CORPUS = os.path.join(common.ROOT, "data", "corpus")


def dataset_paths(replicas: int, folder: str) -> tuple[tuple[str, ...], str]:
    from echo_jax.data import corpus

    if corpus.is_corpus(CORPUS) and corpus.shard_files(CORPUS):
        return (CORPUS,), "data/corpus (train split)"
    with open(SHIPPED) as f:
        record = json.load(f)
    path = os.path.join(folder, "replicated.jsonl")
    with open(path, "w") as f:
        for i in range(replicas):  # Distinct task_idx: distinct content, no duplicate refusal.
            f.write(json.dumps(dict(record, task_idx=i, reward=float(i % 2))) + "\n")
    return (path,), f"shipped episode x {replicas}"


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--replicas", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max_len", type=int, default=1024)
    args = parser.parse_args(argv)

    from echo_jax.config import DataConfig
    from echo_jax.data.dataset import load_packed

    with tempfile.TemporaryDirectory() as tmp:
        paths, source = dataset_paths(args.replicas, tmp)
        cache_dir = os.path.join(tmp, "cache")
        cold_cfg = DataConfig(paths=paths, max_len=args.max_len, cache_dir="")
        cached_cfg = DataConfig(paths=paths, max_len=args.max_len, cache_dir=cache_dir)
        config = {"source": source, "max_len": args.max_len, "repeats": args.repeats}
        machine = common.header(NAME, config)

        data, _ = load_packed(cold_cfg)  # Warm-up: tokenizer tables, imports.
        episodes = data.stats.episodes
        t0 = time.perf_counter()
        load_packed(cached_cfg)  # A miss: computes and writes the entry.
        miss_s = time.perf_counter() - t0
        times: dict[str, list[float]] = {"cold": [], "cached": []}
        for r in range(args.repeats):
            for side, cfg in (("cold", cold_cfg), ("cached", cached_cfg)):
                t0 = time.perf_counter()
                got, _ = load_packed(cfg)
                times[side].append(time.perf_counter() - t0)
                assert got.stats.episodes == episodes
            print(
                f"  round {r + 1}: cold {times['cold'][-1]:.3f}s, cached {times['cached'][-1]:.4f}s"
            )
        entry_mb = sum(os.path.getsize(os.path.join(cache_dir, f)) for f in os.listdir(cache_dir))
    med = {k: statistics.median(v) for k, v in times.items()}
    rate = {k: episodes / v for k, v in med.items()}
    print(f"   {episodes} episodes -> {data.num_rows} rows of {args.max_len}")
    print(f"   cold   {med['cold']:.3f} s  {rate['cold']:10.1f} episodes/s")
    print(f"   miss   {miss_s:.3f} s  (cold + writing the {entry_mb / 2**20:.1f} MiB entry)")
    print(
        f"   cached {med['cached']:.4f} s  {rate['cached']:10.1f} episodes/s  "
        f"({med['cold'] / med['cached']:.0f}x)"
    )
    record = {
        "benchmark": NAME,
        "config": config,
        "machine": machine,
        "episodes": episodes,
        "rows": data.num_rows,
        "times_s": times,
        "median_s": med,
        "miss_s": miss_s,
        "episodes_per_s": rate,
        "cache_entry_bytes": entry_mb,
    }
    print("   appended to " + common.append_result(NAME, record))


if __name__ == "__main__":
    main(sys.argv[1:])
