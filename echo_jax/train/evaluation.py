"""Held-out metrics: env-token and action-token cross-entropy and top-1 accuracy per split.

Sets (EvalConfig.splits): the corpus splits `train` (a fixed subsample, to show over-fitting),
`heldout_tasks` and `heldout_scenarios`, plus `real`, the one real AWM capture. Each is packed
with the run's own vocabulary; text it never saw falls back to byte tokens, which is lossless.

    env_ce / env_acc        nats per ENV_OUTPUT target token / top-1 accuracy, all episodes
    action_ce / action_acc  the same on ACTION targets of successful episodes only
                            (reward >= EvalConfig.success_reward: the verifier said complete)

A jitted step returns per-row sums (CE, correct, count per role); the host adds them up, so a
row cap or padding never changes a mean. No [B, T, V] log-softmax is formed: logsumexp and the
label logit give the CE, an argmax the accuracy.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import Array

from echo_jax.config import Config
from echo_jax.data import corpus, roles
from echo_jax.data.dataset import load_packed
from echo_jax.data.episodes import EpisodeError
from echo_jax.data.packing import PackedData
from echo_jax.data.vocab import PAD_ID, Vocab
from echo_jax.objective.fused_loss import resolve_impl
from echo_jax.util.atomic import atomic_open
from echo_jax.util.jsonl import read_jsonl

EVAL_FILE = "eval.jsonl"
ROLE_TERMS = (("env", roles.ENV_OUTPUT), ("action", roles.ACTION))
SUM_KEYS = tuple(f"{n}_{k}" for n, _ in ROLE_TERMS for k in ("ce_sum", "correct", "count"))
METRICS = ("env_ce", "env_acc", "action_ce", "action_acc")
SUBSAMPLE_SEED = 0  # Fixed, not the run's seed: every arm of a sweep sees the same rows.


def _ce_and_correct(logits_NV: Array, labels_N: Array) -> tuple[Array, Array]:
    """-log softmax at the label (logsumexp minus the label logit) and top-1 hit, per row."""
    logits_NV = logits_NV.astype(jnp.float32)
    label_logit_N = jnp.take_along_axis(logits_NV, labels_N[..., None], axis=-1)[..., 0]
    ce_N = jax.nn.logsumexp(logits_NV, axis=-1) - label_logit_N
    correct_N = (jnp.argmax(logits_NV, axis=-1) == labels_N).astype(jnp.float32)
    return ce_N, correct_N


def role_sums(logits_BTV: Array, tokens_BT: Array, roles_BT: Array) -> dict[str, Array]:
    """Per-row CE sums, correct top-1 counts and target counts for ENV_OUTPUT and ACTION.

    Position t predicts token t+1; the role of the target token decides its term. Values [B].
    """
    ce_BS, correct_BS = _ce_and_correct(logits_BTV[:, :-1], tokens_BT[:, 1:])
    return sums_by_role(ce_BS, correct_BS, roles_BT[:, 1:])


def chunked_role_sums(
    h_BTD: Array, w_DV: Array, tokens_BT: Array, roles_BT: Array, chunk: int
) -> dict[str, Array]:
    """`role_sums(h @ w, ...)` computed `chunk` target tokens at a time: never [B, T, V]."""
    b, t, d = h_BTD.shape
    n = b * (t - 1)
    k = -(-n // chunk)
    h_KCD = jnp.pad(h_BTD[:, :-1].reshape(n, d), ((0, k * chunk - n), (0, 0)))
    labels_KC = jnp.pad(tokens_BT[:, 1:].reshape(n), (0, k * chunk - n))

    def one(args):
        h_CD, labels_C = args
        logits_CV = jnp.einsum("cd,dv->cv", h_CD, w_DV.astype(h_CD.dtype))
        return _ce_and_correct(logits_CV, labels_C)

    ce_KC, correct_KC = jax.lax.map(one, (h_KCD.reshape(k, chunk, d), labels_KC.reshape(k, chunk)))
    ce_BS = ce_KC.reshape(-1)[:n].reshape(b, t - 1)
    correct_BS = correct_KC.reshape(-1)[:n].reshape(b, t - 1)
    return sums_by_role(ce_BS, correct_BS, roles_BT[:, 1:])


def sums_by_role(ce_BS: Array, correct_BS: Array, target_roles_BS: Array) -> dict[str, Array]:
    out = {}
    for name, role in ROLE_TERMS:
        mask_BS = (target_roles_BS == role).astype(jnp.float32)
        out[f"{name}_ce_sum"] = (ce_BS * mask_BS).sum(axis=1)
        out[f"{name}_correct"] = (correct_BS * mask_BS).sum(axis=1)
        out[f"{name}_count"] = mask_BS.sum(axis=1)
    return out


def make_eval_step(
    graphdef: nnx.GraphDef, chunk_size: int | None = None
) -> Callable[[Any, Array, Array], dict[str, Array]]:
    """Jitted `(params, tokens [B, T], roles [B, T]) -> role_sums` for one model graph; with
    `chunk_size`, the output projection runs that many target tokens at a time."""

    def step(params, tokens_BT: Array, roles_BT: Array) -> dict[str, Array]:
        model = nnx.merge(graphdef, params)
        if chunk_size is None:
            return role_sums(model(tokens_BT), tokens_BT, roles_BT)
        h_BTD = model.features(tokens_BT)
        return chunked_role_sums(h_BTD, model.output_matrix(), tokens_BT, roles_BT, chunk_size)

    return jax.jit(step)


def aggregate(sums: dict[str, np.ndarray], success_N: np.ndarray) -> dict[str, float]:
    """Means over tokens from per-row sums: env terms over all rows, action terms over rows of
    successful episodes. A term with no targets is NaN (written as null), never 0."""
    rows = {"env": np.ones_like(success_N, bool), "action": np.asarray(success_N, bool)}
    out: dict[str, float] = {}
    for name, _ in ROLE_TERMS:
        keep = rows[name]
        count = float(sums[f"{name}_count"][keep].sum())
        ce = float(sums[f"{name}_ce_sum"][keep].sum())
        correct = float(sums[f"{name}_correct"][keep].sum())
        out[f"{name}_ce"] = ce / count if count else math.nan
        out[f"{name}_acc"] = correct / count if count else math.nan
        out[f"{name}_tokens"] = int(count)
    out["rows"] = int(success_N.size)
    out["success_rows"] = int(np.sum(success_N))
    return out


@dataclasses.dataclass(frozen=True)
class EvalSet:
    name: str
    tokens: np.ndarray  # int32 [N, T]
    roles: np.ndarray  # int32 [N, T]
    success: np.ndarray  # bool [N]: the row's episode was verified complete
    total_rows: int  # Rows before the max_rows cap.
    episodes: int


def subsample(data: PackedData, name: str, max_rows: int, success_reward: float) -> EvalSet:
    """At most `max_rows` rows, chosen once by a fixed seed and kept in their original order."""
    n = data.num_rows
    index = np.arange(n)
    if n > max_rows:
        index = np.sort(np.random.default_rng(SUBSAMPLE_SEED).permutation(n)[:max_rows])
    return EvalSet(
        name=name,
        tokens=data.tokens[index],
        roles=data.roles[index].astype(np.int32),
        success=data.reward[index] >= success_reward,
        total_rows=n,
        episodes=data.stats.episodes,
    )


def evaluate_set(step_fn, params, es: EvalSet, batch_size: int) -> dict[str, float]:
    """Runs `step_fn` over `es` in fixed-shape batches (the last one padded with PAD rows)."""
    n, t = es.tokens.shape
    padded = -(-n // batch_size) * batch_size
    tokens = np.full((padded, t), PAD_ID, np.int32)
    role_arr = np.full((padded, t), roles.PAD, np.int32)
    tokens[:n], role_arr[:n] = es.tokens, es.roles
    parts: list[dict[str, np.ndarray]] = []
    for start in range(0, padded, batch_size):
        sl = slice(start, start + batch_size)
        parts.append(step_fn(params, tokens[sl], role_arr[sl]))
    host = jax.device_get(parts)
    sums = {k: np.concatenate([p[k] for p in host])[:n] for k in SUM_KEYS}
    return aggregate(sums, es.success)


def load_eval_sets(
    cfg: Config, vocab: Vocab, train_data: PackedData | None = None, log=print
) -> dict[str, EvalSet]:
    """The sets named by cfg.eval.splits that exist for this run's data, packed with `vocab`.

    Held-out splits need a corpus folder among cfg.data.paths; `train` reuses the packed
    training data when given. A set that is empty or cannot be packed is skipped with a note.
    """
    ecfg = cfg.eval
    corpora = tuple(p for p in cfg.data.paths if corpus.is_corpus(p))
    sets: dict[str, EvalSet] = {}
    for name in ecfg.splits:
        if name == "train" and train_data is not None:
            data_cfg = None
        elif name == "real":
            if not os.path.isfile(ecfg.real_path):
                log(f"eval: skipping set real: {ecfg.real_path} does not exist")
                continue
            data_cfg = dataclasses.replace(cfg.data, paths=(ecfg.real_path,))
        elif name == "train":
            data_cfg = dataclasses.replace(cfg.data, split="train")
        elif not corpora:
            log(f"eval: skipping set {name}: no corpus folder among the data paths")
            continue
        else:
            data_cfg = dataclasses.replace(cfg.data, paths=corpora, split=name)
        try:
            data = train_data if data_cfg is None else load_packed(data_cfg, vocab)[0]
        except EpisodeError as e:
            log(f"eval: skipping set {name}: {e}")
            continue
        sets[name] = subsample(data, name, ecfg.max_rows, ecfg.success_reward)
    return sets


class Evaluator:
    """Evaluates parameters on every set and appends one line per call to `eval.jsonl`.

    Line: {"step", "wall_s", "<set>/<metric>": ...} with metrics as in `aggregate`.
    """

    def __init__(self, cfg: Config, sets: dict[str, EvalSet], path: str | None, log=print):
        self.cfg = cfg
        self.sets = sets
        self.path = path
        self.log = log
        self._step_fn = None
        self._graphdef = None

    @classmethod
    def for_run(
        cls,
        cfg: Config,
        vocab: Vocab,
        train_data: PackedData | None,
        workdir: str | None,
        log=print,
    ) -> Evaluator | None:
        """None when cfg.eval.splits is empty; a workdir of None writes no eval.jsonl."""
        if not cfg.eval.splits:
            return None
        sets = load_eval_sets(cfg, vocab, train_data, log)
        log(
            "eval sets: "
            + (
                ", ".join(
                    f"{s.name} {s.tokens.shape[0]}/{s.total_rows} rows "
                    f"({int(s.success.sum())} successful)"
                    for s in sets.values()
                )
                or "none"
            )
        )
        path = None if workdir is None else os.path.join(workdir, EVAL_FILE)
        return cls(cfg, sets, path, log)

    def due(self, step: int) -> bool:
        every, last = self.cfg.eval.every, self.cfg.train.steps
        return step == last or (every > 0 and step % every == 0)

    def __call__(self, step: int, graphdef: nnx.GraphDef, params: Any) -> dict[str, Any]:
        if self._step_fn is None or graphdef is not self._graphdef:
            chunk = (
                self.cfg.loss.chunk_size if resolve_impl(self.cfg.loss.impl) == "chunked" else None
            )
            self._step_fn, self._graphdef = make_eval_step(graphdef, chunk), graphdef
        t0 = time.perf_counter()
        line: dict[str, Any] = {"step": int(step)}
        for name, es in self.sets.items():
            for k, v in evaluate_set(self._step_fn, params, es, self.cfg.eval.batch_size).items():
                line[f"{name}/{k}"] = v
        line["wall_s"] = time.perf_counter() - t0
        if self.path is not None:
            append_line(self.path, line)
        self.log(format_line(line, list(self.sets)))
        return line

    def truncate(self, after_step: int) -> None:
        """Drops lines beyond `after_step`, so a resumed run evaluates each step once."""
        if self.path is not None and os.path.exists(self.path):
            kept = [m for m in read_jsonl(self.path) if m["step"] <= after_step]
            with atomic_open(self.path) as f:
                f.writelines(_dumps(m) + "\n" for m in kept)


def _dumps(line: dict[str, Any]) -> str:
    """JSON with NaN written as null (a term with no targets)."""
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in line.items()}
    return json.dumps(clean)


def append_line(path: str, line: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(_dumps(line) + "\n")


def format_line(line: dict[str, Any], names: list[str]) -> str:
    def f(v):
        return "  n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"

    parts = [
        f"{n}: env {f(line.get(f'{n}/env_ce'))} ({f(line.get(f'{n}/env_acc'))}) "
        f"act {f(line.get(f'{n}/action_ce'))} ({f(line.get(f'{n}/action_acc'))})"
        for n in names
    ]
    return f"eval step {line['step']}: " + "; ".join(parts) + f"  [{line['wall_s']:.1f}s]"
