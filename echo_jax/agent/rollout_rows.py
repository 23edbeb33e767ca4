"""An episode's token-exact rows: what the rollout engine (`echo_jax.agent.rollout`) records.

A row holds exactly the tokens the model consumed and produced, the role of each as a target, the
kind of each observation token and the log-prob each sampled token was drawn with. When a
prompt no longer fits, the episode continues in a new row that restarts with the task and tool
list and the latest whole steps, as CONTEXT, so that every token is a target in one row only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from echo_jax.agent.decoding import Generation
from echo_jax.agent.policy import POLICY_KEY, ActionParseError, parse_action
from echo_jax.awm.harness import PARSE_ERROR_KEY
from echo_jax.data import render, roles
from echo_jax.data.episodes import ENV_OUTPUT_FIELDS, WARNING_FIELD
from echo_jax.data.packing import to_compact
from echo_jax.data.render import Rendered
from echo_jax.data.vocab import Vocab
from echo_jax.util.choices import ConfigError

EPISODE_ROWS = "rows"  # Episode key of the token-exact rows (a list of `RowRecord.as_dict`s).


# The kind of each observation token, for per-kind env-term weights (RLConfig.weight_*).
NO_KIND, TOOL_RESULT, TOOL_ERROR, VERIFIER, WARNING_TEXT = range(5)
_KIND_OF_FIELD = {
    "tool_result": TOOL_RESULT,
    "error": TOOL_ERROR,
    "verify_result": VERIFIER,
    WARNING_FIELD: WARNING_TEXT,
}
_KINDS = 8  # Roles and kinds travel through the tokenizer as role * _KINDS + kind.


def observation_segments(observation: dict[str, Any], canonical_json: bool, layout=None):
    """The layout's `render_observation` segments (default data.render's), each body tagged
    with its kind: (text, role, kind). Both layouts render one body segment per field present,
    in the order of ENV_OUTPUT_FIELDS then the warning."""
    layout = layout or render
    fields = [k for k in (*ENV_OUTPUT_FIELDS, WARNING_FIELD) if observation.get(k) is not None]
    out, bodies = [], 0
    for text, role in layout.render_observation(observation, canonical_json):
        if role == roles.CONTEXT:
            out.append((text, role, NO_KIND))
        else:
            out.append((text, role, _KIND_OF_FIELD[fields[bodies]]))
            bodies += 1
    return out


def segments_to_tokens(segments: Sequence[tuple], vocab: Vocab):
    """(compact ids, roles, kinds) of (text, role[, kind]) segments, tokenized as training
    tokenizes them."""
    tagged = tuple((s[0], s[1] * _KINDS + (s[2] if len(s) > 2 else NO_KIND)) for s in segments)
    compact = to_compact(vocab.tokenize(Rendered(tagged, 0, ())), vocab)
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


class RecordingPolicy:
    """A harness policy whose calls come from the rollout engine's batched decoder
    (`engine.generate`), recording the episode's rows as it goes."""

    def __init__(self, engine, slot: int, request, tools):
        self.engine = engine
        self.slot = slot
        self.request = request
        self.vocab = engine.vocab
        self.layout = layout = engine.vocab.layout  # data.render, data.chat or data.chat_llama3
        self.canonical = engine.canonical_json
        self.max_new = engine.config.max_new_tokens
        task = engine.worlds[request.scenario].tasks[request.task_idx]
        prefix, _, _ = segments_to_tokens(layout.render_prefix(task, list(tools)), self.vocab)
        self.trace = EpisodeTokens(prefix, engine.decoder.max_len)
        marker, _, _ = segments_to_tokens([(layout.CALL_MARK, roles.CONTEXT)], self.vocab)
        if len(prefix) + len(marker) > self.trace.max_len - self.max_new:
            raise ConfigError(
                f"{request.scenario} task {request.task_idx}: the task and tool list take "
                f"{len(prefix)} tokens; with the call marker they do not fit a prompt of "
                f"{self.trace.max_len - self.max_new} (max_len minus max_new_tokens); raise "
                "max_len (--max_len of experiments.train, evaluate and rl)"
            )
        self.marker_len = len(marker)
        self.records: list[dict[str, Any]] = []
        self.consumed_steps = 0  # Harness steps whose observation the stream holds.
        self.last_text = ""
        self.key = np.asarray(jax.random.key_data(jax.random.key(request.seed)))

    def _unread(self, steps: Sequence[dict[str, Any]]) -> list[tuple[str, int]]:
        """Segments of the steps the stream does not hold yet: the last sampled call's
        observation (after the layout's `after_call`: a newline closing an unclosed call, or
        the chat turn's end), then any call the harness made itself (the forced verify, as
        CONTEXT) with its observation."""
        layout = self.layout
        segments: list[tuple[str, int]] = []
        for i in range(self.consumed_steps, len(steps)):
            step = steps[i]
            if i >= len(self.records):
                action = step["action"]
                text = layout.render_action(action["tool_name"], action.get("arguments", {}))
                segments += [(layout.CALL_MARK, roles.CONTEXT), (text, roles.CONTEXT)]
            else:
                text = self.last_text
            if layout.after_call(text):
                segments.append((layout.after_call(text), roles.CONTEXT))
            segments.extend(observation_segments(step["observation"], self.canonical, layout))
        self.consumed_steps = len(steps)
        return segments

    def next_action(self, steps: list[dict[str, Any]]) -> dict[str, Any]:
        segments = [*self._unread(steps), (self.layout.CALL_MARK, roles.CONTEXT)]
        tokens, token_roles, kinds = segments_to_tokens(segments, self.vocab)
        new_row = self.trace.append(tokens, token_roles, kinds, self.trace.max_len - self.max_new)
        self.trace.start_step(self.marker_len)
        if new_row is None:
            gen = self.engine.generate(self, tokens)
        elif len(self.trace.rows) == 1:
            gen = self.engine.generate(self, new_row, start=0)
        else:  # A cut row starts with the same prefix, whose keys and values the cache holds.
            p = len(self.trace.prefix)
            gen = self.engine.generate(self, new_row[p:], start=p)
        self.trace.sampled(gen)
        self.last_text = gen.text
        try:
            action = parse_action(gen.text, self.layout)
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
