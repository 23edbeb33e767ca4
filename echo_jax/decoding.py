"""Batched generation with a KV cache: one jitted prefill + `lax.while_loop` of decode steps.

Prompts are left-aligned in rows of the model's training length T (the cache has T slots, and
rotary positions continue from each row's own prompt length). Each step samples one token per
row -- greedy at temperature 0, otherwise softmax(logits / temperature) restricted to the top-p
nucleus; PAD is never sampled -- and a row stops once its decoded text contains the stop string
(the call's closing marker, `render.END_CALL`), after `max_new_tokens`, or when its row is full.

The stop test runs on device: the stop string's KMP automaton is folded over every compact
token's bytes once, on the host, into a [V, states] transition table; each row carries its
automaton state, and one lookup per generated token advances it (a match may straddle tokens or
sit inside one). So the whole generation is one jitted call with fixed shapes; nothing
recompiles between prompts of different lengths.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import Array

from echo_jax import tokenizer
from echo_jax.render import END_CALL
from echo_jax.vocab import PAD_ID, Vocab


@dataclasses.dataclass(frozen=True)
class Generation:
    """One row's output; arrays cover every generated token, the one closing the call included."""

    tokens: np.ndarray  # int32 [n]: compact ids
    logp: np.ndarray  # float32 [n]: log-prob under the model's own softmax (temperature 1), as
    #                   the training forward pass computes it: PPO's old_logp for these tokens
    sample_logp: np.ndarray  # float32 [n]: log-prob under the distribution actually sampled
    #                   (temperature, top-p, PAD masked); 0 for greedy decoding
    text: str  # decoded text (invalid UTF-8 replaced), cut just after the stop string if found
    stopped: bool  # the stop string was produced
    prompt_len: int  # tokens in the prompt


MAX_STOP_BYTES = 32  # Automata are padded to this many states, so stop strings share compiles.
FOUND = MAX_STOP_BYTES  # The automaton state "the stop string has occurred" (absorbing).


def stop_automaton(stop: str) -> np.ndarray:
    """int32 [MAX_STOP_BYTES + 1, 256]: the KMP automaton of the stop string's bytes. State s <
    len(stop) is "the last s bytes read are its first s"; FOUND is absorbing."""
    pattern = stop.encode()
    m = len(pattern)
    if not 0 < m < MAX_STOP_BYTES:
        raise ValueError(f"stop string of {m} bytes; need 1..{MAX_STOP_BYTES - 1}")
    delta = np.full((FOUND + 1, 256), FOUND, np.int32)
    delta[:m] = 0
    fallback = 0
    for state in range(m):
        if state:
            delta[state] = delta[fallback]
            fallback = delta[fallback, pattern[state]]
        delta[state, pattern[state]] = state + 1 if state + 1 < m else FOUND
    return delta


def token_stop_transitions(vocab: Vocab, stop: str) -> np.ndarray:
    """int32 [V, FOUND + 1]: the stop automaton's state after reading each compact token's
    bytes from each state, so the device loop needs one lookup per token. PAD keeps the state."""
    delta = stop_automaton(stop)
    table = tokenizer.byte_table()
    ids = vocab.cl100k_ids
    length_V = np.where(ids >= 0, table.length[np.maximum(ids, 0)], 0)
    start_V = table.start[np.maximum(ids, 0)]
    state_VS = np.tile(np.arange(delta.shape[0], dtype=np.int32), (ids.size, 1))
    for k in range(int(length_V.max(initial=0))):  # Byte position within the token.
        live = np.flatnonzero(length_V > k)
        byte = table.flat[start_V[live] + k]
        state_VS[live] = delta[state_VS[live], byte[:, None]]
    return state_VS


NUCLEUS_BISECTIONS = 32  # Halvings of [0, max prob] that locate the top-p cut-off.


def nucleus_mask(probs_BV: Array, top_p: Array) -> Array:
    """bool [B, V]: the smallest set of most likely tokens holding at least top_p of the mass
    (ties at the cut-off stay in; at least the most likely token; everything when top_p >= 1).

    The cut-off probability is found by bisection -- {p >= c} must hold >= top_p of the mass --
    which costs a few passes over V instead of a sort.
    """

    def halve(_, bounds):
        lo_B, hi_B = bounds
        mid_B = 0.5 * (lo_B + hi_B)
        mass_B = jnp.sum(jnp.where(probs_BV >= mid_B[:, None], probs_BV, 0.0), axis=-1)
        enough_B = mass_B >= top_p
        return jnp.where(enough_B, mid_B, lo_B), jnp.where(enough_B, hi_B, mid_B)

    max_B = probs_BV.max(axis=-1)
    lo_B, _ = jax.lax.fori_loop(
        0, NUCLEUS_BISECTIONS, halve, (jnp.zeros_like(max_B), max_B * (1 + 1e-6))
    )
    keep_BV = probs_BV >= jnp.minimum(lo_B, max_B)[:, None]
    return keep_BV | (top_p >= 1.0)


def sample_tokens(
    logits_BV: Array, key: Array, temperature: Array, top_p: Array
) -> tuple[Array, Array]:
    """(token [B], its log-prob under the sampled distribution [B]).

    Greedy (log-prob 0) when temperature <= 0. Otherwise softmax(logits / temperature)
    restricted to its top-p nucleus (`nucleus_mask`). PAD is never chosen.
    """
    logits_BV = logits_BV.astype(jnp.float32)
    logits_BV = logits_BV.at[:, PAD_ID].set(-jnp.inf)
    greedy_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    scaled_BV = logits_BV / jnp.maximum(temperature, 1e-6)
    keep_BV = nucleus_mask(jax.nn.softmax(scaled_BV, axis=-1), top_p)
    filtered_BV = jnp.where(keep_BV, scaled_BV, -jnp.inf)
    sampled_B = jax.random.categorical(key, filtered_BV, axis=-1).astype(jnp.int32)
    logp_B = jnp.take_along_axis(
        jax.nn.log_softmax(filtered_BV, axis=-1), sampled_B[:, None], axis=-1
    )[:, 0]
    is_greedy = temperature <= 0
    return jnp.where(is_greedy, greedy_B, sampled_B), jnp.where(is_greedy, 0.0, logp_B)


@functools.lru_cache(maxsize=16)
def make_generate_fn(graphdef: nnx.GraphDef, max_new_tokens: int):
    """The jitted `(params, tokens_BT, lengths_B, key, temperature, top_p, stop_VS) -> dict of
    arrays` for one model graph and token budget (stop_VS from `token_stop_transitions`).

    Cached, so decoders of one model share compilations (one per batch size and stop length).
    """

    def generate(params, tokens_BT, lengths_B, key, temperature, top_p, stop_VS):
        model = nnx.merge(graphdef, params)
        b, t = tokens_BT.shape
        logits_BV, cache_k, cache_v = model.prefill(tokens_BT, lengths_B)
        zeros_BN = jnp.zeros((b, max_new_tokens), jnp.float32)
        state = {
            "i": jnp.zeros((), jnp.int32),
            "logits_BV": logits_BV.astype(jnp.float32),
            "cache_k": cache_k,
            "cache_v": cache_v,
            "key": key,
            "tokens_BN": jnp.full((b, max_new_tokens), PAD_ID, jnp.int32),
            "logp_BN": zeros_BN,
            "sample_logp_BN": zeros_BN,
            "n_B": jnp.zeros((b,), jnp.int32),
            "done_B": lengths_B >= t,
            "stopped_B": jnp.zeros((b,), bool),
            "stop_state_B": jnp.zeros((b,), jnp.int32),
        }

        def cond(s):
            return (s["i"] < max_new_tokens) & ~jnp.all(s["done_B"])

        def body(s):
            key, sub = jax.random.split(s["key"])
            token_B, sample_logp_B = sample_tokens(s["logits_BV"], sub, temperature, top_p)
            logp_B = jnp.take_along_axis(
                jax.nn.log_softmax(s["logits_BV"], axis=-1), token_B[:, None], axis=-1
            )[:, 0]
            active_B = ~s["done_B"]
            token_B = jnp.where(active_B, token_B, PAD_ID)
            i = s["i"]
            stop_state_B = stop_VS[token_B, s["stop_state_B"]]  # PAD (inactive) keeps it.
            stopped_B = stop_state_B == FOUND
            positions_B = lengths_B + i  # Where this step's token sits.
            full_B = positions_B + 1 >= t
            logits_BV, cache_k, cache_v = model.decode_step(
                token_B, jnp.minimum(positions_B, t - 1), s["cache_k"], s["cache_v"]
            )
            return {
                "i": i + 1,
                "logits_BV": logits_BV.astype(jnp.float32),
                "cache_k": cache_k,
                "cache_v": cache_v,
                "key": key,
                "tokens_BN": s["tokens_BN"].at[:, i].set(token_B),
                "logp_BN": s["logp_BN"].at[:, i].set(jnp.where(active_B, logp_B, 0.0)),
                "sample_logp_BN": s["sample_logp_BN"]
                .at[:, i]
                .set(jnp.where(active_B, sample_logp_B, 0.0)),
                "n_B": s["n_B"] + active_B,
                "done_B": s["done_B"] | stopped_B | full_B,
                "stopped_B": stopped_B,
                "stop_state_B": stop_state_B,
            }

        out = jax.lax.while_loop(cond, body, state)
        return {k: out[k] for k in ("tokens_BN", "logp_BN", "sample_logp_BN", "n_B", "stopped_B")}

    return jax.jit(generate)


def decode_text(vocab: Vocab, compact_ids: np.ndarray) -> str:
    """Text of compact ids; a model can emit bytes that are not UTF-8, which are replaced."""
    ids = np.asarray(compact_ids)
    ids = ids[ids != PAD_ID]
    raw = tokenizer.encoding().decode_bytes(vocab.cl100k_ids[ids].tolist())
    return raw.decode("utf-8", errors="replace")


class Decoder:
    """A model, its vocabulary and row length, ready to continue prompts of compact ids."""

    def __init__(
        self,
        graphdef: nnx.GraphDef,
        params: Any,
        vocab: Vocab,
        max_len: int,
        max_new_tokens: int,
        stop: str = END_CALL,
    ):
        self.params = params
        self.vocab = vocab
        self.max_len = max_len
        self.max_new_tokens = max_new_tokens
        self.stop = stop
        self._stop_VS = jnp.asarray(token_stop_transitions(vocab, stop))
        self._generate = make_generate_fn(graphdef, max_new_tokens)

    def generate(
        self,
        prompts: Sequence[np.ndarray],
        key: Array,
        temperature: float = 0.0,
        top_p: float = 1.0,
    ) -> list[Generation]:
        """Continues each prompt (compact ids, shorter than max_len); one row per prompt.

        Compiles once per batch size: callers that vary it should pad with repeated prompts.
        """
        b, t = len(prompts), self.max_len
        tokens_BT = np.full((b, t), PAD_ID, np.int32)
        lengths_B = np.zeros(b, np.int32)
        for row, prompt in enumerate(prompts):
            if not 0 < prompt.size < t:
                raise ValueError(f"prompt of {prompt.size} tokens; need 1..{t - 1} (max_len={t})")
            tokens_BT[row, : prompt.size] = prompt
            lengths_B[row] = prompt.size
        out = jax.device_get(
            self._generate(
                self.params,
                tokens_BT,
                lengths_B,
                key,
                jnp.float32(temperature),
                jnp.float32(top_p),
                self._stop_VS,
            )
        )
        results = []
        for row in range(b):
            n = int(out["n_B"][row])
            tokens = out["tokens_BN"][row, :n].astype(np.int32)
            text = decode_text(self.vocab, tokens)
            stopped = bool(out["stopped_B"][row])
            if stopped and self.stop in text:
                text = text[: text.index(self.stop) + len(self.stop)]
            results.append(
                Generation(
                    tokens=tokens,
                    logp=out["logp_BN"][row, :n].astype(np.float32),
                    sample_logp=out["sample_logp_BN"][row, :n].astype(np.float32),
                    text=text,
                    stopped=stopped,
                    prompt_len=int(lengths_B[row]),
                )
            )
        return results
