"""Replaying a captured episode's actions against a fresh world reproduces it exactly."""

import copy
from pathlib import Path

import pytest

from echo_jax.awm.capture import CaptureConfig, run_capture
from echo_jax.awm.capture_shards import read_shard, shard_path
from echo_jax.awm.replay import check_corpus, differences, replay_scenario
from echo_jax.awm.world_format import load_worlds

FIXTURES = Path(__file__).parent / "fixtures"
WORLDS = FIXTURES / "tiny_world"


@pytest.fixture(scope="module")
def captured(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(FIXTURES))
        run_capture(
            CaptureConfig(
                worlds_dir=str(WORLDS),
                out_dir=str(out),
                episodes_per_task=3,
                seed=3,
                scenarios=("tiny_shop",),
                workers=1,
                policy_module="tiny_policies",
            )
        )
    return list(read_shard(shard_path(out, "tiny_shop"))), shard_path(out, "tiny_shop")


def test_replay_reproduces_every_captured_episode(captured):
    episodes, shard = captured
    world = load_worlds(str(WORLDS), ["tiny_shop"])["tiny_shop"]
    results = replay_scenario(world, episodes)
    assert len(results) == len(episodes) == 6
    assert all(diffs == [] for _, diffs in results)
    assert {ep["reward"] for ep in episodes} == {0.0, 1.0}  # Both outcomes were replayed.
    summary = check_corpus(str(WORLDS), [str(shard)], workers=1)
    assert summary == {"replayed": 6, "reproduced": 6, "mismatches": []}


def test_differences_name_what_changed(captured):
    episodes, _ = captured
    original = episodes[0]
    tampered = copy.deepcopy(original)
    tampered["reward"] = 0.5
    tampered["steps"][0]["observation"]["tool_result"] = '{"forged": true}'
    diffs = differences(tampered, original)
    assert diffs[0].startswith("reward 0.5 != ")
    assert "steps[0].observation.tool_result differs" in diffs
    assert differences(original, copy.deepcopy(original)) == []
