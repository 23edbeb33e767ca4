"""Train-step throughput and model FLOPs utilisation (MFU) on an accelerator.

python -m benchmarks.gpu_throughput                 # gpu100m preset, T=2048, bf16, on the GPU
python -m benchmarks.gpu_throughput --smoke         # a tiny config on CPU: checks the script

MFU = model FLOPs per step / step time / peak. Model FLOPs per step (PaLM, appendix B):
    6 · N · tokens  +  12 · L · d · T · tokens
N: all parameters (the tied embedding counted once: it is the output projection's matmul),
L layers, d width, T sequence length, tokens = B · T; the attention term counts the full T×T
score and value matmuls forward and backward (no causal discount), so MFU is comparable with
published numbers. Peak: dense bf16 tensor-core FLOP/s without sparsity; H100 SXM and H200
989.4 TFLOP/s (H100 PCIe 756, A100 312); --peak_tflops overrides it.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time

from benchmarks import common

NAME = "gpu_throughput"
PEAK_BF16_TFLOPS = (  # Matched against jax.Device.device_kind, first match wins.
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100", 989.4),
    ("A100", 312.0),
)


def peak_tflops(device_kind: str) -> float | None:
    for name, peak in PEAK_BF16_TFLOPS:
        if name.lower() in device_kind.lower():
            return peak
    return None


def model_flops_per_step(params: int, n_layers: int, d_model: int, b: int, t: int) -> float:
    tokens = b * t
    return 6.0 * params * tokens + 12.0 * n_layers * d_model * t * tokens


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="gpu100m")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_len", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--loss_impl", default="plain", choices=("plain", "chunked"))
    parser.add_argument("--chunk_size", type=int, default=4096)
    parser.add_argument("--attention", default=None, help="override: auto, cudnn, xla, blocked")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak_tflops", type=float, default=None)
    parser.add_argument("--smoke", action="store_true", help="tiny CPU config, 2 steps")
    args = parser.parse_args(argv)
    if args.smoke:
        args.preset, args.batch_size, args.max_len, args.steps, args.warmup = "tiny", 2, 128, 2, 1

    import jax

    from benchmarks.train_step_vs_torch import synthetic_jax_batch
    from echo_jax.config import MODEL_PRESETS, Config, LossConfig, TrainConfig, validate
    from echo_jax.model.attention import resolve
    from echo_jax.train.sharding import data_parallel
    from echo_jax.train.trainer import init_model, init_state, make_optimizer, make_train_step

    model = MODEL_PRESETS[args.preset]
    if args.attention:
        model = dataclasses.replace(model, attention=args.attention)
    loss = LossConfig(impl=args.loss_impl, chunk_size=args.chunk_size)
    cfg = validate(Config(model=model, loss=loss, train=TrainConfig(batch_size=args.batch_size)))
    b, t, v = args.batch_size, args.max_len, args.vocab
    device = jax.devices()[0]
    config = {
        "preset": args.preset,
        "model": dataclasses.asdict(model),
        "attention_resolved": resolve(model),
        "B": b,
        "T": t,
        "V": v,
        "loss_impl": args.loss_impl,
        "steps": args.steps,
        "warmup": args.warmup,
        "devices": jax.device_count(),
        "device_kind": device.device_kind,
        "backend": jax.default_backend(),
    }
    machine = common.header(NAME, config)

    tx = make_optimizer(cfg.train)
    graphdef, params = init_model(cfg, v, 0)
    n_params = int(sum(x.size for x in jax.tree.leaves(params)))
    dp = data_parallel(b)
    state = jax.device_put(init_state(params, tx), dp.replicated)
    step = make_train_step(graphdef, tx, cfg.loss)
    batch = jax.device_put(synthetic_jax_batch(b, t, v), dp.batch)

    t0 = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    for _ in range(args.warmup - 1):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    flops = model_flops_per_step(n_params, model.n_layers, model.d_model, b, t)
    peak = args.peak_tflops or peak_tflops(device.device_kind)
    n_dev = jax.device_count()
    mfu = flops / step_s / (peak * 1e12 * n_dev) if peak else None
    mem = device.memory_stats() or {}
    result = {
        "params": n_params,
        "compile_and_first_step_s": compile_s,
        "step_s_median": step_s,
        "step_s": times,
        "tokens_per_s": b * t / step_s,
        "model_tflops_per_step": flops / 1e12,
        "achieved_tflops": flops / step_s / 1e12,
        "peak_tflops_per_device": peak,
        "mfu": mfu,
        "loss": float(metrics["loss"]),
        "peak_device_memory_gib": mem.get("peak_bytes_in_use", 0) / 2**30 or None,
        "peak_rss_mb": common.peak_rss_mb(),
    }
    print(
        f"   params {n_params / 1e6:.1f}M  step {step_s * 1e3:.1f} ms  "
        f"{result['tokens_per_s']:,.0f} tokens/s  {result['achieved_tflops']:.2f} TFLOP/s"
        + (
            f"  MFU {mfu * 100:.1f}% of {peak} TFLOP/s x {n_dev}"
            if mfu
            else "  MFU n/a (no peak known for this device; --peak_tflops)"
        )
    )
    if args.smoke:
        print("   smoke run: not recorded")
        return
    record = {"benchmark": NAME, "config": config, "machine": machine, "result": result}
    print("   appended to " + common.append_result(NAME, record))


if __name__ == "__main__":
    main(sys.argv[1:])
