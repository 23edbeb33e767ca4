"""A world server's start (to ready, with its stop), its reset, and the snapshot a verification
takes, timed on one shipped world.

    python -m benchmarks.world_server_cost                      # clinic_101, 3 starts
    python -m benchmarks.world_server_cost --starts=5

Each start is followed by 10 resets and 10 snapshots. On a tree without `WorldServer.snapshot`
(before the sandbox's agent did them) the snapshot is the host's own copy of the live database,
as the harness made it then, so the same script times a commit before and after.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import ROOT
from echo_jax.awm.world_format import load_worlds
from echo_jax.awm.world_server import WorldServer, copy_database


def _snapshot(server: WorldServer, scratch: Path) -> None:
    if hasattr(server, "snapshot"):
        server.snapshot()
    else:
        target = scratch / "final.db"
        target.unlink(missing_ok=True)
        copy_database(server.db_path, target)


def _ms(times: list[float]) -> str:
    median, low = statistics.median(times) * 1e3, min(times) * 1e3
    return f"median {median:.1f} ms (min {low:.1f}, n={len(times)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worlds", default=str(Path(ROOT) / "data" / "awm_worlds"))
    parser.add_argument("--scenario", default="clinic_101")
    parser.add_argument("--starts", type=int, default=3)
    args = parser.parse_args()
    world = load_worlds(args.worlds, [args.scenario])[args.scenario]
    starts, resets, snapshots = [], [], []
    with tempfile.TemporaryDirectory() as scratch:
        for _ in range(args.starts):
            started = time.perf_counter()
            server = WorldServer(world).start()
            starts.append(time.perf_counter() - started)
            try:
                for _ in range(10):
                    started = time.perf_counter()
                    server.reset()
                    resets.append(time.perf_counter() - started)
                    started = time.perf_counter()
                    _snapshot(server, Path(scratch))
                    snapshots.append(time.perf_counter() - started)
            finally:
                server.stop()
    print(f"start {_ms(starts)}\nreset {_ms(resets)}\nsnapshot {_ms(snapshots)}")


if __name__ == "__main__":
    main()
