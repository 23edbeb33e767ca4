"""The packed-array cache: a hit returns what the pipeline would, and any change of input file,
setting or given vocabulary misses; the full-cl100k vocabulary option; the config checks."""

import dataclasses
import os

import numpy as np
import pytest

from echo_jax.config import MODEL_PRESETS, Config, ConfigError, DataConfig, LossConfig, validate
from echo_jax.data import data_cache
from echo_jax.data.dataset import load_packed
from echo_jax.data.tokenizer import encoding
from echo_jax.data.vocab import FIRST_LEARNED_ID, full_vocab
from tests.test_data import small_episode, write_jsonl


def assert_same(a, b):
    for field in dataclasses.fields(a[0]):
        x, y = getattr(a[0], field.name), getattr(b[0], field.name)
        if isinstance(x, np.ndarray):
            np.testing.assert_array_equal(x, y, err_msg=field.name)
            assert x.dtype == y.dtype, field.name
        else:
            assert x == y, field.name
    np.testing.assert_array_equal(a[1].cl100k_ids, b[1].cl100k_ids)


@pytest.fixture
def setup(tmp_path):
    path = write_jsonl(tmp_path / "eps.jsonl", [small_episode(task_idx=i) for i in range(3)])
    cfg = DataConfig(paths=(path,), max_len=128, cache_dir=str(tmp_path / "cache"))
    return path, cfg


def entries(cfg):
    folder = cfg.cache_dir
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def test_a_hit_returns_the_pipelines_arrays(setup, monkeypatch):
    path, cfg = setup
    uncached = load_packed(dataclasses.replace(cfg, cache_dir=""))
    assert entries(cfg) == []
    first = load_packed(cfg)
    assert len(entries(cfg)) == 1
    calls = []
    monkeypatch.setattr("echo_jax.data.dataset.load_data_episodes", lambda c: calls.append(c))
    second = load_packed(cfg)
    assert calls == []  # Served from the cache: no episode was read.
    assert_same(first, uncached)
    assert_same(second, uncached)


def test_changed_file_setting_or_vocab_misses(setup):
    path, cfg = setup
    data, vocab = load_packed(cfg)
    load_packed(dataclasses.replace(cfg, max_len=96))
    load_packed(dataclasses.replace(cfg, canonical_json=True))
    load_packed(cfg, vocab=full_vocab())
    assert len(entries(cfg)) == 4
    key = data_cache.cache_key(cfg, None)
    write_jsonl(path, [small_episode(task_idx=i, reward=0.5) for i in range(3)])
    assert data_cache.cache_key(cfg, None) != key
    changed, _ = load_packed(cfg)
    assert len(entries(cfg)) == 5
    assert not np.array_equal(changed.reward, data.reward)
    assert data_cache.cache_key(dataclasses.replace(cfg, cache_dir="/elsewhere"), None) == (
        data_cache.cache_key(cfg, None)
    )  # Where the cache lives is not part of the key.


def test_a_corrupt_entry_is_a_miss_and_is_rewritten(setup):
    path, cfg = setup
    want = load_packed(cfg)
    (name,) = entries(cfg)
    with open(os.path.join(cfg.cache_dir, name), "wb") as f:
        f.write(b"not an npz")
    assert_same(load_packed(cfg), want)
    assert_same(load_packed(cfg), want)
    assert data_cache.clear(cfg.cache_dir) == 1 and entries(cfg) == []
    assert not [f for f in os.listdir(cfg.cache_dir) if f.endswith(".tmp")]


def test_no_cache_dir_writes_nothing(setup, tmp_path):
    path, cfg = setup
    assert data_cache.cache_key(dataclasses.replace(cfg, cache_dir=""), None) is None


def test_full_vocabulary_keeps_every_cl100k_id(setup):
    path, cfg = setup
    vocab = full_vocab()
    assert vocab.size == 1 + encoding().n_vocab == 100_278
    assert sorted(vocab.cl100k_ids[1:].tolist()) == list(range(encoding().n_vocab))
    data, got = load_packed(dataclasses.replace(cfg, vocab_size=0, cache_dir=""))
    np.testing.assert_array_equal(got.cl100k_ids, vocab.cl100k_ids)
    text = 'Buy one apple, then {"id": 7}.'
    ids = vocab.encode_text(text)
    assert vocab.decode(ids) == text
    assert (ids >= FIRST_LEARNED_ID).any()  # Whole cl100k tokens, not byte fallbacks.
    assert len(ids) == len(encoding().encode_ordinary(text))


def test_config_checks():
    validate(Config(data=DataConfig(vocab_size=0), loss=LossConfig(impl="chunked")))
    with pytest.raises(ConfigError, match="vocab_size must be 0"):
        validate(Config(data=DataConfig(vocab_size=100)))
    with pytest.raises(ConfigError, match="loss impl"):
        validate(Config(loss=LossConfig(impl="fused")))
    with pytest.raises(ConfigError, match="chunk_size"):
        validate(Config(loss=LossConfig(chunk_size=0)))
    with pytest.raises(ConfigError, match="attention"):
        validate(Config(model=dataclasses.replace(MODEL_PRESETS["tiny"], attention="flash")))


def test_gpu100m_preset_is_about_100m_parameters():
    m = MODEL_PRESETS["gpu100m"]
    per_layer = 4 * m.d_model**2 + 2 * m.d_model * m.d_ff + 2 * m.d_model
    total = m.n_layers * per_layer + m.d_model + 8192 * m.d_model  # Default vocabulary cap.
    assert 95e6 <= total <= 105e6, total
    assert m.dtype == "bfloat16" and m.d_model // m.n_heads == 64
