"""Interrupted and failing runs: SIGKILL mid-training then --resume; SIGTERM to an RL run and
to a sweep; a diverging run."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import chex
import jax
import numpy as np
import pytest

from echo_jax.config import Config, DataConfig, LossConfig, TrainConfig
from echo_jax.data.vocab import Vocab
from echo_jax.train import trainer as train_module
from echo_jax.train.run_dir import RunDir, RunDirError
from echo_jax.train.trainer import (
    TrainingDiverged,
    init_model,
    init_state,
    make_optimizer,
    run_experiment,
)
from echo_jax.util.stop_signals import STOPPED_BY_SIGTERM
from tests.test_agent import WORLDS
from tests.test_data import small_episode, write_jsonl
from tests.test_train import TINY_MODEL, assert_same_metrics

ROOT = os.path.join(os.path.dirname(__file__), "..")
STEPS, EVERY = 16, 4
FLAGS = [
    "--d_model=16",
    "--n_layers=1",
    "--max_len=512",
    "--batch_size=2",
    f"--steps={STEPS}",
    "--log_every=1",
    f"--checkpoint_every={EVERY}",
    "--eval_splits=",
]


def _train(workdir, *extra):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.Popen(
        [sys.executable, "-m", "experiments.train", *FLAGS, f"--workdir={workdir}", *extra],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _checkpoints(workdir) -> list[int]:
    folder = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(folder):
        return []
    return sorted(int(name) for name in os.listdir(folder) if name.isdigit())


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    reference = _train(full)  # Runs alongside the one that gets killed.
    victim = _train(cut)
    try:
        deadline = time.monotonic() + 240
        while not _checkpoints(cut) and victim.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)  # Somewhere after the first checkpoint: mid-step, mid-save or mid-log.
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
    finally:
        if victim.poll() is None:
            victim.kill()
    assert victim.returncode == -signal.SIGKILL, victim.stderr.read()[-2000:]
    killed_at = max(_checkpoints(cut), default=0)
    assert 0 < killed_at < STEPS, "the run was not interrupted mid-way"

    saved = Config.from_dict(json.loads((cut / "config.json").read_text()))
    with pytest.raises(RunDirError, match="already holds a run"):  # Not without --resume.
        RunDir.open(cut, saved, resume=False)

    # What a kill mid-save can leave behind, beyond the last checkpoint.
    later = cut / "checkpoints" / str(killed_at + EVERY)
    (later / "state").mkdir(parents=True)  # A step dir without orbax's metadata file.
    tmp_dir = cut / "checkpoints" / f"{killed_at + 2 * EVERY}.orbax-checkpoint-tmp-1"
    (tmp_dir / "state").mkdir(parents=True)
    with open(cut / "metrics.jsonl", "a") as f:
        f.write('{"step": 99, "loss": 0.')  # A metrics line cut short.

    resumed = _train(cut, "--resume")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert f"resumed from step {killed_at}" in out
    out_full, err_full = reference.communicate(timeout=300)
    assert reference.returncode == 0, err_full[-3000:]

    vocab = Vocab.load(full / "vocab.json")
    assert (cut / "vocab.json").read_text() == (full / "vocab.json").read_text()
    saved = Config.from_dict(json.loads((full / "config.json").read_text()))
    template = init_state(init_model(saved, vocab.size, 0)[1], make_optimizer(saved.train))
    a, meta_a = RunDir(full).restore(template, STEPS)
    b, meta_b = RunDir(cut).restore(template, STEPS)
    chex.assert_trees_all_close(a.params, b.params, rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_close(a.opt_state, b.opt_state, rtol=1e-6, atol=1e-7)
    assert meta_a == meta_b
    assert_same_metrics(full, cut, range(1, STEPS + 1), rtol=1e-5)  # Each step once.
    leftovers = [n for n in os.listdir(cut) + os.listdir(cut / "checkpoints") if "tmp" in n]
    assert leftovers == []


@pytest.fixture(scope="module")
def episodes_path(tmp_path_factory):
    records = [small_episode(task_idx=i % 3, reward=float(i % 2)) for i in range(6)]
    return write_jsonl(tmp_path_factory.mktemp("data") / "eps.jsonl", records)


def test_non_finite_loss_stops_with_step_and_keeps_last_good_checkpoint(
    episodes_path, tmp_path, monkeypatch
):
    cfg = Config(
        model=TINY_MODEL,
        loss=LossConfig(objective="echo", lam=0.1),
        data=DataConfig(paths=(episodes_path,), max_len=128),
        train=TrainConfig(steps=6, batch_size=3, log_every=1, checkpoint_every=2),
    )
    real_indices, real_make_batch = train_module.batch_indices, train_module.make_batch
    asked, used = [], [0]  # Steps whose rows were drawn (0-based); how many went into batches.

    def indices(step, *args):
        asked.append(step)
        return real_indices(step, *args)

    def poisoned(data, index, advantage):  # Step 5's batch carries a NaN advantage.
        batch = real_make_batch(data, index, advantage)
        steps, used[0] = asked[used[0] :], len(asked)  # This call's steps, in its order.
        if 4 in steps:
            advantages_KB = batch.advantages_B.copy()
            advantages_KB[steps.index(4)] = np.nan
            batch = batch._replace(advantages_B=advantages_KB)
        return batch

    monkeypatch.setattr(train_module, "batch_indices", indices)
    monkeypatch.setattr(train_module, "make_batch", poisoned)
    with pytest.raises(TrainingDiverged) as err:
        run_experiment(cfg, str(tmp_path / "w"), log=lambda _: None)
    message = str(err.value)
    assert message.startswith("non-finite loss at step 5 (loss=nan")
    assert "Last good checkpoint: step 4" in message
    run = RunDir(tmp_path / "w")
    assert run.latest_checkpoint_step() == 4
    assert [m["step"] for m in run.read_metrics()] == [1, 2, 3, 4]
    assert not os.path.exists(tmp_path / "w" / "summary.json")
    vocab = Vocab.load(tmp_path / "w" / "vocab.json")
    template = init_state(init_model(cfg, vocab.size, 0)[1], make_optimizer(cfg.train))
    state, _ = run.restore(template, 4)
    assert int(state.step) == 4
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state))


def _wait_for(predicate, process, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert process.poll() is None, f"exited early with {process.returncode}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _processes_naming(text: str) -> list[int]:
    """Processes whose command line holds `text` (a sandbox's bwrap names its world folder)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    found.append(int(pid))
        except OSError:  # Gone meanwhile.
            pass
    return found


def _stop(process, signum: int, timeout_s: float = 60) -> int:
    """Sends `signum`, returns the exit status; a process that outlives timeout_s is killed."""
    try:
        process.send_signal(signum)
        return process.wait(timeout=timeout_s)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_sigterm_stops_an_rl_run_with_its_world_servers(tmp_path, request):
    """A preempted run (SIGTERM) stops as Ctrl-C stops it: every sandboxed server is gone and
    its folder removed. Python's default would end the host at once and leave them."""
    tmp = Path(tempfile.mkdtemp(prefix="sigterm_"))  # The run's TMPDIR, for its servers'
    request.addfinalizer(lambda: shutil.rmtree(tmp))  # folders; short: sockets live there.
    pool = tmp_path / "pool.json"
    pool.write_text(json.dumps({"tasks": [["tiny_shop", 0], ["tiny_shop_two", 1]]}))
    start = os.path.join(ROOT, "tests", "fixtures", "hf", "tiny-qwen3")
    args = [f"--start={start}", "--max_len=512", f"--worlds={WORLDS}", "--corpus=",
            f"--pool_file={pool}", "--objective=echo", "--lam=0.5", "--iterations=50",
            "--group_size=2", "--max_new_tokens=12", "--max_steps=1", "--epochs=1",
            "--minibatch_size=2", "--slots=3", "--servers_per_scenario=1", "--eval_split=",
            f"--workdir={tmp_path / 'w'}"]  # fmt: skip
    with open(tmp_path / "rl.log", "w") as log:
        run = subprocess.Popen(
            [sys.executable, "-m", "experiments.rl", *args],
            cwd=ROOT,
            env=dict(os.environ, JAX_PLATFORMS="cpu", TMPDIR=str(tmp)),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _wait_for(lambda: _processes_naming(f"{tmp}/awm_tiny_shop_two_"), run)  # Sandboxes up.
    code = _stop(run, signal.SIGTERM)
    assert code == STOPPED_BY_SIGTERM, (tmp_path / "rl.log").read_text()[-3000:]
    assert sorted(os.listdir(tmp)) == []
    assert _processes_naming(str(tmp)) == []


_CHILD = """
import os, pathlib, signal, sys, time
folder = pathlib.Path(sys.argv[1])
signal.signal(signal.SIGTERM, lambda *_: ((folder / "stopped").touch(), sys.exit(0)))
(folder / "pid").write_text(str(os.getpid()))
time.sleep(120)
"""

_SWEEP = """
import os, sys
from echo_jax.reports import rl_sweep
from echo_jax.util import stop_signals
stop_signals.stop_on_signals()
folder, child = sys.argv[1], sys.argv[2]
runs = []
for seed in (0, 1):
    out = os.path.join(folder, f"run{seed}")
    os.mkdir(out)
    argv = ("python", "-c", child, out)
    runs.append(rl_sweep.RLRunSpec(rl_sweep.RLArm("grpo"), seed, os.path.join(out, "w"), argv))
rl_sweep.run_all(runs, os.path.join(folder, "results"), log=lambda _: None)
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_a_stopped_sweep_stops_its_running_run(tmp_path, signum):
    """The sweep passes its stop to the run it is waiting on, and starts no other; killed
    outright, it still leaves no run going on alone (the run's parent-death signal)."""
    sweep = subprocess.Popen(
        [sys.executable, "-c", _SWEEP, str(tmp_path), _CHILD],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=ROOT),
        start_new_session=True,
    )
    _wait_for(lambda: (tmp_path / "run0" / "pid").exists(), sweep, timeout_s=60)
    child = int((tmp_path / "run0" / "pid").read_text())
    code = _stop(sweep, signum)
    assert code == (STOPPED_BY_SIGTERM if signum == signal.SIGTERM else -signal.SIGKILL)
    deadline = time.monotonic() + 30
    while os.path.exists(f"/proc/{child}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{child}")
    assert (tmp_path / "run0" / "stopped").exists()  # By its SIGTERM, not killed.
    assert not (tmp_path / "run1" / "pid").exists()
