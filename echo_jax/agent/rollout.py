"""The rollout engine: many episodes in flight, one batched decoder, token-exact records.

Used by the closed-loop evaluation (`echo_jax.agent.closed_loop`) and the on-policy loop
(`echo_jax.rl.loop`) alike. Every episode runs the AWM harness (`awm.harness.run_episode`) in a
thread of its own, with a world server taken from a pool that keeps servers up across episodes
(reset by restoring the database). When an episode's policy is asked for a call, it hands the
engine the tokens to append to its cache row -- the last observation and the next call marker --
and waits. The engine's loop, in the calling thread, appends every waiting row's tokens with one
jitted `extend` and samples every active row's next tokens with one jitted `decode`
(`echo_jax.agent.decoding`); a row whose call is complete is handed back to its episode, which then
calls its world or verifier while the others decode. KV caches stay on the device.

Token in, token out: a row holds exactly the tokens the model consumed and produced. Each
episode records its rows (`EPISODE_ROWS` on the episode dict): tokens, target roles and, for
every sampled token, the log-probability the sampler computed. A forward pass over a row at the
sampling parameters reproduces those log-probs; that is what the RL update trains on. When the
next prompt no longer fits the row (T minus the call's token budget), the episode continues in a
new row that restarts with the task and tool list and as many recent steps as fit, and those
repeated tokens are CONTEXT there, so every token is a target in one row only. Observations the
sampler never read (the final verify) are appended to the last row as targets.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, TimeoutError
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from echo_jax.agent.decoding import Decoder, Generation, Rows
from echo_jax.agent.rollout_rows import RecordingPolicy
from echo_jax.awm.harness import HarnessConfig, run_episode
from echo_jax.awm.live_world import WORLD_FAILURES
from echo_jax.awm.world_format import World
from echo_jax.awm.world_pool import WorldPool
from echo_jax.data.vocab import PAD_ID, Vocab

log = logging.getLogger(__name__)

# Widths of `extend` calls: the smallest that takes a row's waiting tokens, up to the widest.
EXTEND_CHUNKS = (32, 128, 256)
# Rows per `extend` call: the most that the waiting rows of its width fill. An extend costs
# about as much per row as the row's tokens, so a padded row would cost as much as a real one.
EXTEND_ROWS = (1, 2, 4, 8, 16)
DECODE_ROWS = (1, 2, 4, 8, 16)  # Rows per `decode` call: the smallest that takes the active ones.


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How the engine batches; none of it changes what an episode samples."""

    slots: int = 16  # Episodes in flight: cache rows, episode threads.
    decode_block: int = 32  # Tokens per decode call, after which finished rows are handed back.
    max_new_tokens: int = 128  # Token budget of one call (an unclosed call is a format error).
    max_steps: int = 30  # Tool calls before the harness forces verify.
    servers_per_scenario: int = 2  # World servers kept per scenario (each serves one episode).
    attempts: int = 3  # Tries of an episode whose world fails (restarted between tries).

    @classmethod
    def of(cls, settings: Any, **overrides: Any) -> EngineConfig:
        """The engine's settings from a config with fields of the same names (AgentConfig,
        RLConfig), then `overrides`."""
        names = [f.name for f in dataclasses.fields(cls) if hasattr(settings, f.name)]
        return cls(**{name: getattr(settings, name) for name in names} | overrides)


@dataclasses.dataclass(frozen=True)
class EpisodeRequest:
    scenario: str
    task_idx: int
    seed: int  # The episode's sampling key is jax.random.key(seed).
    temperature: float = 0.0  # 0: greedy.
    top_p: float = 1.0
    tag: dict[str, Any] = dataclasses.field(default_factory=dict)  # Stored as episode["agent"].


@dataclasses.dataclass
class _Waiting:
    policy: RecordingPolicy
    tokens: list[int]  # To write into the cache row ...
    start: int | None  # ... from this position (the row is cut there), or after its end.
    future: Future


@dataclasses.dataclass
class Timing:
    """Where the last `run`'s time went. The loop's parts add up to its wall time; the world
    parts are summed over episodes, which run in threads beside the loop."""

    wall_s: float = 0.0
    decode_s: float = 0.0  # In decode calls (sampling included).
    extend_s: float = 0.0  # In extend calls (prompts and observations into the caches).
    wait_s: float = 0.0  # Idle: every episode in flight was in its world or verifier.
    host_s: float = 0.0  # The rest of the loop: bookkeeping and transfers.
    generated_tokens: int = 0
    decode_calls: int = 0
    extend_calls: int = 0
    env_steps: int = 0
    episodes: int = 0
    tool_s: float = 0.0  # Tool calls, world resets and tool listings.
    verify_s: float = 0.0  # Verifier runs.
    servers_started: int = 0

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


class EngineStopped(RuntimeError):
    """The engine's loop failed; episodes waiting on it stop with this."""


class RolloutEngine:
    """Runs episode requests in the worlds with one model; see the module docstring."""

    def __init__(
        self,
        graphdef: nnx.GraphDef,
        params: Any,
        vocab: Vocab,
        max_len: int,
        worlds: dict[str, World],
        config: EngineConfig,
        canonical_json: bool = False,
        pool: WorldPool | None = None,
    ):
        decoder = Decoder(graphdef, params, vocab, max_len, config.max_new_tokens,
                          block=config.decode_block)  # fmt: skip
        self.decoder = decoder
        self.vocab = decoder.vocab
        self.worlds = worlds
        self.config = config
        self.canonical_json = canonical_json
        # A pool made beforehand (`world_pool`) may have servers starting already; it is the
        # engine's from here on, closed with it.
        self.pool = pool or world_pool(worlds, config)
        self._servers_counted = 0  # Servers started before the last `run` ended.
        self.inbox: queue.Queue[_Waiting] = queue.Queue()
        self.free_slots: queue.Queue[int] = queue.Queue()
        for slot in range(config.slots):
            self.free_slots.put(slot)
        self.cache = decoder.empty_cache(config.slots)
        self.logits_SV = jnp.zeros((config.slots, decoder.vocab.size), jnp.float32)
        self.timing = Timing()
        self._lock = threading.Lock()
        self._failed: BaseException | None = None

    def set_params(self, params: Any) -> None:
        """The policy for the next `run` (caches are refilled by every episode)."""
        self.decoder.params = params

    def close(self) -> None:
        self.pool.close()

    def __enter__(self) -> RolloutEngine:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # --- episode threads -------------------------------------------------------------------

    def generate(
        self, policy: RecordingPolicy, tokens: list[int], start: int | None = None
    ) -> Generation:
        """The policy's next call, after `tokens` are written into its cache row from `start`
        (None: after what the row holds). Blocks the episode's thread until it is sampled."""
        waiting = _Waiting(policy, tokens, start, Future())
        self.inbox.put(waiting)
        while True:
            try:
                return waiting.future.result(timeout=1.0)
            except TimeoutError:
                if self._failed is not None:
                    raise EngineStopped("the rollout engine's loop failed") from self._failed

    def _episode(self, request: EpisodeRequest) -> dict[str, Any]:
        slot = self.free_slots.get()
        try:
            world = self.worlds[request.scenario]
            harness = HarnessConfig(max_tool_calls=self.config.max_steps)
            for attempt in range(self.config.attempts):
                live = self.pool.acquire(request.scenario)
                timings: collections.Counter[str] = collections.Counter()
                try:
                    tools = [tool["name"] for tool in live.client.list_tools()]
                    policy = RecordingPolicy(self, slot, request, tools)
                    episode = run_episode(
                        live.server, live.client, world, request.task_idx, policy, harness,
                        timings, self.pool.verifiers,
                    )  # fmt: skip
                    episode = policy.finish(episode)
                    episode["agent"] = dict(request.tag)
                    return episode
                except WORLD_FAILURES as error:
                    log.warning("%s task %d: %s; restarting the world", world.name,
                                request.task_idx, error)  # fmt: skip
                    if attempt + 1 == self.config.attempts:
                        raise
                    live.restart()
                    with self._lock:
                        self.pool.started += 1
                finally:
                    self.pool.release(live)
                    with self._lock:
                        self.timing.tool_s += timings["tool_s"]
                        self.timing.verify_s += timings["verify_s"]
            raise AssertionError("unreachable")
        finally:
            self.free_slots.put(slot)

    # --- the loop, in the calling thread -----------------------------------------------------

    def run(self, requests: Sequence[EpisodeRequest], skip_failed: bool = False) -> list:
        """Every request's episode (capture format, each step's policy record and the rows
        attached), in request order. Scenarios are interleaved, so that the episodes in
        flight spread over worlds. An episode whose world fails on every attempt raises, or
        with skip_failed stands in the list as its exception."""
        started = time.perf_counter()
        self.timing = Timing()  # This run's figures only.
        futures = {i: self.pool.threads.submit(self._episode, requests[i])
                   for i in interleave_scenarios([r.scenario for r in requests])}  # fmt: skip
        try:
            self._loop(list(futures.values()), skip_failed)
        except BaseException as error:
            self._failed = error
            raise
        episodes = [futures[i].exception() or futures[i].result() for i in range(len(requests))]
        t = self.timing
        t.wall_s += time.perf_counter() - started
        t.episodes += len(episodes)
        t.env_steps += sum(len(ep["steps"]) for ep in episodes if isinstance(ep, dict))
        t.servers_started += self.pool.started - self._servers_counted  # Prestarted included.
        self._servers_counted = self.pool.started
        return episodes

    def _loop(self, futures: list[Future], skip_failed: bool) -> None:
        cfg, dec, t = self.config, self.decoder, self.timing
        row_buckets = sorted({min(b, cfg.slots) for b in EXTEND_ROWS})
        decode_buckets = sorted({min(b, cfg.slots) for b in DECODE_ROWS})
        rows = Rows.empty(cfg.slots)
        pending: dict[int, list[int]] = {}  # Slot -> tokens still to append.
        serving: dict[int, _Waiting] = {}  # Slot -> the call it is generating.
        produced: dict[int, list[dict[str, np.ndarray]]] = {}
        clock = time.perf_counter()

        def lap(field: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            setattr(t, field, getattr(t, field) + now - clock)
            clock = now

        while True:
            idle = not pending and not rows.active.any()
            try:
                waiting = self.inbox.get(timeout=0.02) if idle else self.inbox.get_nowait()
            except queue.Empty:
                waiting = None
            if idle:
                lap("wait_s")
                if waiting is None:
                    if all(f.done() for f in futures):
                        for f in futures:
                            error = f.exception()
                            if error is not None and not (
                                skip_failed and isinstance(error, WORLD_FAILURES)
                            ):
                                raise error
                        return
                    continue
            while waiting is not None:  # Every call asked for since the last pass.
                slot, policy = waiting.policy.slot, waiting.policy
                if waiting.start is not None:
                    rows.position[slot] = waiting.start
                if not policy.records:  # The episode's first call: its own key.
                    rows.key[slot] = policy.key
                rows.temperature[slot] = policy.request.temperature
                rows.top_p[slot] = policy.request.top_p
                serving[slot], pending[slot], produced[slot] = waiting, waiting.tokens, []
                try:
                    waiting = self.inbox.get_nowait()
                except queue.Empty:
                    waiting = None
            lap("host_s")

            while pending:  # Append the waiting rows' tokens: the widest chunks first.
                c, group = next_extend({slot: len(toks) for slot, toks in pending.items()},
                                       row_buckets)  # fmt: skip
                r, rows_R = len(group), np.array(group, np.int32)
                tokens_RC = np.full((r, c), PAD_ID, np.int32)
                count_R = np.zeros(r, np.int32)
                for i, slot in enumerate(group):
                    toks = pending[slot]
                    n = min(c, len(toks))
                    tokens_RC[i, :n] = toks[:n]
                    count_R[i] = n
                    pending[slot] = toks[n:]
                    if not pending[slot]:
                        del pending[slot]
                        rows.active[slot] = True
                        rows.budget[slot] = cfg.max_new_tokens
                        rows.stop_state[slot] = 0
                start_R = rows.position[rows_R].copy()
                rows.position[rows_R] += count_R
                lap("host_s")
                self.cache, self.logits_SV = dec.extend_fn(
                    dec.params, self.cache, self.logits_SV, tokens_RC, start_R, count_R, rows_R
                )
                t.extend_calls += 1
                _ready(self.logits_SV)  # So that extend_s holds the extends' compute.
                lap("extend_s")

            if rows.active.any():
                decoding = np.flatnonzero(rows.active)
                r = _bucket(decode_buckets, decoding.size)
                idle = np.flatnonzero(~rows.active)
                rows_R = np.concatenate([decoding[:r], idle[: r - decoding[:r].size]])
                self.cache, self.logits_SV, new_rows, out = dec.block_fn(
                    dec.params, self.cache, self.logits_SV,
                    Rows(*(x[rows_R] for x in rows)), rows_R.astype(np.int32), dec.stop_VS,
                )  # fmt: skip
                new_rows, out = jax.device_get(_ready((new_rows, out)))
                t.decode_calls += 1
                lap("decode_s")
                for field, value in zip(rows, new_rows, strict=True):
                    field[rows_R] = value
                for i, slot in enumerate(rows_R[: min(r, decoding.size)]):
                    n = int(out["n_S"][i])
                    t.generated_tokens += n
                    produced[slot].append({k: v[i, :n] for k, v in out.items() if v.ndim == 2})
                    if not rows.active[slot]:
                        stopped = bool(out["stopped_S"][i])
                        self._hand_back(serving.pop(slot), produced.pop(slot), stopped)
                lap("host_s")

    def _hand_back(self, waiting: _Waiting, parts: list[dict[str, np.ndarray]], stopped: bool):
        out = {k: np.concatenate([p[k] for p in parts])[None] for k in parts[0]}
        out["stopped_S"] = np.array([stopped])
        prompt_len = len(waiting.policy.trace.rows[-1].tokens)
        gen = self.decoder.generation(out, 0, prompt_len, out["tokens_SM"].shape[1])
        waiting.future.set_result(gen)


def _ready(tree):
    """`tree` once computed. JAX's own wait keeps the waiting thread busy, which on a small
    CPU takes a core from the computation; a short sleep between checks does not."""
    leaves = jax.tree.leaves(tree)
    while not all(x.is_ready() for x in leaves):
        time.sleep(2e-4)
    return tree


def world_pool(worlds: dict[str, World], config: EngineConfig) -> WorldPool:
    """The pool of world servers and episode threads an engine with `config` runs on."""
    return WorldPool(worlds, config.slots, config.servers_per_scenario)


def next_extend(waiting: dict[int, int], row_buckets: Sequence[int]) -> tuple[int, list[int]]:
    """The next extend call's width and rows, from each waiting row's token count: the widest
    chunks first (rows of a call share its width, since padding costs as much as tokens), as
    many rows as fill one of row_buckets (ascending, from 1); the rest wait for later calls."""
    width = {slot: _bucket(EXTEND_CHUNKS, n) for slot, n in waiting.items()}
    c = max(width.values())
    group = [slot for slot in waiting if width[slot] == c]
    return c, group[: max(b for b in row_buckets if b <= len(group))]


def _bucket(sizes: Sequence[int], n: int) -> int:
    """The smallest of `sizes` (ascending) that holds n, else the largest."""
    return next((size for size in sizes if size >= n), sizes[-1])


def interleave_scenarios(scenarios: Sequence[str]) -> list[int]:
    """Indices of episodes of these scenarios, round-robin over scenarios in first-seen order."""
    lanes: dict[str, collections.deque[int]] = {}
    for i, scenario in enumerate(scenarios):
        lanes.setdefault(scenario, collections.deque()).append(i)
    order = []
    while lanes:
        for scenario in list(lanes):
            order.append(lanes[scenario].popleft())
            if not lanes[scenario]:
                del lanes[scenario]
    return order
