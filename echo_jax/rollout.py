"""The rollout engine: many episodes in flight, one batched decoder, token-exact records.

Used by the closed-loop evaluation (`echo_jax.closed_loop`) and the on-policy loop
(`echo_jax.rl`) alike. Every episode runs the AWM harness (`awm.harness.run_episode`) in a
thread of its own, with a world server taken from a pool that keeps servers up across episodes
(reset by restoring the database). When an episode's policy is asked for a call, it hands the
engine the tokens to append to its cache row -- the last observation and the next call marker --
and waits. The engine's loop, in the calling thread, appends every waiting row's tokens with one
jitted `extend` and samples every active row's next tokens with one jitted `decode`
(`echo_jax.decoding`); a row whose call is complete is handed back to its episode, which then
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
from concurrent.futures import Future, ThreadPoolExecutor, TimeoutError
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from echo_jax import roles
from echo_jax.agent import POLICY_KEY, ActionParseError, parse_action
from echo_jax.awm.capture import WORLD_FAILURES, LiveWorld
from echo_jax.awm.harness import PARSE_ERROR_KEY, HarnessConfig, run_episode
from echo_jax.awm.world_format import World
from echo_jax.decoding import Decoder, Generation, Rows
from echo_jax.episodes import WARNING_FIELD
from echo_jax.packing import to_compact
from echo_jax.render import (
    CALL_MARK,
    FIELD_MARKS,
    Rendered,
    render_action,
    render_observation,
    render_prefix,
)
from echo_jax.tokenizer import tokenize_rendered
from echo_jax.vocab import PAD_ID, Vocab

log = logging.getLogger(__name__)

EPISODE_ROWS = "rows"  # Episode key of the token-exact rows (list of `row_record`s).
EXTEND_CHUNKS = (32, 256)  # Widths of `extend` calls: short observations, then long ones.
EXTEND_ROWS = (1, 4, 16)  # Rows per `extend` call: the smallest that takes the waiting ones.
DECODE_ROWS = (4, 8, 16)  # Rows per `decode` call: the smallest that takes the active ones.


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How the engine batches; none of it changes what an episode samples."""

    slots: int = 16  # Episodes in flight: cache rows, episode threads.
    decode_block: int = 16  # Tokens per decode call, after which finished rows are handed back.
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


# The kind of each observation token, for per-kind env-term weights (RLConfig.weight_*).
NO_KIND, TOOL_RESULT, TOOL_ERROR, VERIFIER, WARNING_TEXT = range(5)
_KIND_OF_MARK = {
    FIELD_MARKS["tool_result"]: TOOL_RESULT,
    FIELD_MARKS["error"]: TOOL_ERROR,
    FIELD_MARKS["verify_result"]: VERIFIER,
    FIELD_MARKS[WARNING_FIELD]: WARNING_TEXT,
}
_KINDS = 8  # Roles and kinds travel through the tokenizer as role * _KINDS + kind.


def observation_segments(observation: dict[str, Any], canonical_json: bool):
    """`render_observation`'s segments, each body tagged with its kind: (text, role, kind)."""
    out, kind = [], NO_KIND
    for text, role in render_observation(observation, canonical_json):
        kind = _KIND_OF_MARK.get(text, kind) if role == roles.CONTEXT else kind
        out.append((text, role, NO_KIND if role == roles.CONTEXT else kind))
    return out


def segments_to_tokens(segments: Sequence[tuple], vocab: Vocab):
    """(compact ids, roles, kinds) of (text, role[, kind]) segments, tokenized as training
    tokenizes them."""
    tagged = tuple((s[0], s[1] * _KINDS + (s[2] if len(s) > 2 else NO_KIND)) for s in segments)
    compact = to_compact(tokenize_rendered(Rendered(tagged, 0, ())), vocab)
    tags = compact.roles.astype(np.int32)
    return compact.ids.tolist(), (tags // _KINDS).tolist(), (tags % _KINDS).tolist()


@dataclasses.dataclass
class RowRecord:
    """One training row of an episode: tokens, the role of each as a target, the kind of each
    observation token, and sampling log-probs (0 where the token was not sampled)."""

    tokens: list[int] = dataclasses.field(default_factory=list)
    roles: list[int] = dataclasses.field(default_factory=list)
    kinds: list[int] = dataclasses.field(default_factory=list)
    logp: list[float] = dataclasses.field(default_factory=list)

    def extend(self, tokens, token_roles, kinds=None, logp=None) -> None:
        self.tokens.extend(tokens)
        self.roles.extend(token_roles)
        self.kinds.extend(kinds if kinds is not None else [NO_KIND] * len(tokens))
        self.logp.extend(logp if logp is not None else [0.0] * len(tokens))

    def as_dict(self) -> dict[str, list]:
        return dataclasses.asdict(self)


class EpisodeTokens:
    """The token stream of one episode and the rows it is cut into.

    stream: every token after the CONTEXT prefix that the cache rows took, in order (call
    markers, sampled calls, observations); step_starts: where each step's call marker sits.
    """

    def __init__(self, prefix: list[int], max_len: int):
        self.prefix = prefix
        self.max_len = max_len
        self.stream: list[int] = []
        self.step_starts: list[int] = []
        self.rows: list[RowRecord] = []
        self.dropped_targets = 0  # Target tokens cut from an extension longer than a row.

    def append(self, tokens: list[int], token_roles: list[int], kinds: list[int],
               budget: int) -> list[int] | None:  # fmt: skip
        """Adds tokens to the current row or, when that would pass `budget` tokens, to a new
        row: the prefix, the most recent whole steps that fit (as CONTEXT), then the tokens
        (their start cut off if even they alone do not fit). Returns the new row's tokens, or
        None when the current row took them."""
        if self.rows and len(self.rows[-1].tokens) + len(tokens) <= budget:
            self.rows[-1].extend(tokens, token_roles, kinds)
            self.stream.extend(tokens)
            return None
        row = RowRecord()
        row.extend(self.prefix, [roles.CONTEXT] * len(self.prefix))
        room = budget - len(self.prefix) - len(tokens)
        fitting = [s for s in self.step_starts if len(self.stream) - s <= room]
        if fitting:
            kept = self.stream[fitting[0] :]
            row.extend(kept, [roles.CONTEXT] * len(kept))
        elif room < 0:
            cut = -room
            self.dropped_targets += sum(r != roles.CONTEXT for r in token_roles[:cut])
            tokens, token_roles, kinds = tokens[cut:], token_roles[cut:], kinds[cut:]
        row.extend(tokens, token_roles, kinds)
        self.rows.append(row)
        self.stream.extend(tokens)
        return row.tokens

    def start_step(self, marker_len: int) -> None:
        """The call marker just appended (the stream's last marker_len tokens) starts a step."""
        self.step_starts.append(len(self.stream) - marker_len)

    def sampled(self, gen: Generation) -> None:
        tokens = gen.tokens.tolist()
        self.rows[-1].extend(tokens, [roles.ACTION] * len(tokens), logp=gen.logp.tolist())
        self.stream.extend(tokens)


class _EnginePolicy:
    """A harness policy whose calls come from the engine's batched decoder."""

    def __init__(self, engine: RolloutEngine, slot: int, request: EpisodeRequest, tools):
        self.engine = engine
        self.slot = slot
        self.request = request
        self.vocab = engine.vocab
        self.canonical = engine.canonical_json
        self.max_new = engine.config.max_new_tokens
        task = engine.worlds[request.scenario].tasks[request.task_idx]
        prefix, _, _ = segments_to_tokens(render_prefix(task, list(tools)), self.vocab)
        self.trace = EpisodeTokens(prefix, engine.decoder.max_len)
        marker, _, _ = segments_to_tokens([(CALL_MARK, roles.CONTEXT)], self.vocab)
        if len(prefix) + len(marker) > self.trace.max_len - self.max_new:
            raise ValueError(
                f"{request.scenario} task {request.task_idx}: the task and tool list take "
                f"{len(prefix)} tokens; with the call marker they do not fit a prompt of "
                f"{self.trace.max_len - self.max_new} (max_len minus max_new_tokens)"
            )
        self.marker_len = len(marker)
        self.records: list[dict[str, Any]] = []
        self.consumed_steps = 0  # Harness steps whose observation the stream holds.
        self.last_text = ""
        self.key = np.asarray(jax.random.key_data(jax.random.key(request.seed)))

    def _unread(self, steps: Sequence[dict[str, Any]]) -> list[tuple[str, int]]:
        """Segments of the steps the stream does not hold yet: the last sampled call's
        observation (after a newline closing an unclosed call), then any call the harness
        made itself (the forced verify, as CONTEXT) with its observation."""
        segments: list[tuple[str, int]] = []
        for i in range(self.consumed_steps, len(steps)):
            step = steps[i]
            if i >= len(self.records):
                action = step["action"]
                text = render_action(action["tool_name"], action.get("arguments", {}))
                segments += [(CALL_MARK, roles.CONTEXT), (text, roles.CONTEXT)]
            elif not self.last_text.endswith("\n"):
                segments.append(("\n", roles.CONTEXT))
            segments.extend(observation_segments(step["observation"], self.canonical))
        self.consumed_steps = len(steps)
        return segments

    def next_action(self, steps: list[dict[str, Any]]) -> dict[str, Any]:
        segments = [*self._unread(steps), (CALL_MARK, roles.CONTEXT)]
        tokens, token_roles, kinds = segments_to_tokens(segments, self.vocab)
        new_row = self.trace.append(tokens, token_roles, kinds, self.trace.max_len - self.max_new)
        self.trace.start_step(self.marker_len)
        reset = new_row is not None
        gen = self.engine.generate(self, new_row if reset else tokens, reset)
        self.trace.sampled(gen)
        self.last_text = gen.text
        try:
            action = parse_action(gen.text)
            error = None
        except ActionParseError as e:
            error = str(e)
            action = {PARSE_ERROR_KEY: f"unparsable call: {error}", "raw": gen.text[:2000]}
        self.records.append(
            {
                "text": gen.text,
                "tokens": gen.tokens.tolist(),
                "logp": [round(float(x), 6) for x in gen.logp],
                "sample_logp": [round(float(x), 6) for x in gen.sample_logp],
                "closed": gen.stopped,
                "parse_error": error,
                "prompt_tokens": gen.prompt_len,
                "row": len(self.trace.rows) - 1,
                "history_cut": len(self.trace.rows) > 1,
            }
        )
        return action

    def finish(self, episode: dict[str, Any]) -> dict[str, Any]:
        """Puts each call's record on its step, the observations the sampler never read into
        the last row (a new one if they do not fit), and the rows on the episode."""
        segments = self._unread(episode["steps"])
        if segments:
            tokens, token_roles, kinds = segments_to_tokens(segments, self.vocab)
            self.trace.append(tokens, token_roles, kinds, self.trace.max_len)
        steps = episode["steps"]
        if not len(steps) - 1 <= len(self.records) <= len(steps):
            raise ValueError(f"{len(self.records)} policy records for {len(steps)} steps")
        for step, record in zip(steps, self.records, strict=False):
            step[POLICY_KEY] = record
        episode[EPISODE_ROWS] = [row.as_dict() for row in self.trace.rows]
        episode["dropped_target_tokens"] = self.trace.dropped_targets
        return episode


class WorldPool:
    """Live servers per scenario, started on first use and kept until `close`, and the threads
    that run episodes on them. The threads live as long as the pool: a server gets SIGKILL when
    the thread that started it ends (PR_SET_PDEATHSIG follows the parent thread)."""

    def __init__(self, worlds: dict[str, World], threads: int, per_scenario: int = 2):
        self.worlds = worlds
        self.per_scenario = per_scenario
        self.idle: dict[str, list[LiveWorld]] = collections.defaultdict(list)
        self.count: collections.Counter[str] = collections.Counter()
        self.cond = threading.Condition()
        self.threads = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="episode")
        self.started = 0  # Servers started (restarts included).

    def acquire(self, scenario: str) -> LiveWorld:
        with self.cond:
            while not self.idle[scenario] and self.count[scenario] >= self.per_scenario:
                self.cond.wait()
            if self.idle[scenario]:
                return self.idle[scenario].pop()
            self.count[scenario] += 1
        live = LiveWorld(self.worlds[scenario])
        try:
            live.open()
        except BaseException:
            with self.cond:
                self.count[scenario] -= 1
                self.cond.notify_all()
            raise
        self.started += 1
        return live

    def release(self, live: LiveWorld) -> None:
        with self.cond:
            self.idle[live.world.name].append(live)
            self.cond.notify_all()

    def close(self) -> None:
        self.threads.shutdown(wait=True)
        for lives in self.idle.values():
            for live in lives:
                live.close()
        self.idle.clear()
        self.count.clear()


@dataclasses.dataclass
class _Waiting:
    policy: _EnginePolicy
    tokens: list[int]  # To append to the cache row.
    reset: bool  # The row starts afresh with these tokens.
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
    ):
        decoder = Decoder(graphdef, params, vocab, max_len, config.max_new_tokens,
                          block=config.decode_block)  # fmt: skip
        self.decoder = decoder
        self.vocab = decoder.vocab
        self.worlds = worlds
        self.config = config
        self.canonical_json = canonical_json
        self.pool = WorldPool(worlds, config.slots, config.servers_per_scenario)
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

    def generate(self, policy: _EnginePolicy, tokens: list[int], reset: bool) -> Generation:
        waiting = _Waiting(policy, tokens, reset, Future())
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
                    policy = _EnginePolicy(self, slot, request, tools)
                    episode = run_episode(
                        live.server, live.client, world, request.task_idx, policy, harness,
                        timings,
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
        servers = self.pool.started
        self.timing = Timing()  # This run's figures only.
        futures = {i: self.pool.threads.submit(self._episode, requests[i])
                   for i in _interleave_scenarios(requests)}  # fmt: skip
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
        t.servers_started += self.pool.started - servers
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
                if waiting.reset:
                    rows.position[slot] = 0
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

            while pending:  # Append the waiting rows' tokens: the longest first, wide chunks.
                wide = [slot for slot, toks in pending.items() if len(toks) > EXTEND_CHUNKS[0]]
                c = EXTEND_CHUNKS[-1] if wide else EXTEND_CHUNKS[0]
                group = (wide or list(pending))[: row_buckets[-1]]
                r = next(b for b in row_buckets if b >= len(group))
                idle = [slot for slot in range(cfg.slots) if slot not in group]
                rows_R = np.array(group + idle[: r - len(group)], np.int32)  # Distinct rows.
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
                r = next((b for b in decode_buckets if b >= decoding.size), decode_buckets[-1])
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


def _interleave_scenarios(requests: Sequence[EpisodeRequest]) -> list[int]:
    """Request indices, round-robin over scenarios in first-seen order."""
    lanes: dict[str, collections.deque[int]] = {}
    for i, r in enumerate(requests):
        lanes.setdefault(r.scenario, collections.deque()).append(i)
    order = []
    while lanes:
        for scenario in list(lanes):
            order.append(lanes[scenario].popleft())
            if not lanes[scenario]:
                del lanes[scenario]
    return order
