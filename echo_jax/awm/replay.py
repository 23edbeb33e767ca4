"""Re-run a captured episode's actions against a fresh world and compare what comes back.

A corpus is only evidence if its rewards can be reproduced: replaying every recorded action
through the same harness must give the same step reward types, the same observations and the
same final reward.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from echo_jax.awm.capture_shards import read_shard
from echo_jax.awm.harness import INVALID_ACTION_TOOL, PARSE_ERROR_KEY, HarnessConfig, run_episode
from echo_jax.awm.live_world import LiveWorld
from echo_jax.awm.world_format import World, load_worlds

_COMPARED_FIELDS = ("reward_type", "tool_result", "error", "warning")


_INVALID_PREFIX = "Invalid action: "


class ReplayPolicy:
    """Plays back recorded actions in order; a recorded invalid action is replayed as invalid.

    An invalid action never reaches the world. Given the recorded observations, it is replayed
    with its recorded reason (a model's unparsable call keeps its parser message); without
    them, as an action with no tool name.
    """

    def __init__(
        self,
        actions: Sequence[dict[str, Any]],
        observations: Sequence[dict[str, Any]] | None = None,
    ):
        self.actions = list(actions)
        self.observations = None if observations is None else list(observations)

    def next_action(self, steps: list[dict[str, Any]]) -> dict[str, Any]:
        action = self.actions[len(steps)]
        if action["tool_name"] == INVALID_ACTION_TOOL:
            error = (self.observations or [{}] * len(self.actions))[len(steps)].get("error", "")
            if error.startswith(_INVALID_PREFIX):
                return {PARSE_ERROR_KEY: error[len(_INVALID_PREFIX) :]}
            return {"tool_name": ""}  # Rejected by the harness exactly as the original was.
        return {"tool_name": action["tool_name"], "arguments": action.get("arguments", {})}


def differences(recorded: dict[str, Any], replayed: dict[str, Any]) -> list[str]:
    """What differs between two episodes of one task; empty when the replay reproduced it."""
    diffs = []
    if recorded["reward"] != replayed["reward"]:
        diffs.append(f"reward {recorded['reward']} != {replayed['reward']}")
    if len(recorded["steps"]) != len(replayed["steps"]):
        diffs.append(f"{len(recorded['steps'])} steps != {len(replayed['steps'])}")
    for i, (a, b) in enumerate(zip(recorded["steps"], replayed["steps"], strict=False)):
        for key in _COMPARED_FIELDS:
            if a["observation"].get(key) != b["observation"].get(key):
                diffs.append(f"steps[{i}].observation.{key} differs")
        result_a = a["observation"].get("verify_result", {}).get("result")
        result_b = b["observation"].get("verify_result", {}).get("result")
        if result_a != result_b:
            diffs.append(f"steps[{i}].verify_result.result {result_a} != {result_b}")
    return diffs


def replay_scenario(
    world: World, episodes: Sequence[dict[str, Any]], config: HarnessConfig | None = None
) -> list[tuple[dict[str, Any], list[str]]]:
    """Replays each episode of one scenario on one fresh server (reset between episodes)."""
    config = config or HarnessConfig()
    out = []
    live = LiveWorld(world)
    try:
        live.open()
        for recorded in episodes:
            policy = ReplayPolicy(
                [step["action"] for step in recorded["steps"]],
                [step["observation"] for step in recorded["steps"]],
            )
            replayed = run_episode(
                live.server, live.client, world, recorded["task_idx"], policy, config
            )
            out.append((recorded, differences(recorded, replayed)))
    finally:
        live.close()
    return out


def _replay_shard(
    worlds_dir: str, shard: str, config: HarnessConfig | None = None
) -> dict[str, Any]:
    episodes = list(read_shard(shard))
    if not episodes:
        return {"shard": shard, "episodes": 0, "mismatches": []}
    scenario = episodes[0]["scenario"]
    world = load_worlds(worlds_dir, [scenario])[scenario]
    mismatches = [
        {"task_idx": ep["task_idx"], "k": ep.get("capture", {}).get("k"), "diffs": diffs}
        for ep, diffs in replay_scenario(world, episodes, config)
        if diffs
    ]
    return {"shard": shard, "episodes": len(episodes), "mismatches": mismatches}


def check_corpus(
    worlds_dir: str,
    shards: Sequence[str],
    workers: int = 2,
    config: HarnessConfig | None = None,
) -> dict[str, Any]:
    """Replays every episode of every shard; returns counts and every mismatch found.

    `config` is the capture's harness (its step limit decides where a verify was forced).
    """
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        n = len(shards)
        results = list(pool.map(_replay_shard, [worlds_dir] * n, shards, [config] * n))
    mismatches = [{"shard": r["shard"], **m} for r in results for m in r["mismatches"]]
    return {
        "replayed": sum(r["episodes"] for r in results),
        "reproduced": sum(r["episodes"] - len(r["mismatches"]) for r in results),
        "mismatches": mismatches,
    }
