"""Episodes to fixed-shape, role-masked arrays: tokens [N, T], roles [N, T], reward/group [N].

An episode longer than T is split at step boundaries into windows that each restart with the
episode's CONTEXT prefix (a step longer than the room left is split inside), or, with
overflow="truncate", cut at T. Either way the counts of kept and dropped tokens per role are
reported, so no token is lost silently.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from echo_jax.data import roles
from echo_jax.data.advantages import group_advantages
from echo_jax.data.episodes import Episode, EpisodeError
from echo_jax.data.render import render_episode
from echo_jax.data.tokenizer import TokenizedEpisode, tokenize_rendered
from echo_jax.data.vocab import PAD_ID, Vocab


@dataclasses.dataclass(frozen=True)
class PackStats:
    episodes: int
    rows: int
    straddles: int  # Tokens whose bytes span two roles (0 with the shipped renderer).
    kept_by_role: tuple[int, ...]  # Episode tokens that appear in some row, per role.
    dropped_by_role: tuple[int, ...]  # Episode tokens that appear in no row, per role.
    repeated_prefix_tokens: int  # CONTEXT tokens repeated at the start of extra windows.

    def as_dict(self) -> dict:
        out = {"episodes": self.episodes, "rows": self.rows, "straddles": self.straddles}
        out["repeated_prefix_tokens"] = self.repeated_prefix_tokens
        for name, kept, dropped in zip(
            roles.NAMES, self.kept_by_role, self.dropped_by_role, strict=True
        ):
            if name != "pad":
                out[f"kept_{name}"] = kept
                out[f"dropped_{name}"] = dropped
        return out


@dataclasses.dataclass(frozen=True)
class PackedData:
    tokens: np.ndarray  # int32 [N, T], compact ids, PAD after each row's end
    roles: np.ndarray  # int8 [N, T]
    reward: np.ndarray  # float32 [N]: the episode's reward, repeated on each of its windows
    group: np.ndarray  # int32 [N]: index of the episode's (scenario, task_idx) group
    episode: np.ndarray  # int32 [N]: index of the source episode
    advantage: np.ndarray  # float32 [N]: the episode's group-relative advantage
    stats: PackStats

    @property
    def num_rows(self) -> int:
        return int(self.tokens.shape[0])


@dataclasses.dataclass(frozen=True)
class CompactEpisode:
    ids: np.ndarray  # int32 [M] compact ids
    roles: np.ndarray  # int8 [M]
    prefix_len: int  # Tokens of the CONTEXT prefix.
    step_starts: np.ndarray  # int64 [steps]: token index where each step begins
    straddles: int


def tokenize_episodes(
    episodes: Sequence[Episode], canonical_json: bool, vocab=None
) -> list[TokenizedEpisode]:
    """Rendered and tokenized by `vocab`'s layout and tokenizer (data.hf_tokenizer.HFVocab:
    the chat layout under the checkpoint's tokenizer); None or a compact Vocab: cl100k."""
    if vocab is not None:
        return [vocab.tokenize(vocab.layout.render_episode(ep, canonical_json)) for ep in episodes]
    return [tokenize_rendered(render_episode(ep, canonical_json)) for ep in episodes]


def to_compact(tok: TokenizedEpisode, vocab: Vocab) -> CompactEpisode:
    ids, src, within = vocab.expand(tok.ids)
    byte_start = tok.byte_start[src] + within
    return CompactEpisode(
        ids=ids,
        roles=tok.roles[src],
        prefix_len=int(np.searchsorted(byte_start, tok.prefix_bytes)),
        step_starts=np.searchsorted(byte_start, tok.step_start_bytes),
        straddles=tok.straddles,
    )


def window_spans(
    n_tokens: int, prefix_len: int, step_starts: np.ndarray, max_len: int
) -> list[tuple[int, int]]:
    """Body spans [start, end) such that prefix + body fits max_len, cut at step starts."""
    budget = max_len - prefix_len
    cuts = sorted(
        {prefix_len, n_tokens, *(int(s) for s in step_starts if prefix_len < s < n_tokens)}
    )
    spans: list[tuple[int, int]] = []
    start = end = prefix_len
    for nxt in cuts[1:]:
        if nxt - start > budget and end > start:
            spans.append((start, end))
            start = end
        while nxt - start > budget:
            spans.append((start, start + budget))
            start += budget
        end = nxt
    if end > start:
        spans.append((start, end))
    return spans


def pack(
    episodes: Sequence[Episode],
    tokenized: Sequence[TokenizedEpisode],
    vocab: Vocab,
    max_len: int,
    overflow: str = "window",
) -> PackedData:
    rows_tokens: list[np.ndarray] = []
    rows_roles: list[np.ndarray] = []
    row_episode: list[int] = []
    kept = np.zeros(roles.NUM_ROLES, np.int64)
    dropped = np.zeros(roles.NUM_ROLES, np.int64)
    straddles = repeated = 0
    for e, (ep, tok) in enumerate(zip(episodes, tokenized, strict=True)):
        c = to_compact(tok, vocab)
        straddles += c.straddles
        n = c.ids.size
        if c.prefix_len >= max_len:
            raise EpisodeError(
                ep.source,
                "<context prefix>",
                f"the task and tool list take {c.prefix_len} tokens, which leaves no room in "
                f"max_len={max_len}; raise --max_len",
            )
        if n <= max_len:
            spans = [(c.prefix_len, n)]
        elif overflow == "truncate":
            spans = [(c.prefix_len, max_len)]
        else:
            spans = window_spans(n, c.prefix_len, c.step_starts, max_len)
        covered = np.zeros(n, bool)
        covered[: c.prefix_len] = True
        for i, (start, end) in enumerate(spans):
            index = np.concatenate([np.arange(c.prefix_len), np.arange(start, end)])
            rows_tokens.append(c.ids[index])
            rows_roles.append(c.roles[index])
            row_episode.append(e)
            covered[start:end] = True
            repeated += c.prefix_len if i else 0
        kept += np.bincount(c.roles[covered], minlength=roles.NUM_ROLES)
        dropped += np.bincount(c.roles[~covered], minlength=roles.NUM_ROLES)

    num_rows = len(rows_tokens)
    tokens = np.full((num_rows, max_len), PAD_ID, np.int32)
    role_arr = np.full((num_rows, max_len), roles.PAD, np.int8)
    for i, (t, r) in enumerate(zip(rows_tokens, rows_roles, strict=True)):
        tokens[i, : t.size] = t
        role_arr[i, : r.size] = r

    keys = sorted({ep.group_key for ep in episodes})
    key_index = {k: i for i, k in enumerate(keys)}
    ep_group = np.array([key_index[ep.group_key] for ep in episodes], np.int32)
    ep_reward = np.array([ep.reward for ep in episodes], np.float32)
    ep_adv = np.asarray(group_advantages(ep_reward, ep_group, len(keys)), np.float32)
    row_ep = np.array(row_episode, np.int32)
    stats = PackStats(
        episodes=len(episodes),
        rows=num_rows,
        straddles=straddles,
        kept_by_role=tuple(int(x) for x in kept),
        dropped_by_role=tuple(int(x) for x in dropped),
        repeated_prefix_tokens=repeated,
    )
    return PackedData(
        tokens=tokens,
        roles=role_arr,
        reward=ep_reward[row_ep],
        group=ep_group[row_ep],
        episode=row_ep,
        advantage=ep_adv[row_ep],
        stats=stats,
    )
