"""Generate the local AWM worlds (AgentWorldModel-1K file format) deterministically.

python -m experiments.make_worlds --out=data/awm_worlds --seed=0 [--scenarios_per_domain=12]
"""

import time

from absl import app, flags, logging

from echo_jax.awm.worldgen import DOMAINS, write_world
from echo_jax.util import stop_signals

_OUT = flags.DEFINE_string("out", "data/awm_worlds", "World folder to (re)write atomically.")
_SEED = flags.DEFINE_integer("seed", 0, "Root seed; the same seed gives byte-identical files.")
_PER_DOMAIN = flags.DEFINE_integer("scenarios_per_domain", 12, "Scenarios per domain.")


def main(argv: list[str]) -> None:
    stop_signals.stop_on_signals()  # SIGTERM cleans up as Ctrl-C does.
    del argv
    start = time.perf_counter()
    out = write_world(_OUT.value, seed=_SEED.value, scenarios_per_domain=_PER_DOMAIN.value)
    size = sum(p.stat().st_size for p in out.iterdir())
    logging.info(
        "wrote %d scenarios (%s) to %s: %.2f MB in %.1f s",
        _PER_DOMAIN.value * len(DOMAINS),
        ", ".join(d.PREFIX for d in DOMAINS),
        out,
        size / 1e6,
        time.perf_counter() - start,
    )


if __name__ == "__main__":
    app.run(main)
