"""Training as several processes (echo_jax.train.distributed): two CPU processes of
`experiments.train` end with the parameters, metrics and evaluation of one process training on
the same global batches, two of `experiments.rl` with those of one process running the same
iterations; and the launch settings' rules, checked in this (one) process.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest

from echo_jax.agent.policy import load_run
from echo_jax.awm.capture_shards import read_shard
from echo_jax.config import Config, ConfigError
from echo_jax.data.hf_tokenizer import HFVocab
from echo_jax.data.vocab import load_vocab
from echo_jax.model.hf_io import load_hf
from echo_jax.rl.loop import TIMING_METRICS
from echo_jax.train import distributed
from echo_jax.train.evaluation import EVAL_FILE
from echo_jax.train.run_dir import RunDir
from echo_jax.train.sharding import data_parallel
from echo_jax.train.trainer import init_model, init_state, make_optimizer
from echo_jax.util.jsonl import read_jsonl
from tests.test_agent import WORLDS
from tests.test_agent import episode as episode  # noqa: F401  (fixture)
from tests.test_agent import vocab as vocab  # noqa: F401  (fixture)
from tests.test_data import small_episode, write_jsonl
from tests.test_rl import start_run as start_run  # noqa: F401  (fixture)
from tests.test_train import assert_same_metrics

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
TIMEOUT_S = 240  # For the three runs together; a hung collective is killed, never waited on.
LAUNCH_VARS = (*(v for v in os.environ if v.startswith(("SLURM_", "OMPI_"))), "XLA_FLAGS")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _child_env(**extra: str) -> dict[str, str]:
    """The CPU backend, one device per process, no launcher or proxy settings inherited (gRPC
    would route the coordinator's localhost connections through a proxy)."""
    drop = {*LAUNCH_VARS, distributed.ENV_COORDINATOR_ADDRESS, distributed.ENV_NUM_PROCESSES}
    drop.add(distributed.ENV_PROCESS_ID)
    env = {k: v for k, v in os.environ.items() if k not in drop and "_proxy" not in k.lower()}
    return dict(env, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, **extra)


def _run_all(
    runs: dict[str, tuple[list[str], dict[str, str]]], logs, module: str = "experiments.train"
) -> dict[str, int]:
    """Starts every run at once (each in its own process group), waits for all within
    TIMEOUT_S and kills what is left, so a hang fails the test instead of stalling CI."""
    procs = {}
    try:
        for name, (args, env) in runs.items():
            with open(logs / f"{name}.out", "w") as out, open(logs / f"{name}.err", "w") as err:
                procs[name] = subprocess.Popen(
                    [sys.executable, "-m", module, *args],
                    cwd=ROOT,
                    env=env,
                    stdout=out,
                    stderr=err,
                    start_new_session=True,
                )
        deadline = time.monotonic() + TIMEOUT_S
        for proc in procs.values():
            proc.wait(timeout=max(deadline - time.monotonic(), 1))
        return {name: proc.returncode for name, proc in procs.items()}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


# The one-process reference splits every batch over two CPU devices, as the two processes do
# over theirs: both then run one program per device on the same rows and add the two devices'
# partial sums (a + b, the same float32 sum whichever device adds), so they compute every
# number in the same order and agree to the last bit. Against one device instead, the sums'
# order differs, and Adam divides a gradient by its own running size: an element whose gradient
# is a near-cancelling sum turns a last-bit difference into a visible share of lr, by an amount
# that depends on the CPU's kernels.
REFERENCE_DEVICES = "--xla_force_host_platform_device_count=2"
EPS32 = float(np.finfo(np.float32).eps)
# Made from the sampler's log-probs, each moving by at most as much as they do: the gaps by
# definition, k3's kl by its slope 1 - e^x, under 1 while the update moves a log-prob by less
# than log 2 (kl here is about 1e-2).
SAMPLER_LOGP_METRICS = ("logp_gap_mean", "logp_gap_max", "kl")


def _two_and_one(args: list[str], one, two) -> dict[str, tuple[list[str], dict[str, str]]]:
    """A one-process run in `one` on two devices, and two processes in `two` with one each:
    process 0 told the launch settings by the environment, process 1 by the flags."""
    address = f"localhost:{_free_port()}"
    return {
        "one": ([*args, f"--workdir={one}"], _child_env(XLA_FLAGS=REFERENCE_DEVICES)),
        "p0": (
            [*args, f"--workdir={two}"],
            _child_env(JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="0"),
        ),
        "p1": (
            [
                *args,
                f"--workdir={two}",
                f"--coordinator_address={address}",
                "--num_processes=2",
                "--process_id=1",
            ],
            _child_env(),
        ),
    }


def _final_state(workdir, step: int):
    run = RunDir(workdir)
    with open(run.file(RunDir.CONFIG)) as f:
        cfg = Config.from_dict(json.load(f))
    vocab = load_vocab(run.file(RunDir.VOCAB))
    template = init_state(init_model(cfg, vocab.size, 0)[1], make_optimizer(cfg.train))
    state, meta = run.restore(template, step)
    return state, meta, template.params


# The tiny model, and a Hugging Face checkpoint in its chat layout and tokenizer.
MODELS = {
    "tiny": ["--max_len=128", "--d_model=16", "--n_layers=1", "--d_ff=32"],
    "hf": [f"--model={os.path.join(ROOT, 'tests', 'fixtures', 'hf', 'tiny-qwen3')}",
           "--max_len=512", "--attention=xla"],
}  # fmt: skip


@pytest.mark.parametrize("model", MODELS)
def test_two_processes_train_as_one(tmp_path, model):
    """Each process builds its half of every batch; their run ends where a one-process run on
    the same global batches does. Process 0 via the environment, process 1 via the flags."""
    records = [small_episode(task_idx=i % 3, reward=float(i % 2)) for i in range(6)]
    data = write_jsonl(tmp_path / "eps.jsonl", records)
    args = [
        f"--data={data}",
        *MODELS[model],
        "--steps=4",
        "--batch_size=4",
        "--log_every=1",
        "--checkpoint_every=2",
        "--cache_dir=",
        "--eval_splits=train",
    ]
    one, two = tmp_path / "one", tmp_path / "two"
    codes = _run_all(_two_and_one(args, one, two), tmp_path)
    for name, code in codes.items():
        assert code == 0, f"{name}: {(tmp_path / f'{name}.err').read_text()[-3000:]}"

    want, want_meta, init = _final_state(one, 4)
    got, got_meta, _ = _final_state(two, 4)
    assert got_meta == want_meta == {"data_position": 16, "seed": 0}
    assert int(got.step) == 4
    chex.assert_trees_all_equal(got.params, want.params)  # Same sums, same order (above).
    chex.assert_trees_all_equal(got.opt_state, want.opt_state)
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), got.params, init)
    assert max(jax.tree.leaves(moved)) > 1e-3  # It trained: equal by doing nothing can't pass.
    assert sorted(RunDir(two).manager.all_steps()) == [2, 4]

    # One writer: one metrics file, each step logged once, with the one-process run's values.
    assert sorted(os.listdir(two)) == sorted(os.listdir(one))
    assert sorted(p.name for p in two.rglob("*.jsonl")) == ["eval.jsonl", "metrics.jsonl"]
    assert_same_metrics(one, two, range(1, 5), rtol=0)
    (want_eval,), (got_eval,) = read_jsonl(one / EVAL_FILE), read_jsonl(two / EVAL_FILE)
    for key, value in want_eval.items():
        if key != "wall_s" and value is not None:
            assert got_eval[key] == value, key
    assert "done: 4 steps" in (tmp_path / "p0.out").read_text()
    assert "step" not in (tmp_path / "p1.out").read_text()  # Only process 0 logs.


def _rollouts(workdir) -> dict[str, list[dict]]:
    return {f.name: list(read_shard(f)) for f in sorted((workdir / "rollouts").iterdir())}


def _logp_tolerance(logp: list[float], vocab_size: int) -> float:
    """The rollouts' log-probs agree to float32 rounding, not to the bit: a rollout may sit in
    another decode slot of the fixed-shape batch in the two runs, and XLA:CPU's matmul kernels
    round a row by where it falls in their blocks (whose size follows the CPU's vector width), so
    the same sums come in another order. Two orders of an n-term float32 sum differ by at most
    n·eps times the terms' size (Higham's γ_n); the widest sum on the way to a log-prob is the
    softmax's over the vocabulary, on terms of the log-probs' size."""
    return vocab_size * EPS32 * max(1.0, max(abs(v) for v in logp))


@pytest.mark.parametrize("model", ["tiny", "hf"])
def test_two_processes_run_rl_as_one(tmp_path, start_run, vocab, model):  # noqa: F811
    """Each process runs half of every iteration's rollouts and evaluations and supplies half
    of every minibatch; their run ends where one process's does, and only process 0 writes.
    From a tiny-model run, and from a Hugging Face checkpoint folder itself."""
    start, start_params = start_run
    if model == "hf":
        start = os.path.join(ROOT, "tests", "fixtures", "hf", "tiny-qwen3")
        start_params, vocab = load_hf(start)[2], HFVocab(start)
    max_len = ["--max_len=512"] if model == "hf" else []  # The run's own otherwise.
    pool = tmp_path / "pool.json"
    pool.write_text(json.dumps({"tasks": [["tiny_shop", 0], ["tiny_shop_two", 1]]}))
    args = [
        f"--start={start}",
        f"--worlds={WORLDS}",
        "--corpus=",
        f"--pool_file={pool}",
        "--objective=echo",
        "--lam=0.5",
        "--iterations=2",
        "--group_size=2",
        "--max_new_tokens=12",
        "--max_steps=1",
        "--epochs=1",
        "--minibatch_size=2",
        "--learning_rate=1e-2",
        "--slots=3",
        "--servers_per_scenario=1",
        "--eval_split=",
        *max_len,
    ]
    one, two = tmp_path / "one", tmp_path / "two"
    codes = _run_all(_two_and_one(args, one, two), tmp_path, "experiments.rl")
    for name, code in codes.items():
        assert code == 0, f"{name}: {(tmp_path / f'{name}.err').read_text()[-3000:]}"

    if model == "hf":  # --max_len set the context of a run started from a checkpoint folder.
        with open(RunDir(two).file(RunDir.CONFIG)) as f:
            assert json.load(f)["data"]["max_len"] == 512
    here = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # Not the runs' devices.
    *_, want, want_step = load_run(one, sharding=here)
    *_, got, got_step = load_run(two, sharding=here)
    assert got_step == want_step == 2
    chex.assert_trees_all_equal(got, want)  # Same sums, same order (REFERENCE_DEVICES).
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), got, start_params)
    assert max(jax.tree.leaves(moved)) > 1e-3  # It trained: equal by doing nothing can't pass.

    # Every rollout, in request order, in process 0's files; one writer of every file, and
    # nothing left of the exchange.
    assert sorted(os.listdir(two)) == sorted(os.listdir(one))
    assert len(os.listdir(two / RunDir.TENSORBOARD)) == 1
    want_rollouts, got_rollouts = _rollouts(one), _rollouts(two)
    gap_tol = 0.0  # The sampler's log-probs' tolerance, for the metrics made from them.
    assert list(got_rollouts) == ["iter_0001.jsonl.gz", "iter_0002.jsonl.gz"]
    same = ("scenario", "task_idx", "agent", "reward", "step_reward_types")
    for name, records in want_rollouts.items():
        assert len(got_rollouts[name]) == len(records) == 4
        for a, b in zip(records, got_rollouts[name], strict=True):
            assert [a[k] for k in same] == [b[k] for k in same]
            for ra, rb in zip(a["rows"], b["rows"], strict=True):
                assert ra["tokens"] == rb["tokens"]
                tol = _logp_tolerance(ra["logp"], vocab.size)
                np.testing.assert_allclose(rb["logp"], ra["logp"], rtol=0, atol=tol)
                gap_tol = max(gap_tol, tol)
    lines_a, lines_b = RunDir(one).read_metrics(), RunDir(two).read_metrics()
    assert [m["iteration"] for m in lines_b] == [0, 1, 2]
    # What trained: the env term (a random model fails every task alike, so every advantage,
    # hence the policy term, is 0 here; the update's PPO ratios and clipping still ran).
    assert all(m["env_loss"] > 0 and m["update_steps"] > 1 for m in lines_b[1:])
    for la, lb in zip(lines_a, lines_b, strict=True):
        assert la.keys() == lb.keys()
        for key in la.keys() - set(TIMING_METRICS) - set(SAMPLER_LOGP_METRICS):
            np.testing.assert_equal(lb[key], la[key], err_msg=key)
        for key in la.keys() & set(SAMPLER_LOGP_METRICS):  # Iteration 0 samples nothing.
            np.testing.assert_allclose(lb[key], la[key], rtol=0, atol=gap_tol, err_msg=key)
    assert "iter   2" in (tmp_path / "p0.out").read_text()
    assert "iter" not in (tmp_path / "p1.out").read_text()  # Only process 0 logs.


@pytest.fixture
def no_launcher(monkeypatch):
    """No launch settings in the environment: neither JAX's variables nor srun's or mpirun's."""
    for name in (
        *LAUNCH_VARS,
        distributed.ENV_COORDINATOR_ADDRESS,
        distributed.ENV_NUM_PROCESSES,
        distributed.ENV_PROCESS_ID,
    ):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_one_process_is_a_no_op(no_launcher):
    assert not distributed.initialize()
    assert not distributed.initialize(num_processes=1)
    no_launcher.setenv(distributed.ENV_NUM_PROCESSES, "1")
    assert not distributed.initialize(coordinator_address="localhost:1234")
    # srun with one task, as JAX's own SLURM detector reads it.
    for name, value in (
        ("SLURM_JOB_ID", "7"),
        ("SLURM_STEP_NODELIST", "node001"),
        ("SLURM_NTASKS", "1"),
        ("SLURM_PROCID", "0"),
        ("SLURM_LOCALID", "0"),
    ):
        no_launcher.setenv(name, value)
    no_launcher.delenv(distributed.ENV_NUM_PROCESSES)
    assert not distributed.initialize()
    assert not jax.distributed.is_initialized()


@pytest.mark.parametrize(
    "kwargs, env, message",
    [
        ({"coordinator_address": "localhost:1"}, {}, "missing --num_processes"),
        ({"num_processes": 2, "process_id": 0}, {}, "missing --coordinator_address"),
        ({}, {"JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES='two' is not an integer"),
        (
            {"coordinator_address": "localhost:1", "num_processes": 2, "process_id": 2},
            {},
            r"\[0, 2\)",
        ),
        ({"num_processes": 0}, {}, "num_processes must be >= 1"),
    ],
)
def test_incomplete_launch_settings_are_refused(no_launcher, kwargs, env, message):
    for name, value in env.items():
        no_launcher.setenv(name, value)
    with pytest.raises(ConfigError, match=message):
        distributed.initialize(**kwargs)
    assert not jax.distributed.is_initialized()


def test_one_process_holds_every_row_and_assembles_its_batch():
    dp = data_parallel(4)
    assert distributed.process_slice(4) == slice(0, 4)
    assert distributed.process_slice(4, dp.steps) == slice(0, 4)
    assert distributed.process_share(5) == slice(0, 5)
    local = {
        "tokens": np.arange(2 * 4 * 3, dtype=np.int32).reshape(2, 4, 3),
        "lam": np.float32(0.5),
    }
    out = distributed.global_batch(local, dp.steps, 4)
    assert out["tokens"].sharding == dp.steps and out["lam"].sharding.is_fully_replicated
    np.testing.assert_array_equal(distributed.to_host(out)["tokens"], local["tokens"])
    assert float(out["lam"]) == 0.5
    with pytest.raises(ValueError, match="share of the 8 is 8"):
        distributed.global_batch(local, dp.steps, 8)
    # Alone: every item is this process's own, and a replicated array is its own copy.
    items = [{"logp": [-0.1, 1e-30]}, [1, "a"]]
    assert distributed.all_gather_json(items) == items
    state = distributed.replicate({"w": np.ones(3, np.float32)}, dp.replicated)
    assert distributed.local_replica(state)["w"] is state["w"]
