"""KV-cache decoding: exact caches, greedy determinism, nucleus and temperature sampling, stops."""

import functools
import unittest.mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from echo_jax.agent.decoding import (
    FOUND,
    Decoder,
    decode_text,
    stop_automaton,
    token_stop_transitions,
)
from echo_jax.agent.sampling import first_argmax, inverse_cdf_sample, sample_tokens
from echo_jax.config import ModelConfig
from echo_jax.data.episodes import parse_episode
from echo_jax.data.render import END_CALL, render_episode
from echo_jax.data.tokenizer import tokenize_rendered
from echo_jax.data.vocab import build_vocab
from echo_jax.model.transformer import Transformer
from tests.test_data import small_episode

TINY = ModelConfig(d_model=16, n_layers=2, n_heads=2, d_ff=32)
MAX_LEN, MAX_NEW = 64, 12


@pytest.fixture(scope="module")
def vocab():
    ep = parse_episode(small_episode(), "test")
    return build_vocab([tokenize_rendered(render_episode(ep)).ids], 400)


def random_model(cfg: ModelConfig, vocab_size: int):
    """(graphdef, params) of a freshly initialised model; the initialisers run in one jit, which
    is quicker on CPU than running them op by op."""

    def make():
        return Transformer(cfg, vocab_size, rngs=nnx.Rngs(0))

    graphdef = nnx.split(nnx.eval_shape(make))[0]
    return graphdef, jax.jit(lambda: nnx.to_pure_dict(nnx.split(make())[1]))()


@functools.cache
def _model(vocab_size):
    return random_model(TINY, vocab_size)


def decoder_graph(vocab):
    return _model(vocab.size)[0]


@functools.cache
def forward_fn(graphdef):
    """Training's forward pass, log-softmaxed; always called on [2, MAX_LEN] (one compile)."""
    return jax.jit(lambda p, x: jax.nn.log_softmax(nnx.merge(graphdef, p)(x), axis=-1))


@pytest.fixture(scope="module")
def decoder(vocab):
    """Every test generates two rows at a time: one compilation serves them all."""
    graphdef, params = _model(vocab.size)
    return Decoder(graphdef, params, vocab, MAX_LEN, MAX_NEW)


def prompts(vocab, lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab.size, n).astype(np.int32) for n in lengths]


def test_cached_decoding_matches_the_full_forward_pass(decoder, vocab):
    """Append rows of different lengths in chunks of 7 (prime, so chunks end mid-prompt), then
    feed the true tokens one at a time: every position's logits equal the training forward
    pass's (compared as log-softmax)."""
    graphdef, params = decoder_graph(vocab), decoder.params
    tokens_BT = np.random.default_rng(0).integers(1, vocab.size, (2, MAX_LEN)).astype(np.int32)
    full_BTV = np.asarray(forward_fn(graphdef)(params, tokens_BT))
    lengths_B = np.array([MAX_LEN - 20, MAX_LEN - 30], np.int32)
    steps = MAX_LEN - int(lengths_B.max())
    rows = np.arange(2)
    chunk = 7

    @jax.jit
    def cached_logits(params, tokens_BT):
        """Chunked prompts, then one true token at a time: logits [B, V] and [S, B, V]."""
        model = nnx.merge(graphdef, params)
        cache = model.empty_cache(2, MAX_LEN)
        logits_BV = jnp.zeros((2, vocab.size))
        for lo in range(0, int(lengths_B.max()), chunk):
            count_B = jnp.clip(lengths_B - lo, 0, chunk)
            window_BC = jax.lax.dynamic_slice_in_dim(
                jnp.pad(tokens_BT, ((0, 0), (0, chunk))), lo, chunk, axis=1
            )
            new_BV, cache = model.extend(window_BC, jnp.full(2, lo), count_B, cache)
            logits_BV = jnp.where((count_B > 0)[:, None], new_BV, logits_BV)

        def feed(cache, i):
            pos_B = lengths_B + i
            one_B1 = tokens_BT[rows, pos_B][:, None]
            logits_BV, cache = model.extend(one_B1, pos_B, jnp.ones(2, jnp.int32), cache)
            return cache, logits_BV

        return logits_BV, jax.lax.scan(feed, cache, jnp.arange(steps))[1]

    first_BV, fed_SBV = cached_logits(params, tokens_BT)
    close = functools.partial(np.testing.assert_allclose, atol=1e-4, rtol=1e-4)
    close(jax.nn.log_softmax(first_BV, axis=-1), full_BTV[rows, lengths_B - 1])
    for i in range(steps):
        close(jax.nn.log_softmax(fed_SBV[i], axis=-1), full_BTV[rows, lengths_B + i])


def test_inverse_cdf_sample_draws_each_index_in_proportion():
    """Over 293 entries (2 blocks of 128 and a ragged third), zero weights in every block, a
    wholly zero block, and mass on each block's last entry: the frequencies match the weights,
    and no zero-weight index is ever drawn."""
    rng = np.random.default_rng(0)
    weights_V = rng.exponential(size=293) * (rng.random(293) < 0.5)
    weights_V[128:256] = 0.0
    weights_V[[127, 292]] = 3.0
    n = 60_000
    draws = np.asarray(
        jax.jit(inverse_cdf_sample)(
            jnp.tile(jnp.asarray(weights_V, jnp.float32), (n, 1)),
            jax.random.split(jax.random.key(2), n),
        )
    )
    p_V = weights_V / weights_V.sum()
    freq_V = np.bincount(draws, minlength=293) / n
    assert freq_V[p_V == 0].sum() == 0
    np.testing.assert_allclose(freq_V, p_V, atol=5 * np.sqrt(p_V.max() / n))


def test_inverse_cdf_sample_never_runs_past_the_last_positive_entry():
    """A uniform of almost 1 lands on the last positive entry, not on the zeros after it."""
    weights_1V = jnp.zeros((1, 300)).at[0, [3, 130]].set(1.0)
    key_1 = jax.random.split(jax.random.key(0), 1)
    with unittest.mock.patch.object(jax.random, "uniform", lambda *a, **k: jnp.float32(1.0)):
        assert int(inverse_cdf_sample(weights_1V, key_1)[0]) == 130


def test_first_argmax_is_argmax_ties_and_infinities_included():
    x_BV = np.random.default_rng(0).integers(-3, 3, (13, 29)).astype(np.float32)
    x_BV[0] = -np.inf
    x_BV[1, [4, 9]] = np.inf
    np.testing.assert_array_equal(first_argmax(jnp.asarray(x_BV)), np.argmax(x_BV, axis=-1))


def test_greedy_is_deterministic_and_rows_are_independent(decoder, vocab):
    ps = prompts(vocab, [7, 20])
    a = decoder.generate(ps, jax.random.key(0), temperature=0.0)
    b = decoder.generate(ps, jax.random.key(1), temperature=0.0)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.tokens, y.tokens)
        assert x.text == y.text and np.all(x.sample_logp == 0)
    # A row continues the same whatever its neighbour's length (per-row positions and masks).
    for row, other in ((0, prompts(vocab, [3], seed=9)[0]), (1, ps[0][:2])):
        pair = [ps[row], other] if row == 0 else [other, ps[row]]
        again = decoder.generate(pair, jax.random.key(0), temperature=0.0)[row]
        np.testing.assert_array_equal(again.tokens, a[row].tokens)
        np.testing.assert_allclose(again.logp, a[row].logp, atol=1e-5)
    assert all(0 not in g.tokens for g in a)  # PAD is never generated.


def test_nucleus_with_tiny_p_is_greedy(decoder, vocab):
    ps = prompts(vocab, [9, 30], seed=1)
    greedy = decoder.generate(ps, jax.random.key(0), temperature=0.0)
    nucleus = decoder.generate(ps, jax.random.key(5), temperature=1.0, top_p=1e-6)
    sampled = decoder.generate(ps, jax.random.key(5), temperature=1.0)
    for g, n in zip(greedy, nucleus, strict=True):
        np.testing.assert_array_equal(g.tokens, n.tokens)
        np.testing.assert_allclose(n.sample_logp, 0.0, atol=1e-6)  # One token kept: prob 1.
    assert any(not np.array_equal(g.tokens, s.tokens) for g, s in zip(greedy, sampled, strict=True))


def test_logp_is_the_models_own_log_softmax(decoder, vocab):
    """logp[i] of a generated token is log_softmax(logits)[token] of the full forward pass."""
    prompt, other = prompts(vocab, [10, 4], seed=2)
    gen = decoder.generate([prompt, other], jax.random.key(3), temperature=0.7, top_p=0.9)[0]
    seq = np.concatenate([prompt, gen.tokens])
    rows = np.zeros((2, MAX_LEN), np.int32)
    rows[0, : seq.size] = seq
    logp_TV = np.asarray(forward_fn(decoder_graph(vocab))(decoder.params, rows)[0])
    want = logp_TV[np.arange(prompt.size - 1, seq.size - 1), gen.tokens]
    np.testing.assert_allclose(gen.logp, want, atol=1e-4)
    assert np.all(gen.sample_logp <= 0) and np.all(gen.sample_logp >= gen.logp - 50)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_sampling_follows_the_tempered_softmax(temperature):
    logits_V = jnp.array([2.0, 1.0, 0.0, -1.0, 0.5])
    n = 20_000
    logits_BV = jnp.tile(logits_V, (n, 1))
    tokens, sample_logp = jax.jit(sample_tokens)(
        logits_BV, jax.random.split(jax.random.key(0), n), jnp.float32(temperature), 1.0
    )
    want = np.asarray(jax.nn.softmax(logits_V.at[0].set(-jnp.inf) / temperature))  # PAD is 0.
    freq = np.bincount(np.asarray(tokens), minlength=5) / n
    np.testing.assert_allclose(freq, want, atol=0.015)
    np.testing.assert_allclose(np.exp(sample_logp), want[np.asarray(tokens)], rtol=1e-5)


def test_top_p_keeps_the_smallest_nucleus():
    logits_BV = jnp.log(jnp.array([[1e-9, 0.5, 0.3, 0.15, 0.05]] * 20_000))
    tokens, _ = jax.jit(sample_tokens)(
        logits_BV, jax.random.split(jax.random.key(1), 20_000), jnp.float32(1.0), 0.75
    )
    assert set(np.unique(np.asarray(tokens)).tolist()) == {1, 2}


def test_stop_automaton_finds_the_marker_across_and_inside_tokens(vocab):
    delta = stop_automaton(END_CALL)
    rng = np.random.default_rng(0)
    alphabet = list(set(END_CALL)) + ["}", "a"]
    for _ in range(2000):
        text = "".join(rng.choice(alphabet, rng.integers(0, 30)))
        state = 0
        for byte in text.encode():
            state = delta[state, byte]
        assert (state == FOUND) == (END_CALL in text), text
    table = token_stop_transitions(vocab, END_CALL)
    for _ in range(300):
        ids = rng.integers(0, vocab.size, rng.integers(1, 12))
        if rng.random() < 0.5:  # Splice the marker's own tokens in somewhere.
            ids = np.insert(ids, rng.integers(0, ids.size), vocab.encode_text(END_CALL + "x"))
        state = 0
        for i in ids:
            state = table[i, state]
        assert (state == FOUND) == (END_CALL in decode_text(vocab, ids))


def test_stops_on_the_marker_the_budget_or_a_full_row(decoder, vocab):
    # A one-character stop string that a random model soon writes.
    stopper = Decoder(decoder_graph(vocab), decoder.params, vocab, MAX_LEN, MAX_NEW, stop="e")
    gens = stopper.generate(prompts(vocab, [5, 6]), jax.random.key(0), temperature=1.0)
    stopped = [g for g in gens if g.stopped]
    assert stopped, f"no row produced an 'e' in {MAX_NEW} tokens"
    for g in stopped:
        assert g.text.endswith("e") and g.text.count("e") == 1
        assert "e" in decode_text(vocab, g.tokens[-1:])
        assert g.tokens.size == g.logp.size == g.sample_logp.size
    # The real marker: a random model never writes it.
    budget, full = decoder.generate(prompts(vocab, [5, MAX_LEN - 3]), jax.random.key(0), 1.0)
    assert budget.tokens.size == MAX_NEW and not budget.stopped
    assert full.tokens.size == 3 and not full.stopped  # Positions MAX_LEN-3 .. MAX_LEN-1.
    with pytest.raises(ValueError, match="prompt of"):
        decoder.generate(prompts(vocab, [MAX_LEN, 3]), jax.random.key(0))
