"""The large-vocabulary loss head: features h [B, T, d] and the output matrix w [d, V] to the
echo loss and its gradients w.r.t. h and w, plain (logits [B, T, V], then the loss) against
chunked (`echo_jax.objective.fused_loss`: the projection fused with the cross-entropy, chunk
by chunk).

python -m benchmarks.fused_loss_memory                    # B·T = 16,384, V = 100,277, d = 512
python -m benchmarks.fused_loss_memory --batch_size=2 --repeats=2   # a quicker look

Each side runs in its own fresh process (peak RSS is its own), timed runs alternate.
Targets: chunked peak memory <= 25% of plain, time <= 1.3x plain.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from benchmarks import common

NAME = "fused_loss_memory"
LOSS_KWARGS = common.LOSS_KWARGS


class HeadSide(common.Bench):
    def __init__(self, impl: str, b: int, t: int, d: int, v: int, chunk: int):
        import jax
        import jax.numpy as jnp

        from echo_jax.config import LossConfig
        from echo_jax.objective.batch import Batch
        from echo_jax.objective.fused_loss import fused_echo_loss
        from echo_jax.objective.loss import echo_loss

        role, adv = common.synthetic_targets(b, t)
        rng = np.random.default_rng(0)
        batch = Batch(
            tokens_BT=jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32),
            roles_BT=jnp.asarray(role),
            advantages_B=jnp.asarray(adv),
        )
        cfg = LossConfig(**LOSS_KWARGS, chunk_size=chunk)

        def plain(h_BTD, w_DV, batch):
            logits_BTV = (h_BTD.reshape(b * t, d) @ w_DV).reshape(b, t, v)
            return echo_loss(logits_BTV, batch, cfg)

        def chunked(h_BTD, w_DV, batch):  # What LossConfig(impl="chunked") trains with.
            return fused_echo_loss(h_BTD, w_DV, batch, cfg)

        fn = {"plain": plain, "chunked": chunked}[impl]
        self.step = jax.jit(jax.value_and_grad(fn, argnums=(0, 1), has_aux=True))
        key_h, key_w = jax.random.split(jax.random.key(0))
        self.h = jax.random.normal(key_h, (b, t, d), jnp.float32)
        self.w = jax.random.normal(key_w, (d, v), jnp.float32) * d**-0.5
        self.batch, self.jax = batch, jax

    def run(self):
        (loss, _), grads = self.step(self.h, self.w, self.batch)
        self.jax.block_until_ready(grads)
        self.loss = float(loss)

    def info(self):
        return {"loss": self.loss}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_len", type=int, default=2048)
    parser.add_argument("--d_model", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=100277)
    parser.add_argument("--chunk_size", type=int, default=512)  # LossConfig's default.
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--worker")
    args = parser.parse_args(argv)
    b, t, d, v, c = args.batch_size, args.max_len, args.d_model, args.vocab, args.chunk_size
    if args.worker:
        common.serve(lambda: HeadSide(args.worker, b, t, d, v, c), args.warmup)
        return
    config = {
        "B": b,
        "T": t,
        "tokens": b * t,
        "d": d,
        "V": v,
        "chunk_size": c,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "dtype": "float32",
        "grads": "w.r.t. h and w",
    }
    machine = common.header(NAME, config)
    argv_w = [
        "-m",
        "benchmarks.fused_loss_memory",
        f"--batch_size={b}",
        f"--max_len={t}",
        f"--d_model={d}",
        f"--vocab={v}",
        f"--chunk_size={c}",
        f"--warmup={args.warmup}",
    ]
    res = common.compare(argv_w, ["plain", "chunked"], args.repeats)
    pl, ch = res["plain"], res["chunked"]
    mem, slow = ch["peak_rss_mb"] / pl["peak_rss_mb"], ch["median_s"] / pl["median_s"]
    for s in ("plain", "chunked"):
        r = res[s]
        print(
            f"   {s:7} median {r['median_s']:7.2f} s  peak RSS {r['peak_rss_mb']:7.0f} MB  "
            f"(loss {r['loss']:.5f})"
        )
    print(
        f"   chunked/plain: memory {mem:.3f} (target <= 0.25), time {slow:.2f}x "
        f"(target <= 1.3x); logits alone would be {b * t * v * 4 / 2**20:.0f} MB"
    )
    record = {
        "benchmark": NAME,
        "config": config,
        "machine": machine,
        "results": res,
        "memory_ratio": mem,
        "time_ratio": slow,
    }
    print("   appended to " + common.append_result(NAME, record))


if __name__ == "__main__":
    main(sys.argv[1:])
