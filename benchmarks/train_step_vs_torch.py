"""A full train step (forward, echo loss, backward, global-norm clip, AdamW) in echo_jax against
the equivalent PyTorch eager model (`benchmarks/torch_reference.py`), in tokens/s on CPU.

python -m benchmarks.train_step_vs_torch                    # presets tiny (default) and small
python -m benchmarks.train_step_vs_torch --preset=small --repeats=9

Synthetic batch: B=4 rows of T=1024 random tokens over V=8192 (the default vocabulary cap)
with a realistic role mix (39% of the targets are CONTEXT, PAD or WARNING, which the loss
never reads; 34% of the shipped corpus's are CONTEXT or PAD). The JAX side is the default
LossConfig, whose CPU path projects only the targets the loss reads; the PyTorch reference
projects all of them, as the plain formulation does, and a third side "torch_skip" skips the
same targets in eager PyTorch. The JAX side runs `experiments.train`'s calls of
TrainConfig.steps_per_call steps (one jitted scan, timed per step); "jax_1" runs one step per
call. Each side runs in its own process; timed runs rotate sides.
Target: JAX >= 1.5x PyTorch's tokens/s at both presets.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from benchmarks import common

NAME = "train_step_vs_torch"
# "jax" is the trainer's call of TrainConfig.steps_per_call steps, "jax_1" one step per call;
# "torch" is the reference of the target; "torch_skip" also projects only the counted targets
# (tr.TrainStep(skip_uncounted=True)). The extra sides show what the call's length and the
# skipping account for.
SIDES = ("jax", "jax_1", "torch", "torch_skip")
LOSS_KWARGS = common.LOSS_KWARGS


def default_loss_path() -> str:
    """LossConfig's default loss path and what it resolves to on this machine, for the record."""
    from echo_jax.config import LossConfig
    from echo_jax.objective.fused_loss import resolve_impl

    return f"{LossConfig.impl} -> {resolve_impl(LossConfig.impl)}"


def synthetic_batch(b: int, t: int, v: int) -> dict[str, np.ndarray]:
    role, adv = common.synthetic_targets(b, t)
    tokens = np.random.default_rng(1).integers(1, v, (b, t)).astype(np.int32)
    return {"tokens": tokens, "roles": role, "advantage": adv}


def synthetic_jax_batch(b: int, t: int, v: int):
    """`synthetic_batch` as the echo_jax train step's Batch."""
    from echo_jax.objective.batch import batch_rows

    x = synthetic_batch(b, t, v)
    return batch_rows(np.arange(b), x["tokens"], x["roles"], x["advantage"])


class JaxTrainSide(common.Bench):
    """echo_jax's own jitted steps, state donated: by default `experiments.train`'s call of
    TrainConfig.steps_per_call steps (timed per step); with steps_per_call=1 the single step,
    `make_train_step`."""

    def __init__(
        self,
        preset: str,
        b: int,
        t: int,
        v: int,
        objective: str = "echo",
        impl: str | None = None,
        chunk_size: int | None = None,
        steps_per_call: int | None = None,
    ):
        import jax

        from echo_jax.config import MODEL_PRESETS, Config, LossConfig, TrainConfig
        from echo_jax.train.trainer import (
            init_model,
            init_state,
            make_optimizer,
            make_train_step,
            make_train_steps,
        )

        lam = LOSS_KWARGS["lam"] if objective == "echo" else 0.0
        loss = LossConfig(
            objective=objective,
            lam=lam,
            impl=impl or LossConfig.impl,
            chunk_size=chunk_size or LossConfig.chunk_size,
        )
        cfg = Config(model=MODEL_PRESETS[preset], loss=loss, train=TrainConfig(batch_size=b))
        tx = make_optimizer(cfg.train)
        graphdef, params = init_model(cfg, v, 0)
        self.params = sum(x.size for x in jax.tree.leaves(params))
        self.state = init_state(params, tx)
        self.steps_per_run = steps_per_call or TrainConfig.steps_per_call
        batch = synthetic_jax_batch(b, t, v)
        if self.steps_per_run == 1:
            self.step = make_train_step(graphdef, tx, cfg.loss)
            self.args = (jax.device_put(batch),)
        else:  # The same batch every step, as the PyTorch side.
            self.step = make_train_steps(graphdef, tx, cfg.loss)
            stacked = jax.tree.map(lambda x: np.stack([x] * self.steps_per_run), batch)
            active = np.ones(self.steps_per_run, bool)
            self.args = (jax.device_put(stacked), jax.device_put(active))
        self.jax = jax

    def run(self):
        self.state, metrics = self.step(self.state, *self.args)
        self.jax.block_until_ready((self.state, metrics))
        self.loss = float(np.ravel(metrics["loss"])[-1])

    def info(self):
        return {"loss": self.loss, "params": int(self.params)}


class TorchTrainSide(common.Bench):
    def __init__(self, preset: str, b: int, t: int, v: int, skip_uncounted: bool = False):
        import torch

        from benchmarks import torch_reference as tr
        from echo_jax.config import MODEL_PRESETS

        m = MODEL_PRESETS[preset]
        torch.manual_seed(0)
        model = tr.Transformer(m.d_model, m.n_layers, m.n_heads, m.d_ff, v)
        self.params = sum(p.numel() for p in model.parameters())
        self.step = tr.TrainStep(model, LOSS_KWARGS, skip_uncounted=skip_uncounted)
        self.batch = {k: torch.from_numpy(x) for k, x in synthetic_batch(b, t, v).items()}
        self.batch["tokens"] = self.batch["tokens"].long()
        self.threads = torch.get_num_threads()

    def run(self):
        self.loss = float(self.step(self.batch)["loss"])

    def info(self):
        return {"loss": self.loss, "params": int(self.params), "threads": self.threads}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", action="append", help="tiny, small (repeatable)")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--max_len", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--worker")
    args = parser.parse_args(argv)
    presets = args.preset or ["tiny", "small"]
    b, t, v = args.batch_size, args.max_len, args.vocab
    if args.worker:
        make = {
            "jax": lambda: JaxTrainSide(presets[0], b, t, v),
            "jax_1": lambda: JaxTrainSide(presets[0], b, t, v, steps_per_call=1),
            "torch": lambda: TorchTrainSide(presets[0], b, t, v),
            "torch_skip": lambda: TorchTrainSide(presets[0], b, t, v, skip_uncounted=True),
        }[args.worker]
        common.serve(make, args.warmup)
        return
    for preset in presets:
        from echo_jax.config import MODEL_PRESETS, LossConfig, TrainConfig

        config = {
            "preset": preset,
            "model": vars(MODEL_PRESETS[preset]),
            "B": b,
            "T": t,
            "V": v,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "loss": LOSS_KWARGS,
            "optimizer": "clip 1.0 + AdamW(wd 0.01 on matrices)",
            # LossConfig's default path, as `experiments.train` runs it on this machine.
            "loss_impl": default_loss_path(),
            "chunk_size": LossConfig.chunk_size,
            "steps_per_call": TrainConfig.steps_per_call,  # Side "jax"; "jax_1": 1.
        }
        machine = common.header(f"{NAME} {preset}", config)
        argv_w = [
            "-m",
            "benchmarks.train_step_vs_torch",
            f"--preset={preset}",
            f"--batch_size={b}",
            f"--max_len={t}",
            f"--vocab={v}",
            f"--warmup={args.warmup}",
        ]
        res = common.compare(argv_w, SIDES, args.repeats)
        tok = {s: b * t / r["median_s"] for s, r in res.items()}
        speedup = tok["jax"] / tok["torch"]
        for s in SIDES:
            r = res[s]
            print(
                f"   {s:10} median {r['median_s'] * 1e3:8.1f} ms/step  {tok[s]:8.0f} tokens/s  "
                f"peak RSS {r['peak_rss_mb']:6.0f} MB  params {r['params']}"
            )
        print(f"   tokens/s jax/torch {speedup:.2f}x (target >= 1.5x)")
        same_work = tok["jax"] / tok["torch_skip"]
        one_step = tok["jax_1"] / tok["torch"]
        print(f"   tokens/s jax/torch_skip {same_work:.2f}x (PyTorch skipping the same targets)")
        print(f"   tokens/s jax_1/torch {one_step:.2f}x (one step per call)")
        record = {
            "benchmark": NAME,
            "config": config,
            "machine": machine,
            "results": res,
            "tokens_per_s": tok,
            "speedup": speedup,
            "speedup_vs_torch_skip": same_work,
            "speedup_one_step_per_call": one_step,
        }
        print("   appended to " + common.append_result(NAME, record))
        sys.stdout.flush()


if __name__ == "__main__":
    main(sys.argv[1:])
