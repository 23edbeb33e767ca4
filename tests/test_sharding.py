"""Data parallelism: one step, and one call of two steps, on 4 (forced host) devices equal the
same on 1 device.

The device count must be fixed before JAX initialises, so the 4-device side runs in a
subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=4.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from echo_jax.config import ConfigError
from echo_jax.train.sharding import data_parallel

ROOT = os.path.join(os.path.dirname(__file__), "..")

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np, optax
    from echo_jax.config import Config, LossConfig, ModelConfig, TrainConfig
    from echo_jax.train.sharding import data_parallel
    from echo_jax.train.trainer import (
        init_model, init_state, make_optimizer, make_train_step, make_train_steps
    )
    from tests.test_fused_loss import random_batch

    assert jax.device_count() == 4, jax.devices()
    out = {}
    for impl in ("plain", "chunked"):
        cfg = Config(
            model=ModelConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32),
            loss=LossConfig(lam=0.3, impl=impl, chunk_size=24),
            train=TrainConfig(batch_size=4),
        )
        tx = make_optimizer(cfg.train)
        graphdef, params = init_model(cfg, 97, 0)
        params = jax.tree.map(np.asarray, params)  # Host copies: each step donates its state.
        batch = jax.tree.map(np.asarray, random_batch(seed=7, b=4, t=33, v=97))
        for n in (1, 4):
            dp = data_parallel(4, jax.devices()[:n])
            state = jax.device_put(init_state(params, tx), dp.replicated)
            sharded = jax.device_put(batch, dp.batch)
            assert len(sharded.tokens_BT.sharding.device_set) == n
            state, metrics = make_train_step(graphdef, tx, cfg.loss)(state, sharded)
            leaves = [np.asarray(x).ravel() for x in jax.tree.leaves(state.params)]
            out[f"{impl}_{n}"] = {
                "loss": float(metrics["loss"]),
                "params": np.concatenate(leaves).tolist(),
                "param_devices": len(jax.tree.leaves(state.params)[0].sharding.device_set),
            }
            # The trainer's form: two steps in one call, the stack's row axis split.
            state = jax.device_put(init_state(params, tx), dp.replicated)
            stacked = jax.device_put(jax.tree.map(lambda x: np.stack([x, x]), batch), dp.steps)
            assert len(stacked.tokens_BT.sharding.device_set) == n
            steps = make_train_steps(graphdef, tx, cfg.loss)
            state, metrics = steps(state, stacked, np.ones(2, bool))
            leaves = [np.asarray(x).ravel() for x in jax.tree.leaves(state.params)]
            out[f"{impl}_{n}_call"] = {
                "loss": np.asarray(metrics["loss"]).tolist(),
                "params": np.concatenate(leaves).tolist(),
            }
    try:
        data_parallel(6)
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"
    print("RESULT " + json.dumps(out))
    """
)


def test_one_step_on_four_devices_equals_one_device():
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        PYTHONPATH=ROOT,
    )
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    out = json.loads(line[len("RESULT ") :])
    for impl in ("plain", "chunked"):
        one, four = out[f"{impl}_1"], out[f"{impl}_4"]
        assert four["param_devices"] == 4 and one["param_devices"] == 1
        np.testing.assert_allclose(four["loss"], one["loss"], rtol=1e-5)
        np.testing.assert_allclose(four["params"], one["params"], rtol=1e-5, atol=1e-6)
        one, four = out[f"{impl}_1_call"], out[f"{impl}_4_call"]
        np.testing.assert_allclose(four["loss"], one["loss"], rtol=1e-5)
        np.testing.assert_allclose(four["params"], one["params"], rtol=1e-5, atol=1e-6)
    assert "ConfigError" in out["error"] and "batch_size=6" in out["error"]


def test_one_device_and_a_batch_the_devices_cannot_split():
    dp = data_parallel(3)  # This process has one CPU device.
    assert dp.num_devices == 1
    with pytest.raises(ConfigError, match="not divisible"):
        import jax

        data_parallel(3, [jax.devices()[0]] * 2)
