"""Capture on the tiny fixture worlds: determinism, resume, and recovery from a dying server."""

import json
import os
import signal
from pathlib import Path

import pytest

from echo_jax.awm import capture
from echo_jax.awm.capture import CaptureConfig, episode_rng, run_capture
from echo_jax.awm.capture_shards import read_shard, shard_is_complete, shard_path
from echo_jax.awm.world_format import load_worlds
from echo_jax.data.episode_files import load_episodes

FIXTURES = Path(__file__).parent / "fixtures"
WORLDS = FIXTURES / "tiny_world"
SCENARIOS = ("tiny_shop", "tiny_shop_two")


@pytest.fixture(autouse=True)
def tiny_policies_importable(monkeypatch):
    # Spawned capture workers inherit sys.path, so they can import the fixture's policy module.
    monkeypatch.syspath_prepend(str(FIXTURES))


def config(out, workers, seed=7, k=2, scenarios=None):
    return CaptureConfig(
        worlds_dir=str(WORLDS),
        out_dir=str(out),
        episodes_per_task=k,
        seed=seed,
        scenarios=scenarios,
        workers=workers,
        policy_module="tiny_policies",
        command="pytest",
    )


def shard_bytes(out):
    return {name: shard_path(out, name).read_bytes() for name in SCENARIOS}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One two-worker capture that the tests compare against."""
    out = tmp_path_factory.mktemp("reference")
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(FIXTURES))
        manifest = run_capture(config(out, workers=2))
    return out, manifest


def test_episode_rng_is_derived_from_its_coordinates():
    draw = episode_rng(7, "tiny_shop", 1, 0).random()
    assert draw == episode_rng(7, "tiny_shop", 1, 0).random()
    others = {
        episode_rng(*args).random() for args in [(8, "tiny_shop", 1, 0), (7, "tiny_shop", 1, 1)]
    }
    assert draw not in others


def test_manifest_and_shards(reference):
    out, manifest = reference
    assert manifest["counts"] == {name: {"0": 2, "1": 2} for name in SCENARIOS}
    assert manifest["n_episodes"] == 8
    assert manifest["failed_scenarios"] == {} and manifest["failed_episodes"] == {}
    assert manifest["final_reward_types"].keys() <= {"complete", "others"}
    assert 0.0 <= manifest["success_rate"] <= 1.0
    assert manifest["step_reward_types"]["tool_call_ok"] > 0
    assert json.loads((out / "manifest.json").read_text()) == manifest
    episodes = load_episodes([str(out / "episodes" / "*.jsonl.gz")])
    assert [(e.scenario, e.task_idx, e.extras["capture"]["k"]) for e in episodes] == [
        (name, task_idx, k) for name in SCENARIOS for task_idx in (0, 1) for k in (0, 1)
    ]
    for episode in episodes:
        solved = episode.extras["capture"]["policy_mode"] == "solve"
        assert episode.reward == (1.0 if solved else 0.0)


def test_same_seed_same_bytes_with_one_worker(reference, tmp_path):
    out, _ = reference
    run_capture(config(tmp_path, workers=1))
    assert shard_bytes(tmp_path) == shard_bytes(out)


def test_resume_rewrites_only_missing_shard(reference, tmp_path):
    out, _ = reference
    for name in SCENARIOS:
        shard_path(tmp_path, name).parent.mkdir(parents=True, exist_ok=True)
        shard_path(tmp_path, name).write_bytes(shard_path(out, name).read_bytes())
    kept = shard_path(tmp_path, "tiny_shop")
    os.utime(kept, ns=(1, 1))
    shard_path(tmp_path, "tiny_shop_two").unlink()
    manifest = run_capture(config(tmp_path, workers=2))
    assert manifest["resumed_shards"] == ["tiny_shop"]
    assert manifest["episodes_captured_this_run"] == 4
    assert kept.stat().st_mtime_ns == 1
    assert shard_bytes(tmp_path) == shard_bytes(out)
    assert manifest["n_episodes"] == 8


def test_shard_for_other_seed_or_k_is_incomplete(reference):
    out, _ = reference
    world = load_worlds(WORLDS, ["tiny_shop"])["tiny_shop"]
    path = shard_path(out, "tiny_shop")
    assert shard_is_complete(path, world, episodes_per_task=2, seed=7)
    assert not shard_is_complete(path, world, episodes_per_task=2, seed=8)
    assert not shard_is_complete(path, world, episodes_per_task=3, seed=7)


def test_dying_server_costs_only_a_retry(reference, tmp_path, monkeypatch):
    out, _ = reference
    real_run_episode = capture.run_episode
    killed = []

    def run_episode_after_crash(server, *args, **kwargs):
        if not killed:
            killed.append(server.pid)
            os.killpg(server.pid, signal.SIGKILL)
        return real_run_episode(server, *args, **kwargs)

    monkeypatch.setattr(capture, "run_episode", run_episode_after_crash)
    manifest = run_capture(config(tmp_path, workers=1, scenarios=("tiny_shop",)))
    assert killed and manifest["failed_episodes"] == {}
    assert (
        shard_path(tmp_path, "tiny_shop").read_bytes() == shard_path(out, "tiny_shop").read_bytes()
    )
    assert len(list(read_shard(shard_path(tmp_path, "tiny_shop")))) == 4
