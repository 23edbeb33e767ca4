"""echo_loss forward + backward w.r.t. the logits: JAX (jitted, float32, the logits donated to
their gradient) against a PyTorch eager implementation of the same semantics.

python -m benchmarks.echo_loss_vs_torch                      # both default shapes
python -m benchmarks.echo_loss_vs_torch --shape=8,1024,8192 --repeats=7

Each side runs in its own fresh process (peak RSS is that process's), the timed runs alternate
between the sides, and each run starts from freshly generated logits (untimed).
Targets: JAX >= 2.5x faster and <= half the peak RSS at (8, 1024, 8192) and (2, 1024, 100277).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from benchmarks import common

SHAPES = ("8,1024,8192", "2,1024,100277")
NAME = "echo_loss_vs_torch"
LOSS_KWARGS = common.LOSS_KWARGS


class JaxSide(common.Bench):
    def __init__(self, b, t, v):
        import jax
        import jax.numpy as jnp

        from echo_jax.config import LossConfig
        from echo_jax.objective.batch import Batch
        from echo_jax.objective.loss import echo_loss

        cfg = LossConfig(**LOSS_KWARGS)
        role, adv = common.synthetic_targets(b, t)
        self.tokens = jnp.asarray(np.random.default_rng(1).integers(0, v, (b, t)), jnp.int32)
        self.roles, self.adv = jnp.asarray(role), jnp.asarray(adv)

        def loss(logits_BTV, tokens_BT, roles_BT, adv_B):
            return echo_loss(logits_BTV, Batch(tokens_BT, roles_BT, adv_B), cfg)

        self.step = jax.jit(jax.value_and_grad(loss, has_aux=True), donate_argnums=0)
        # Normal logits generated a few rows at a time: a whole-array threefry would hold
        # several [B, T, V] temporaries and inflate this side's peak memory.
        rows = max(1, (1 << 22) // (4 * v))
        rows = max(d for d in range(1, rows + 1) if (b * t) % d == 0)

        def fresh(key):
            keys = jax.random.split(key, b * t // rows)
            x = jax.lax.map(lambda k: jax.random.normal(k, (rows, v), jnp.float32), keys)
            return x.reshape(b, t, v)

        self.fresh = jax.jit(fresh)
        self.key = jax.random.key(0)
        self.jax = jax

    def prepare(self):
        self.key, sub = self.jax.random.split(self.key)
        self.logits = self.fresh(sub).block_until_ready()

    def run(self):
        (loss, _), grad = self.step(self.logits, self.tokens, self.roles, self.adv)
        del self.logits  # Donated: the gradient lives in its buffer.
        grad.block_until_ready()
        self.loss = float(loss)

    def info(self):
        return {"loss": self.loss}


class TorchSide(common.Bench):
    def __init__(self, b, t, v):
        import torch

        from benchmarks.torch_reference import echo_loss

        role, adv = common.synthetic_targets(b, t)
        self.tokens = torch.from_numpy(np.random.default_rng(1).integers(0, v, (b, t)))
        self.roles, self.adv = torch.from_numpy(role), torch.from_numpy(adv)
        self.shape, self.torch, self.echo_loss = (b, t, v), torch, echo_loss
        self.gen = torch.Generator().manual_seed(0)

    def prepare(self):
        self.logits = None
        self.logits = self.torch.randn(*self.shape, generator=self.gen).requires_grad_(True)

    def run(self):
        loss, _ = self.echo_loss(self.logits, self.tokens, self.roles, self.adv, **LOSS_KWARGS)
        loss.backward()
        self.loss = loss.item()

    def info(self):
        return {"loss": self.loss, "threads": self.torch.get_num_threads()}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", action="append", help="B,T,V (repeatable)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--worker")
    args = parser.parse_args(argv)
    shapes = args.shape or list(SHAPES)
    if args.worker:
        b, t, v = map(int, shapes[0].split(","))
        side = {"jax": JaxSide, "torch": TorchSide}[args.worker]
        common.serve(lambda: side(b, t, v), args.warmup)
        return
    for shape in shapes:
        b, t, v = map(int, shape.split(","))
        config = {
            "B": b,
            "T": t,
            "V": v,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "dtype": "float32",
            "loss": "echo_jax.config.LossConfig() defaults",
        }
        machine = common.header(f"{NAME} {shape}", config)
        argv_w = [
            "-m",
            "benchmarks.echo_loss_vs_torch",
            f"--shape={shape}",
            f"--warmup={args.warmup}",
        ]
        res = common.compare(argv_w, ["jax", "torch"], args.repeats)
        jx, th = res["jax"], res["torch"]
        speedup = th["median_s"] / jx["median_s"]
        mem_ratio = jx["peak_rss_mb"] / th["peak_rss_mb"]
        print(
            f"   jax   median {jx['median_s'] * 1e3:8.1f} ms  peak RSS {jx['peak_rss_mb']:7.0f} MB"
            f"  (loss {jx['loss']:.5f})\n"
            f"   torch median {th['median_s'] * 1e3:8.1f} ms  peak RSS {th['peak_rss_mb']:7.0f} MB"
            f"  (loss {th['loss']:.5f})\n"
            f"   speed-up jax/torch {speedup:.2f}x (target >= 2.5x); "
            f"memory jax/torch {mem_ratio:.2f} (target <= 0.5)"
        )
        record = {
            "benchmark": NAME,
            "config": config,
            "machine": machine,
            "results": res,
            "speedup": speedup,
            "memory_ratio": mem_ratio,
        }
        print("   appended to " + common.append_result(NAME, record))
        sys.stdout.flush()


if __name__ == "__main__":
    main(sys.argv[1:])
