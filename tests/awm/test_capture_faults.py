"""Capture under faults: a world killed, hung or answering 5xx mid-episode costs only a retry of
that episode; a capture killed mid-way leaves no process behind and resumes without duplicates."""

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from echo_jax.awm import capture
from echo_jax.awm.bounded_http import Reply
from echo_jax.awm.capture import CaptureConfig, run_capture
from echo_jax.awm.capture_shards import read_shard, shard_is_complete, shard_path
from echo_jax.awm.mcp_client import WorldUnavailable
from echo_jax.data.episode_files import load_episodes
from tests.awm.hostile import descendants

FIXTURES = Path(__file__).parent / "fixtures"
WORLDS = FIXTURES / "tiny_world"
ROOT = Path(__file__).parents[2]


@pytest.fixture(autouse=True)
def tiny_policies_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(FIXTURES))


def config(out, **kw):
    return CaptureConfig(
        worlds_dir=str(WORLDS),
        out_dir=str(out),
        episodes_per_task=2,
        seed=7,
        workers=1,
        policy_module="tiny_policies",
        command="pytest",
        **kw,
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(FIXTURES))
        run_capture(config(out))
    return out


def _inject(kind, server, client):
    if kind == "kill":
        os.killpg(server.pid, signal.SIGKILL)
    elif kind == "hang":
        os.killpg(server.pid, signal.SIGSTOP)  # Alive, holding its socket, answering nothing.
    elif kind == "5xx":
        real_send = client._send

        def send_503_once(message):
            client._send = real_send
            return Reply(503, {}, b"Service Unavailable")

        client._send = send_503_once


def test_world_killed_hung_or_5xx_mid_episode_costs_one_retry(reference, tmp_path, monkeypatch):
    # Attempts 1, 3 and 5 meet a fault after their first tool call; each retry runs clean.
    faults = {0: "kill", 2: "hang", 4: "5xx"}
    real_run_episode = capture.run_episode
    attempts, injected = [], []

    def faulty_run_episode(server, client, world, task_idx, policy, *args, **kwargs):
        kind = faults.get(len(attempts))
        attempts.append(task_idx)
        real_next = policy.next_action

        def next_action(steps):
            if len(steps) == 1 and kind is not None and kind not in injected:
                injected.append(kind)
                _inject(kind, server, client)
            return real_next(steps)

        policy.next_action = next_action
        return real_run_episode(server, client, world, task_idx, policy, *args, **kwargs)

    monkeypatch.setattr(capture, "run_episode", faulty_run_episode)
    manifest = run_capture(config(tmp_path, scenarios=("tiny_shop",), request_timeout_s=1.0))
    assert injected == ["kill", "hang", "5xx"] and len(attempts) == 4 + 3
    assert manifest["failed_episodes"] == {} and manifest["failed_scenarios"] == {}
    # The discarded attempts left no trace: the shard is byte-identical to an undisturbed one.
    got, want = shard_path(tmp_path, "tiny_shop"), shard_path(reference, "tiny_shop")
    assert got.read_bytes() == want.read_bytes()
    assert len(list(read_shard(got))) == 4


def test_episode_failing_every_attempt_is_left_out_and_reported(tmp_path, monkeypatch):
    real_run_episode = capture.run_episode
    attempts = []

    def task_1_always_dies(server, client, world, task_idx, *args, **kwargs):
        if task_idx == 1:
            attempts.append(task_idx)
            os.killpg(server.pid, signal.SIGKILL)
            raise WorldUnavailable("tools/call: connection reset")
        return real_run_episode(server, client, world, task_idx, *args, **kwargs)

    monkeypatch.setattr(capture, "run_episode", task_1_always_dies)
    cfg = dataclasses.replace(
        config(tmp_path, scenarios=("tiny_shop",), episode_attempts=2), episodes_per_task=1
    )
    manifest = run_capture(cfg)
    assert attempts == [1, 1]  # Bounded: episode_attempts tries, then it is given up.
    (failed,) = manifest["failed_episodes"]["tiny_shop"]
    assert (failed["task_idx"], failed["k"]) == (1, 0)
    assert "connection reset" in failed["error"]
    kept = list(read_shard(shard_path(tmp_path, "tiny_shop")))
    assert [e["task_idx"] for e in kept] == [0]  # Only whole episodes are written.
    assert not shard_is_complete(
        shard_path(tmp_path, "tiny_shop"), capture.load_worlds(WORLDS)["tiny_shop"], 1, 7
    )  # So the next run redoes this shard.


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_killed_capture_leaves_no_process_and_resumes_without_duplicates(reference, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(FIXTURES), str(ROOT)]))
    args = [
        sys.executable,
        "-m",
        "experiments.capture",
        f"--worlds={WORLDS}",
        f"--out={tmp_path}",
        "--episodes_per_task=2",
        "--seed=7",
        "--workers=2",
        "--policy_module=tiny_policies",
        "--noreplay_check",
    ]
    victim = subprocess.Popen(args, cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        servers: set[int] = set()
        while time.monotonic() < deadline and victim.poll() is None:
            tree = descendants(victim.pid)
            # The server's Python itself, not the bwrap processes around it (same arguments).
            servers = {
                p
                for p in tree
                if b"_loopback_run" in _cmdline(p) and b"bwrap" not in _cmdline(p).split(b"\0")[0]
            }
            if len(servers) == 2:  # Both workers are capturing: kill mid-capture.
                break
            time.sleep(0.02)
        assert len(servers) == 2, "the capture never had two world servers up"
        tree = descendants(victim.pid)
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=10)
    finally:
        if victim.poll() is None:
            victim.kill()
    deadline = time.monotonic() + 15
    while any(_alive(p) for p in tree) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [p for p in tree if _alive(p)] == []  # Workers and world servers all went with it.
    assert not list(tmp_path.rglob("*.tmp"))  # No half-written shard.

    manifest = run_capture(config(tmp_path))  # Resume: redoes what is missing, nothing twice.
    assert manifest["n_episodes"] == 8 and manifest["failed_episodes"] == {}
    for name in ("tiny_shop", "tiny_shop_two"):
        assert shard_path(tmp_path, name).read_bytes() == shard_path(reference, name).read_bytes()
    assert len(load_episodes([str(tmp_path / "episodes" / "*.jsonl.gz")])) == 8  # No duplicates.
