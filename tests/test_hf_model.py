"""Qwen3 and Llama checkpoints (echo_jax.model.hf): logits equal `transformers`' (stored by
tests/fixtures/hf/make_fixtures.py), the KV cache equals the full forward pass, unsupported
configs are refused by name, and a trained model saves back loadably.

The live comparison with `transformers` runs where torch and transformers are importable, or
where ECHO_JAX_HF_PYTHON names an interpreter that has them; elsewhere (CI) it skips.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from echo_jax.config import LossConfig
from echo_jax.data import roles
from echo_jax.model.hf_config import parse_config
from echo_jax.model.hf_io import INDEX_FILE, load_hf, save_hf
from echo_jax.objective.batch import Batch
from echo_jax.train.trainer import init_state, step_function
from echo_jax.util.choices import ConfigError

HERE = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
FAMILIES = ("tiny-qwen3", "tiny-llama")
EPS32 = float(np.finfo(np.float32).eps)
PARITY_ATOL = 1e-4  # The bar for JAX against transformers, float32.


@functools.cache
def reference():
    ref = np.load(os.path.join(HERE, "reference.npz"))
    return {k: ref[k] for k in ref.files}


@functools.cache
def loaded(name: str, attention: str = "xla"):
    return load_hf(os.path.join(HERE, name), attention=attention)


@functools.cache
def forward(graphdef):
    return jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))


def real_logits(name: str, params=None, attention: str = "xla") -> np.ndarray:
    """The model's logits at the reference batch's real positions, flattened [N, V]."""
    ref = reference()
    _, graphdef, loaded_params = loaded(name, attention)
    tokens, lengths = ref["tokens"], ref["lengths"]
    logits = np.asarray(forward(graphdef)(params or loaded_params, jnp.asarray(tokens)))
    return logits[np.arange(tokens.shape[1])[None] < lengths[:, None]]


@pytest.mark.parametrize(
    "name, attention", [("tiny-qwen3", "xla"), ("tiny-llama", "xla"), ("tiny-qwen3", "blocked")]
)
def test_logits_equal_transformers(name, attention):
    """On a batch whose second row is padded at the end; "blocked" repeats the K key heads."""
    want = reference()[f"{name}/logits"]
    got = real_logits(name, attention=attention)
    chex.assert_equal_shape([got, want])
    assert np.abs(got - want).max() <= PARITY_ATOL, np.abs(got - want).max()


def _decode_tolerance(logits: np.ndarray) -> float:
    """The cache path sums attention in another order than the full pass: a few float32
    roundings per layer on values of the logits' size."""
    return 64 * EPS32 * max(1.0, float(np.abs(logits).max()))


@pytest.mark.parametrize("name", FAMILIES)
def test_kv_cache_decode_equals_full_forward(name):
    """A prompt of 7 appended in one chunk, then 16 tokens one at a time (two rows, the second
    at a different offset): every step's logits equal the full forward pass's."""
    _, graphdef, params = loaded(name)
    tokens = jnp.asarray(reference()["tokens"][:, :23])
    full = np.asarray(forward(graphdef)(params, tokens))
    model = nnx.merge(graphdef, params)
    extend = jax.jit(lambda p, *a: nnx.merge(graphdef, p).extend(*a))
    cache = model.empty_cache(2, 32)
    prompt = np.array([7, 5], np.int32)
    chunk = np.zeros((2, 7), np.int32)
    for r in range(2):
        chunk[r, : prompt[r]] = tokens[r, : prompt[r]]
    logits, cache = extend(params, jnp.asarray(chunk), jnp.zeros(2, jnp.int32),
                           jnp.asarray(prompt), cache)  # fmt: skip
    got, want = [np.asarray(logits)], [full[np.arange(2), prompt - 1]]
    for i in range(16):
        pos = prompt + i
        step = jnp.asarray(tokens)[jnp.arange(2), pos][:, None]
        logits, cache = extend(params, step, jnp.asarray(pos), jnp.ones(2, jnp.int32), cache)
        got.append(np.asarray(logits))
        want.append(full[np.arange(2), pos])
    got, want = np.stack(got), np.stack(want)
    np.testing.assert_allclose(got, want, rtol=0, atol=_decode_tolerance(want))


def test_bfloat16_compute_stays_near_float32():
    """bfloat16 activations: within bf16's rounding (8 bits) of the float32 logits."""
    name = "tiny-qwen3"
    cfg, graphdef, params = load_hf(os.path.join(HERE, name), dtype="bfloat16", attention="xla")
    assert cfg.dtype == "bfloat16"
    got = np.asarray(forward(graphdef)(params, jnp.asarray(reference()["tokens"])), np.float32)
    want = real_logits(name)
    mask = np.arange(got.shape[1])[None] < reference()["lengths"][:, None]
    assert np.abs(got[mask] - want).max() < 2.0**-8 * 16 * max(1.0, np.abs(want).max())


def _raw(name: str) -> dict:
    with open(os.path.join(HERE, name, "config.json")) as f:
        return json.load(f)


@pytest.mark.parametrize(
    "change, field",
    [
        ({"model_type": "mistral"}, "model_type"),
        ({"attention_bias": True}, "attention_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"use_sliding_window": True}, "use_sliding_window"),
        ({"layer_types": ["sliding_attention"]}, "layer_types"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"moe_intermediate_size": 64}, "moe_intermediate_size"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
    ],
)
def test_unsupported_config_fields_are_refused_by_name(change, field):
    with pytest.raises(ConfigError, match=field):
        parse_config(_raw("tiny-qwen3") | change)


def test_llama_rope_scaling_is_read_from_rope_parameters():
    cfg = parse_config(_raw("tiny-llama"))
    assert cfg.rope_scaling == (8.0, 1.0, 4.0, 64.0) and cfg.rope_theta == 500_000.0
    assert not cfg.tie_word_embeddings and cfg.num_key_value_heads == 1


def test_a_missing_or_extra_tensor_is_refused(tmp_path):
    cfg, _, params = loaded("tiny-llama")
    params = jax.tree.map(np.asarray, params)
    del params["lm_head"]
    save_hf(tmp_path, cfg, params)
    with pytest.raises(ConfigError, match="lm_head.weight"):
        load_hf(tmp_path)


@functools.cache
def one_train_step(name: str):
    """The loaded model after one ECHO step on the reference tokens (random roles)."""
    cfg, graphdef, params = loaded(name)
    tokens = reference()["tokens"]
    rng = np.random.default_rng(0)
    roles_BT = rng.choice([roles.CONTEXT, roles.ACTION, roles.ENV_OUTPUT], tokens.shape)
    batch = Batch(tokens_BT=jnp.asarray(tokens), roles_BT=jnp.asarray(roles_BT, jnp.int32),
                  advantages_B=jnp.asarray([1.0, -1.0], jnp.float32))  # fmt: skip
    tx = optax.adam(1e-2)
    step = jax.jit(step_function(graphdef, tx, LossConfig(objective="echo", lam=0.5)))
    state, metrics = step(init_state(params, tx), batch)
    assert np.isfinite(float(metrics["loss"])) and not bool(metrics["nonfinite"])
    return cfg, state.params


@pytest.mark.parametrize("shard_bytes", [None, 40_000])
def test_save_after_a_train_step_reloads_the_same(tmp_path, shard_bytes):
    """Single file and sharded with an index: the saved model reloads to the same logits."""
    name = "tiny-llama"
    cfg, params = one_train_step(name)
    kwargs = {} if shard_bytes is None else {"max_shard_bytes": shard_bytes}
    save_hf(tmp_path, cfg, params, source=os.path.join(HERE, name), **kwargs)
    assert os.path.exists(tmp_path / INDEX_FILE) == (shard_bytes is not None)
    assert os.path.exists(tmp_path / "tokenizer.json")
    _, graphdef, again = load_hf(tmp_path, attention="xla")
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, params), jax.tree.map(np.asarray, again))
    assert not np.allclose(real_logits(name, params), reference()[f"{name}/logits"], atol=1e-3)


def _hf_python() -> str | None:
    """An interpreter with torch and transformers: this one, or ECHO_JAX_HF_PYTHON's."""
    if importlib.util.find_spec("torch") and importlib.util.find_spec("transformers"):
        return sys.executable
    path = os.environ.get("ECHO_JAX_HF_PYTHON")
    return path if path and shutil.which(path) else None


TRANSFORMERS_LOGITS = """
import sys, numpy as np, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
ref = np.load(sys.argv[2])
tokens, lengths = ref["tokens"], ref["lengths"]
mask = np.arange(tokens.shape[1])[None] < lengths[:, None]
with torch.no_grad():
    out = model(input_ids=torch.tensor(tokens, dtype=torch.long),
                attention_mask=torch.tensor(mask.astype(np.int64))).logits.numpy()
np.save(sys.argv[3], out[mask])
"""


@pytest.mark.parametrize("name", FAMILIES)
def test_saved_after_a_train_step_loads_in_transformers(tmp_path, name):
    python = _hf_python()
    if python is None:
        pytest.skip("no torch + transformers (set ECHO_JAX_HF_PYTHON to an interpreter with them)")
    cfg, params = one_train_step(name)
    save_hf(tmp_path / "model", cfg, params, source=os.path.join(HERE, name))
    out = tmp_path / "logits.npy"
    subprocess.run([python, "-c", TRANSFORMERS_LOGITS, str(tmp_path / "model"),
                    os.path.join(HERE, "reference.npz"), str(out)], check=True)  # fmt: skip
    want, got = np.load(out), real_logits(name, params)
    assert np.abs(got - want).max() <= PARITY_ATOL, np.abs(got - want).max()
