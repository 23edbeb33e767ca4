"""Generation with a KV cache that stays on the device: jitted `extend` and `decode` calls over
fixed-shape cache rows, shared by the batch API (`Decoder.generate`) and the rollout engine
(`echo_jax.agent.rollout`), which keeps one cache row per episode in flight.

`extend` appends up to C given tokens to each row (a prompt, an observation) and keeps the
logits after each row's last one; `decode` then samples up to M tokens per active row -- greedy
at temperature 0, otherwise softmax(logits / temperature) restricted to the top-p nucleus; PAD is
never sampled -- each row with its own key, temperature and top-p, so a row's tokens do not
depend on which other rows share the call. A row stops once its decoded text contains the stop
string (the call's closing marker, the vocabulary layout's END_CALL), when its token budget is
spent, or when its row is full.

The stop test runs on device: the stop string's KMP automaton is folded over every compact
token's bytes once, on the host, into a [V, states] transition table; each row carries its
automaton state, and one lookup per generated token advances it (a match may straddle tokens or
sit inside one). Nothing recompiles between prompts of different lengths.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import Array

from echo_jax.agent.sampling import sample_tokens
from echo_jax.data.vocab import PAD_ID, Vocab
from echo_jax.model.transformer import KVCache


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
    flat, start_V, length_V = vocab.token_byte_table()
    state_VS = np.tile(np.arange(delta.shape[0], dtype=np.int32), (length_V.size, 1))
    for k in range(int(length_V.max(initial=0))):  # Byte position within the token.
        live = np.flatnonzero(length_V > k)
        byte = flat[start_V[live] + k]
        state_VS[live] = delta[state_VS[live], byte[:, None]]
    return state_VS


class Rows(NamedTuple):
    """Per cache row, what `decode` carries between calls (host numpy or device arrays)."""

    position: Any  # int32 [S]: tokens in the row's cache; the next token goes there
    active: Any  # bool [S]: the row is generating
    budget: Any  # int32 [S]: tokens it may still generate in this call of the policy
    stop_state: Any  # int32 [S]: its stop automaton's state
    key: Any  # uint32 [S, 2]: its random key's data (threefry)
    temperature: Any  # float32 [S]
    top_p: Any  # float32 [S]

    @classmethod
    def empty(cls, rows: int) -> Rows:
        def zeros(dtype, *shape):
            return np.zeros((rows, *shape), dtype)

        return cls(zeros(np.int32), zeros(bool), zeros(np.int32), zeros(np.int32),
                   zeros(np.uint32, 2), zeros(np.float32), np.ones(rows, np.float32))  # fmt: skip


@functools.lru_cache(maxsize=16)
def make_extend_fn(graphdef: nnx.GraphDef):
    """Jitted `(params, cache, logits_SV, tokens_RC, start_R, count_R, rows_R) -> (cache,
    logits_SV)`: appends count_R tokens to cache rows rows_R (distinct; a row with count 0 is
    left as it was, so rows_R may be padded with any row and count 0). Only those R rows are
    computed. The cache is donated. Compiles once per (R, C)."""

    def extend(params, cache, logits_SV, tokens_RC, start_R, count_R, rows_R):
        model = nnx.merge(graphdef, params)
        new_RV, cache = model.extend(tokens_RC, start_R, count_R, cache, rows_R)
        keep_R = jnp.where((count_R > 0)[:, None], new_RV.astype(jnp.float32), logits_SV[rows_R])
        return cache, logits_SV.at[rows_R].set(keep_R)

    return jax.jit(extend, donate_argnums=(1,))


@functools.lru_cache(maxsize=16)
def make_decode_fn(graphdef: nnx.GraphDef, steps: int):
    """Jitted `(params, cache, logits_SV, rows, rows_R, stop_VS) -> (cache, logits_SV, rows,
    out)`: up to `steps` tokens for every active one of the cache rows rows_R (distinct;
    `rows` holds their state, R entries), each fed back into the cache. Only those R rows are
    computed: their cache is gathered once, decoded, and written back. `out` holds tokens_SM,
    logp_SM (under the model's own softmax, as the training forward pass computes it),
    sample_logp_SM (under the distribution sampled), n_S (tokens this call) and stopped_S, per
    row of rows_R. The cache is donated. Compiles once per R."""

    def decode(params, full_cache, full_logits_SV, rows: Rows, rows_R, stop_VS):
        model = nnx.merge(graphdef, params)
        cache = jax.tree.map(lambda x: x[rows_R], full_cache)
        logits_SV = full_logits_SV[rows_R]
        s, t = logits_SV.shape[0], cache[0][0].shape[2]
        zeros_SM = jnp.zeros((s, steps), jnp.float32)
        carry = {
            "i": jnp.zeros((), jnp.int32),
            "cache": cache,
            "logits_SV": logits_SV,
            "rows": rows,
            "tokens_SM": jnp.full((s, steps), PAD_ID, jnp.int32),
            "logp_SM": zeros_SM,
            "sample_logp_SM": zeros_SM,
            "n_S": jnp.zeros((s,), jnp.int32),
            "stopped_S": jnp.zeros((s,), bool),
        }

        def cond(c):
            return (c["i"] < steps) & jnp.any(c["rows"].active)

        def body(c):
            r, i = c["rows"], c["i"]
            keys_S = jax.random.wrap_key_data(r.key)
            split_S2 = jax.vmap(jax.random.split)(keys_S)
            token_S, sample_logp_S = sample_tokens(
                c["logits_SV"], split_S2[:, 1], r.temperature, r.top_p
            )
            picked_S = jnp.take_along_axis(c["logits_SV"], token_S[:, None], axis=-1)[:, 0]
            logp_S = picked_S - jax.nn.logsumexp(c["logits_SV"], axis=-1)  # log_softmax there.
            active_S = r.active
            token_S = jnp.where(active_S, token_S, PAD_ID)
            stop_state_S = stop_VS[token_S, r.stop_state]  # PAD (inactive) keeps it.
            stopped_S = active_S & (stop_state_S == FOUND)
            new_SV, cache = model.extend(
                token_S[:, None], r.position, active_S.astype(jnp.int32), c["cache"]
            )  # Every row: decoding rows are most of them.
            position_S = r.position + active_S
            budget_S = r.budget - active_S
            done_S = stopped_S | (budget_S <= 0) | (position_S >= t)
            rows = r._replace(
                position=position_S,
                active=active_S & ~done_S,
                budget=budget_S,
                stop_state=stop_state_S,
                key=jnp.where(active_S[:, None], jax.random.key_data(split_S2[:, 0]), r.key),
            )
            return {
                "i": i + 1,
                "cache": cache,
                "logits_SV": jnp.where(
                    active_S[:, None], new_SV.astype(jnp.float32), c["logits_SV"]
                ),
                "rows": rows,
                "tokens_SM": c["tokens_SM"].at[:, i].set(token_S),
                "logp_SM": c["logp_SM"].at[:, i].set(jnp.where(active_S, logp_S, 0.0)),
                "sample_logp_SM": c["sample_logp_SM"]
                .at[:, i]
                .set(jnp.where(active_S, sample_logp_S, 0.0)),
                "n_S": c["n_S"] + active_S,
                "stopped_S": c["stopped_S"] | stopped_S,
            }

        c = jax.lax.while_loop(cond, body, carry)
        out = {k: c[k] for k in ("tokens_SM", "logp_SM", "sample_logp_SM", "n_S", "stopped_S")}
        full_cache = jax.tree.map(lambda x, y: x.at[rows_R].set(y), full_cache, c["cache"])
        return full_cache, full_logits_SV.at[rows_R].set(c["logits_SV"]), c["rows"], out

    return jax.jit(decode, donate_argnums=(1,))


PROMPT_CHUNK = 128  # Tokens per row per `extend` call of `Decoder.generate`.


def decode_text(vocab: Vocab, compact_ids: np.ndarray) -> str:
    """Text of compact ids; a model can emit bytes that are not UTF-8, which are replaced."""
    ids = np.asarray(compact_ids)
    return vocab.decode_bytes(ids[ids != PAD_ID]).decode("utf-8", errors="replace")


@dataclasses.dataclass(eq=False, repr=False)
class Decoder:
    """A model, its vocabulary and row length, ready to continue prompts of compact ids.

    `block` is the tokens per call of the rollout engine's decode, which hands finished rows
    back between calls (default: max_new_tokens, one call per generation).
    """

    graphdef: nnx.GraphDef
    params: Any
    vocab: Vocab
    max_len: int
    max_new_tokens: int
    stop: str | None = None  # None: the vocabulary's layout's END_CALL.
    block: int | None = None

    def __post_init__(self) -> None:
        self.stop = self.stop or self.vocab.layout.END_CALL
        self.stop_VS = jnp.asarray(token_stop_transitions(self.vocab, self.stop))
        self.extend_fn = make_extend_fn(self.graphdef)
        self.decode_fn = make_decode_fn(self.graphdef, self.max_new_tokens)
        self.block_fn = make_decode_fn(self.graphdef, self.block or self.max_new_tokens)

    def empty_cache(self, rows: int) -> KVCache:
        return nnx.merge(self.graphdef, self.params).empty_cache(rows, self.max_len)

    def generate(
        self,
        prompts: Sequence[np.ndarray],
        key: Array,
        temperature: float = 0.0,
        top_p: float = 1.0,
    ) -> list[Generation]:
        """Continues each prompt (compact ids, shorter than max_len); one row per prompt, row r
        sampling with the r-th key split from `key`.

        Compiles once per batch size: callers that vary it should pad with repeated prompts.
        """
        b, t = len(prompts), self.max_len
        lengths_B = np.array([p.size for p in prompts], np.int32)
        for n in lengths_B:
            if not 0 < n < t:
                raise ValueError(f"prompt of {n} tokens; need 1..{t - 1} (max_len={t})")
        tokens_BT = np.full((b, t), PAD_ID, np.int32)
        for row, prompt in enumerate(prompts):
            tokens_BT[row, : prompt.size] = prompt
        cache = self.empty_cache(b)
        logits_BV = jnp.zeros((b, self.vocab.size), jnp.float32)
        for lo in range(0, int(lengths_B.max()), PROMPT_CHUNK):
            chunk_BC = np.zeros((b, PROMPT_CHUNK), np.int32)
            width = min(PROMPT_CHUNK, t - lo)
            chunk_BC[:, :width] = tokens_BT[:, lo : lo + width]
            count_B = np.clip(lengths_B - lo, 0, PROMPT_CHUNK).astype(np.int32)
            start_B = np.full(b, lo, np.int32)
            cache, logits_BV = self.extend_fn(
                self.params, cache, logits_BV, chunk_BC, start_B, count_B, np.arange(b)
            )
        rows = Rows(
            position=lengths_B,
            active=np.ones(b, bool),
            budget=np.full(b, self.max_new_tokens, np.int32),
            stop_state=np.zeros(b, np.int32),
            key=np.asarray(jax.random.key_data(jax.random.split(key, b))),
            temperature=np.full(b, temperature, np.float32),
            top_p=np.full(b, top_p, np.float32),
        )
        _, _, _, out = self.decode_fn(
            self.params, cache, logits_BV, rows, np.arange(b), self.stop_VS
        )
        out = jax.device_get(out)
        return [
            self.generation(out, row, int(lengths_B[row]), int(out["n_S"][row])) for row in range(b)
        ]

    def generation(self, out: dict[str, np.ndarray], row: int, prompt_len: int, n: int):
        """Row `row` of a decode call's output, its first n tokens, as a Generation."""
        tokens = out["tokens_SM"][row, :n].astype(np.int32)
        text = decode_text(self.vocab, tokens)
        stopped = bool(out["stopped_S"][row])
        if stopped and self.stop in text:
            text = text[: text.index(self.stop) + len(self.stop)]
        return Generation(
            tokens=tokens,
            logp=out["logp_SM"][row, :n].astype(np.float32),
            sample_logp=out["sample_logp_SM"][row, :n].astype(np.float32),
            text=text,
            stopped=stopped,
            prompt_len=prompt_len,
        )
