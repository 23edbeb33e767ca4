"""Validate episode files, corpus folders or AWM world folders, and summarise what they hold.

Behind `python -m experiments.check_data PATH...`. Unlike the training loader, which stops at the
first problem, this reports every problem it finds, each naming the file, line and field.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from echo_jax.awm.launcher import LaunchError, prepare_server_code
from echo_jax.awm.world_format import SCENARIO_FILE, WorldFormatError, load_worlds
from echo_jax.data import corpus, roles
from echo_jax.data.episode_files import SkipReport, dedupe, expand_paths, iter_episodes
from echo_jax.data.episodes import DEFAULT_MAX_FIELD_CHARS, Episode, EpisodeError
from echo_jax.data.packing import tokenize_episodes

_TOP = 10  # Most common values shown per histogram.
MAX_LISTED_ERRORS = 1000  # Past this many, checking stops: the listing stays bounded in memory.
MAX_CODE_CHARS = 1 << 20  # Longest full_code / verifier code compiled (AWM's are ~10-50 KB).


@dataclasses.dataclass
class Report:
    errors: list[str] = dataclasses.field(default_factory=list)
    lines: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def text(self) -> str:
        out = list(self.lines)
        if self.errors:
            out.append(f"{len(self.errors)} error(s):")
            out += [f"  {e}" for e in self.errors]
        else:
            out.append("no errors")
        return "\n".join(out)


def is_world_folder(path: str) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, SCENARIO_FILE))


def check(paths: Sequence[str], max_field_chars: int = DEFAULT_MAX_FIELD_CHARS) -> Report:
    """Checks every path: world folders as worlds, everything else as episodes."""
    report = Report()
    episode_paths: list[str] = []
    for path in paths:
        if is_world_folder(path):
            _check_worlds(path, report)
        elif corpus.is_corpus(path):
            try:
                episode_paths += corpus.shard_files(path)
            except EpisodeError as e:
                report.errors.append(str(e))
        elif os.path.isdir(path):
            report.errors.append(
                f"{path}: a folder that is neither an AWM world folder ({SCENARIO_FILE}) nor a "
                f"corpus ({corpus.MANIFEST})"
            )
        else:
            try:  # One path at a time, so a bad one (a FIFO, an empty glob) costs only itself.
                episode_paths += expand_paths([path])
            except EpisodeError as e:
                report.errors.append(str(e))
    if episode_paths:
        _check_episodes(episode_paths, max_field_chars, report)
    return report


def _check_episodes(paths: list[str], max_field_chars: int, report: Report) -> None:
    episodes: list[Episode] = []
    try:
        for item in iter_episodes(paths, max_field_chars):
            if isinstance(item, EpisodeError):
                report.errors.append(str(item))
                if len(report.errors) >= MAX_LISTED_ERRORS:
                    report.errors.append(
                        f"stopped after {MAX_LISTED_ERRORS:,} problems; the rest is not checked"
                    )
                    break
            else:
                episodes.append(item)
    except EpisodeError as e:  # A missing file or an empty glob: nothing more to read.
        report.errors.append(str(e))
    duplicates = SkipReport()
    episodes = dedupe(episodes, skip_invalid=True, report=duplicates)
    report.errors += [str(e) for e in duplicates.skipped]
    if duplicates.n_skipped > len(duplicates.skipped):
        report.errors.append(
            f"... and {duplicates.n_skipped - len(duplicates.skipped):,} more duplicates"
        )
    report.lines += summarise_episodes(episodes)


def _histogram(counter: collections.Counter, total: int | None = None) -> str:
    total = sum(counter.values()) if total is None else total
    items = counter.most_common(_TOP)
    text = ", ".join(f"{k} {v} ({v / max(total, 1):.0%})" for k, v in items)
    if len(counter) > _TOP:
        text += f", ... ({len(counter) - _TOP} more)"
    return text or "none"


def summarise_episodes(episodes: list[Episode]) -> list[str]:
    if not episodes:
        return ["episodes: 0 valid"]
    files = {ep.source.rsplit(":", 1)[0] if ":" in ep.source else ep.source for ep in episodes}
    groups = {ep.group_key for ep in episodes}
    scenarios = {ep.scenario for ep in episodes}
    steps = sum(len(ep.steps) for ep in episodes)
    role_counts = np.zeros(roles.NUM_ROLES, np.int64)
    for tok in tokenize_episodes(episodes, canonical_json=False):
        role_counts += np.bincount(tok.roles, minlength=roles.NUM_ROLES)
    rewards = np.array([ep.reward for ep in episodes])
    step_types: collections.Counter = collections.Counter()
    final_types: collections.Counter = collections.Counter()
    for ep in episodes:
        types = [s.observation.get("reward_type", "<none>") for s in ep.steps]
        step_types.update(str(t) for t in types)
        final_types[str(types[-1])] += 1
    total_tokens = int(role_counts.sum())
    return [
        f"episodes: {len(episodes)} valid in {len(files)} file(s); "
        f"{len(scenarios)} scenarios, {len(groups)} (scenario, task) groups, "
        f"{steps} steps ({steps / len(episodes):.1f} per episode)",
        "tokens per role (cl100k): "
        + ", ".join(
            f"{name} {int(role_counts[i])} ({role_counts[i] / max(total_tokens, 1):.1%})"
            for i, name in enumerate(roles.NAMES)
            if name != "pad"
        )
        + f"; total {total_tokens}",
        f"rewards: min {rewards.min():g}, mean {rewards.mean():.3f}, max {rewards.max():g}; "
        + _histogram(collections.Counter(f"{r:g}" for r in rewards)),
        "final reward types: " + _histogram(final_types),
        "step reward types: " + _histogram(step_types),
    ]


def _check_worlds(folder: str, report: Report) -> None:
    errors: list[str] = []
    try:
        worlds = load_worlds(folder)
    except (WorldFormatError, OSError, UnicodeDecodeError) as e:
        errors.append(f"{folder}/{e}" if isinstance(e, WorldFormatError) else f"{folder}: {e}")
        worlds = _load_each(folder, errors)
    for name, world in worlds.items():
        try:  # What the world server will run: AWM's preparation of full_code.
            prepare_server_code(world.full_code, scenario=name, database_url="sqlite:///check.db")
        except LaunchError as e:
            errors.append(f"{folder}/gen_envs.jsonl: {e}")
        for what, code in [("gen_envs.jsonl full_code", world.full_code)] + [
            (f"gen_verifier.pure_code.jsonl task_idx {i} verification.code", c)
            for i, c in world.verifiers.items()
        ]:
            where = f"{folder}/{what.split()[0]}: scenario '{name}': {' '.join(what.split()[1:])}"
            if len(code) > MAX_CODE_CHARS:
                errors.append(
                    f"{where} is too large: {len(code):,} characters, over the limit of "
                    f"{MAX_CODE_CHARS:,}"
                )
                continue
            try:
                compile(code, f"<{name} {what}>", "exec")
            except (SyntaxError, ValueError) as e:
                line = getattr(e, "lineno", None)
                errors.append(
                    f"{where} does not compile ({type(e).__name__}: {getattr(e, 'msg', e)}"
                    f"{f' at line {line}' if line else ''})"
                )
            except (RecursionError, MemoryError) as e:  # e.g. 200,000 chained operators
                errors.append(
                    f"{where} does not compile ({type(e).__name__}: nested too deeply for "
                    "the compiler)"
                )
    report.errors += list(dict.fromkeys(errors))
    tasks = sum(len(w.tasks) for w in worlds.values())
    endpoints = sum(len(g["endpoints"]) for w in worlds.values() for g in w.api_spec["api_groups"])
    tables = sum(len(w.db_schema["tables"]) for w in worlds.values())
    report.lines.append(
        f"worlds in {folder}: {len(worlds)} valid scenarios, {tasks} tasks (each with a verifier), "
        f"{endpoints} API endpoints, {tables} tables"
    )


def _load_each(folder: str, errors: list[str]) -> dict:
    """After a failed full load, each declared scenario on its own, to find every bad one."""
    names = []
    try:
        with open(Path(folder) / SCENARIO_FILE, encoding="utf-8") as f:
            for line in f:
                try:
                    name = json.loads(line).get("name")
                except (ValueError, AttributeError, RecursionError):
                    continue
                if isinstance(name, str):
                    names.append(name)
    except (OSError, UnicodeDecodeError):
        return {}
    worlds = {}
    for name in dict.fromkeys(names):
        try:
            worlds.update(load_worlds(folder, [name]))
        except (WorldFormatError, OSError, UnicodeDecodeError) as e:
            errors.append(f"{folder}/{e}" if isinstance(e, WorldFormatError) else f"{folder}: {e}")
    return worlds
