"""The on-policy loop: λ schedules, rollout rendering and filters, and two real iterations."""

import dataclasses
import gzip
import json
import shutil

import chex
import jax
import numpy as np
import pytest

from echo_jax.agent.policy import POLICY_KEY, load_run
from echo_jax.agent.rollout_rows import EPISODE_ROWS
from echo_jax.awm.rewards import reward_for
from echo_jax.config import Config, ConfigError, DataConfig, LossConfig, RLConfig, validate_rl
from echo_jax.data import roles
from echo_jax.data.episode_files import load_episodes
from echo_jax.data.render import END_CALL
from echo_jax.objective.batch import Batch
from echo_jax.objective.loss import echo_loss_from_logprobs
from echo_jax.rl.loop import SUMMARY, lam_at, run_rl
from echo_jax.rl.rows import env_term_kept, rollout_batch, rollout_stats, training_reward
from echo_jax.rl.update import approx_kl
from echo_jax.train.run_dir import RunDir, RunDirError
from echo_jax.train.trainer import init_state, make_optimizer
from tests.cli import run_module
from tests.test_agent import MAX_LEN, TINY, WORLDS, random_model
from tests.test_agent import episode as episode  # noqa: F401  (fixture)
from tests.test_agent import vocab as vocab  # noqa: F401  (fixture)

GENERATED = '{"tool_name":"get_item","arguments":{"item_id":1}}' + END_CALL  # Compact spacing.
UNCLOSED = '{"tool_name": "get_it'


def policy(text, parse_error=None):
    return {"text": text, "tokens": [], "logp": [], "parse_error": parse_error}


def hand_record(task_idx=0, reward_type="others", scenario="tiny_shop"):
    """A rollout as the harness writes it: a good call, an unclosed one, the forced verify."""
    steps = [
        {
            "action": {"tool_name": "get_item", "arguments": {"item_id": 1}},
            "observation": {"reward_type": "tool_call_ok", "tool_result": '{"id": 1}'},
            POLICY_KEY: policy(GENERATED),
        },
        {
            "action": {"tool_name": "invalid_action", "arguments": {}, "raw": UNCLOSED},
            "observation": {"reward_type": "invalid_action", "error": "Invalid action: unclosed"},
            POLICY_KEY: policy(UNCLOSED, "the call was not closed with <|end_call|>"),
        },
        {
            "action": {"tool_name": "verify", "arguments": {"verifier_mode": "code"}},
            "observation": {
                "reward_type": reward_type,
                "verify_result": {"execution_status": "success", "result": reward_type},
                "warning": "step limit reached (2 tool calls); verified",
            },
        },
    ]
    return {
        "scenario": scenario,
        "task": "Buy item 1.",
        "task_idx": task_idx,
        "tools": ["get_item", "create_order"],
        "steps": steps,
        "reward": reward_for(reward_type),
        "step_reward_types": [s["observation"]["reward_type"] for s in steps],
    }


def test_lam_schedules():
    rl = RLConfig(iterations=5, lam_final=0.0, lam_decay=0.5, lam_step_every=2)
    assert [lam_at(rl, 0.4, i) for i in range(5)] == [0.4] * 5
    linear = dataclasses.replace(rl, lam_schedule="linear")
    assert [lam_at(linear, 0.4, i) for i in range(5)] == pytest.approx([0.4, 0.3, 0.2, 0.1, 0.0])
    step = dataclasses.replace(rl, lam_schedule="step")
    assert [lam_at(step, 0.4, i) for i in range(5)] == pytest.approx([0.4, 0.4, 0.2, 0.2, 0.1])
    with pytest.raises(ConfigError, match="lam_schedule"):
        validate_rl(dataclasses.replace(rl, lam_schedule="cosine"))
    with pytest.raises(ConfigError, match="group_size"):
        validate_rl(dataclasses.replace(rl, group_size=1))


def test_rollout_stats_filters_and_reward():
    record = hand_record()
    stats = rollout_stats(record)
    assert stats == {
        "valid_call_share": 0.5,  # The forced verify is not the policy's call.
        "parse_share": 0.5,
        "format_error_share": pytest.approx(1 / 3),
        "success": 0.0,
    }
    assert training_reward(record, RLConfig()) == 0.0
    assert training_reward(record, RLConfig(format_penalty=0.6)) == pytest.approx(-0.2)
    assert env_term_kept(record, RLConfig(min_valid_call_share=0.5, min_parse_share=0.5))
    assert not env_term_kept(record, RLConfig(min_valid_call_share=0.75))
    assert not env_term_kept(record, RLConfig(min_parse_share=0.75))


def with_rows(record, *rows):
    """A rollout with recorded rows (tokens, roles, kinds, logp), as the engine writes them."""
    record[EPISODE_ROWS] = [
        {"tokens": list(range(1, len(r) + 1)), "roles": list(r), "kinds": list(k),
         "logp": [-0.5 if x == roles.ACTION else 0.0 for x in r]}
        for r, k in rows
    ]  # fmt: skip
    return record


C, A, E, W = roles.CONTEXT, roles.ACTION, roles.ENV_OUTPUT, roles.WARNING
ONE_ROW = ([C, A, A, E, E, C, A, E], [0, 0, 0, 1, 1, 0, 0, 3])


def test_rollout_batch_advantages_weights_and_exact_rows():
    two_rows = (([C, A, A, E, E], [0, 0, 0, 1, 2]), ([C, C, A, E], [0, 0, 0, 3]))
    records = [
        with_rows(hand_record(0, "complete"), ONE_ROW),
        with_rows(hand_record(0, "others"), *two_rows),
        with_rows(hand_record(1, "others"), ONE_ROW),
        with_rows(hand_record(1, "others"), ONE_ROW),
    ]
    records[3]["steps"][0][POLICY_KEY]["parse_error"] = "bad"  # Fails min_parse_share=0.75.
    rl = RLConfig(min_parse_share=0.5, weight_tool_error=0.25, weight_verifier=2.0)
    batch = rollout_batch(records, rl, max_len=10)
    assert batch.num_rows == 5 and list(batch.episode) == [0, 1, 1, 2, 3]
    np.testing.assert_allclose(batch.advantage, [1.0, -1.0, -1.0, 0.0, 0.0], atol=1e-5)
    # The two-row episode's rows share its 3 action tokens: weights 2/3 and 1/3, one unit.
    np.testing.assert_allclose(batch.pg_weight, [1.0, 2 / 3, 1 / 3, 1.0, 1.0])
    # Exactly the recorded tokens, PAD after; the sampling log-probs aligned with targets.
    assert list(batch.tokens[1]) == [1, 2, 3, 4, 5, 0, 0, 0, 0, 0]
    np.testing.assert_array_equal(batch.sample_logp[0, :7], [-0.5, -0.5, 0, 0, 0, -0.5, 0])
    # Env weights per target: kinds weighted; the filtered rollout's targets weigh 0.
    np.testing.assert_allclose(batch.env_weight[1, :4], [0.0, 0.0, 1.0, 0.25])
    np.testing.assert_allclose(batch.env_weight[2, :3], [0.0, 0.0, 2.0])
    assert not batch.env_weight[4].any()
    np.testing.assert_array_equal(batch.informative, [True, True, False, False])
    dropped = rollout_batch(records, RLConfig(drop_equal_reward_groups=True), max_len=10)
    assert dropped.env_weight[:3].any() and not dropped.env_weight[3:].any()


def test_an_episode_over_several_rows_weighs_as_one_in_the_policy_term():
    """The episode cut into two rows, with row weights, gives the policy term of the same
    episode in one row; without them, the longer part would count twice."""
    logp_S = np.array([-0.1, -0.7, -0.3, -0.9, -0.2], np.float32)
    roles_S = np.array([A, A, E, A, A])
    adv = 0.8

    def pg(logp_BS, roles_BS, pg_weight_B=None):
        roles_BT = np.pad(roles_BS, ((0, 0), (1, 0)))  # Targets are tokens 1 .. T-1.
        batch = Batch(np.zeros_like(roles_BT), roles_BT, np.full(len(logp_BS), adv),
                      pg_weight_B=pg_weight_B)  # fmt: skip
        return float(echo_loss_from_logprobs(logp_BS, batch, LossConfig(objective="grpo"))[0])

    whole = pg(logp_S[None], roles_S[None])
    assert whole == pytest.approx(-adv * logp_S[roles_S == A].mean())  # Independent: -A·mean.
    cut_logp = np.array([[-0.1, -0.7, -0.3, 0.0], [-0.9, -0.2, 0.0, 0.0]], np.float32)
    cut_roles = np.array([[A, A, E, roles.PAD], [A, A, roles.PAD, roles.PAD]])
    weights = np.array([0.5, 0.5], np.float32)  # 2 of the episode's 4 action tokens each.
    assert pg(cut_logp, cut_roles, weights) == pytest.approx(whole, rel=1e-6)
    other = np.array([[A, A, A, E], [A, roles.PAD, roles.PAD, roles.PAD]])  # 3 + 1 tokens.
    unweighted = pg(cut_logp, other)
    weighted = pg(cut_logp, other, np.array([0.75, 0.25], np.float32))
    want = -adv * np.mean([-0.1, -0.7, -0.3, -0.9])
    assert weighted == pytest.approx(want, rel=1e-6) and unweighted != pytest.approx(want)


def test_env_term_teaches_on_a_group_whose_rewards_are_equal():
    records = [with_rows(hand_record(0, "others"), ONE_ROW) for _ in range(2)]
    batch = rollout_batch(records, RLConfig(), max_len=10)
    np.testing.assert_array_equal(batch.advantage, [0.0, 0.0])  # No policy signal ...
    logp = np.full((2, 9), -1.5, np.float32)
    rows = Batch(batch.tokens, batch.roles, batch.advantage, pg_weight_B=batch.pg_weight,
                 env_weight_BS=batch.env_weight)  # fmt: skip
    loss, m = echo_loss_from_logprobs(logp, rows, LossConfig(objective="echo", lam=0.1))
    assert float(m["pg_loss"]) == 0.0 and float(m["env_loss"]) > 0  # ... but the world model.
    assert float(loss) == pytest.approx(0.1 * float(m["env_loss"]))


def test_sampling_settings_other_than_the_models_own_are_refused():
    for change in ({"temperature": 0.7}, {"top_p": 0.9}):
        with pytest.raises(ConfigError, match="temperature 1 and top_p 1"):
            validate_rl(dataclasses.replace(RLConfig(), **change))


def test_approx_kl_is_zero_for_the_same_policy_and_positive_otherwise():
    roles_NT = np.full((2, 5), roles.ACTION, np.int8)
    old = np.log(np.full((2, 4), 0.5))
    assert approx_kl(old, old, roles_NT) == 0.0
    assert approx_kl(old, old + 0.1, roles_NT) > 0


@pytest.fixture(scope="module")
def start_run(tmp_path_factory, vocab):  # noqa: F811
    """A saved training run of a random tiny model: the loop's starting checkpoint."""
    cfg = Config(model=TINY, data=DataConfig(paths=("unused",), max_len=MAX_LEN))
    graphdef, params = random_model(TINY, vocab.size)
    path = tmp_path_factory.mktemp("start") / "run"
    run = RunDir.open(path, cfg, resume=False)
    run.claim()
    vocab.save(run.file(RunDir.VOCAB))
    run.save(init_state(params, make_optimizer(cfg.train)), 5, {"data_position": 0, "seed": 0})
    return str(path), params


def test_two_iterations_against_a_running_world(tmp_path, start_run):
    start, start_params = start_run
    pool = tmp_path / "pool.json"
    pool.write_text(json.dumps({"tasks": [["tiny_shop", 0], ["tiny_shop_two", 1]]}))
    rl = RLConfig(
        iterations=2,
        group_size=2,
        pool_file=str(pool),
        max_new_tokens=12,
        max_steps=1,
        epochs=1,
        minibatch_size=2,
        learning_rate=1e-2,
        slots=3,
        eval_split="",
    )
    loss = LossConfig(objective="echo", lam=0.5)
    cfg = dataclasses.replace(load_run(start)[0], loss=loss)
    workdir = tmp_path / "rl"
    summary = run_rl(str(workdir), rl, start=start, cfg=cfg, worlds=str(WORLDS), corpus_dir=None)
    assert summary["iterations"] == 2

    # Rollouts saved in the capture format, G per task, each step's policy record kept.
    files = sorted((workdir / "rollouts").glob("iter_*.jsonl.gz"))
    assert [f.name for f in files] == ["iter_0001.jsonl.gz", "iter_0002.jsonl.gz"]
    assert all(len(load_episodes([str(f)])) == 4 for f in files)
    with gzip.open(files[0], "rt") as f:
        records = [json.loads(line) for line in f]
    for record in records:
        final = record["steps"][-1]["observation"]
        # The reward is the verifier's decision on the world's database, nothing else.
        assert final["verify_result"]["execution_status"] == "success"
        assert record["reward"] == reward_for(final["reward_type"])
        assert POLICY_KEY in record["steps"][0]
    assert summary["env_steps"] == sum(
        len(ep.steps) for f in files for ep in load_episodes([str(f)])
    )

    lines = RunDir(workdir).read_metrics()
    assert [line["iteration"] for line in lines] == [0, 1, 2]
    for line in lines[1:]:
        for key in ("env_ce_fresh", "pg_loss", "clip_frac", "kl", "rollout_s", "update_s"):
            assert np.isfinite(line[key]), key
        # The engine's loop is part of the iteration's rollout time.
        assert 0 < line["rollout_decode_s"] + line["rollout_extend_s"] <= line["rollout_s"]
        assert line["update_steps"] == line["rows"] // 2 + line["rows"] % 2 and line["lam"] == 0.5
        # The update's forward pass reproduces every sampled token's recorded log-prob.
        assert line["logp_gap_mean"] <= 1e-4 and line["logp_gap_tokens"] > 0
        # How the terms pull, at the sampling parameters; the env term times λ = 0.5.
        assert line["grad_norm_env"] == pytest.approx(0.5 * line["grad_norm_env_unscaled"])
        assert line["grad_norm_env"] > 0 and line["grad_norm_pg"] >= 0
        assert "grad_cos" in line and line["skipped_steps"] == 0  # echo: the env term steps.
        assert sum(line["task_successes"].values()) == line["success_rate"] * line["rollouts"]
        assert 0 <= line["all_fail_groups"] + line["all_success_groups"] <= 1

    # The parameters moved, and the run reads back like any training run.
    _, _, _, params, step = load_run(str(workdir))
    assert step == 2
    moved = [
        not np.allclose(a, b)
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(start_params), strict=True)
    ]
    assert any(moved)

    # Cut as a kill between iteration 2's metrics line and its checkpoint leaves a run:
    # resumed, it drops that line, samples iteration 2's rollouts again from the same keys and
    # ends on the same parameters (the random model fails every task, so the policy term, the
    # one place the sampler's last-bit log-probs enter, is 0).
    cut = tmp_path / "cut"
    shutil.copytree(workdir, cut)
    (cut / SUMMARY).unlink()
    shutil.rmtree(cut / "checkpoints" / "2")
    other = dataclasses.replace(rl, learning_rate=2e-2)
    with pytest.raises(RunDirError, match=r"other settings \(rl.learning_rate: 0.01 -> 0.02\)"):
        run_rl(str(cut), other, start=start, cfg=cfg, worlds=str(WORLDS), corpus_dir=None,
               resume=True)  # fmt: skip
    again = run_rl(str(cut), rl, start=start, cfg=cfg, worlds=str(WORLDS), corpus_dir=None,
                   resume=True)  # fmt: skip
    assert again["env_steps"] == summary["env_steps"] and again["first"] == summary["first"]
    assert [line["iteration"] for line in RunDir(cut).read_metrics()] == [0, 1, 2]
    chex.assert_trees_all_equal(load_run(str(cut))[3], params)
    for name in ("iter_0001.jsonl.gz", "iter_0002.jsonl.gz"):
        want, got = (load_episodes([str(d / "rollouts" / name)]) for d in (workdir, cut))
        assert [e.steps for e in got] == [e.steps for e in want]


def test_reward_weights_imitate_rewarded_episodes_only(tmp_path):
    """LossConfig.advantage="reward", the warm start: weights are the raw rewards."""
    from echo_jax.data.dataset import load_packed
    from echo_jax.train.trainer import make_batch
    from tests.test_data import small_episode, write_jsonl

    records = [small_episode(reward=1.0), small_episode(reward=0.0)]
    path = write_jsonl(tmp_path / "e.jsonl", records)
    data, _ = load_packed(DataConfig(paths=(path,), max_len=128))
    index = np.array([1, 0])
    np.testing.assert_array_equal(make_batch(data, index, "reward").advantages_B, [0.0, 1.0])
    np.testing.assert_allclose(make_batch(data, index).advantages_B, [-1.0, 1.0], atol=1e-5)


def test_config_added_later_matches_its_default_only():
    from echo_jax.train.run_dir import config_diff, flatten

    wanted = flatten(json.loads(Config().to_json()))
    saved = {k: v for k, v in wanted.items() if k != "loss.advantage"}  # A run saved before.
    assert config_diff(saved, wanted) == []
    changed = dict(wanted, **{"loss.advantage": "reward"})
    assert config_diff(saved, changed) == ["loss.advantage"]
    assert config_diff(wanted, dict(wanted, **{"loss.lam": 0.5})) == ["loss.lam"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--objective=grpo", "--lam=0.1"], "--lam only applies to --objective=echo"),
        (["--lam_schedule=cosine"], "flag --lam_schedule=cosine"),
        (["--group_size=1"], "group_size must be >= 2"),
        (["--start=/nonexistent"], "--start=/nonexistent: no config.json"),
    ],
)
def test_rl_cli_rejects_bad_flags_before_any_work(args, message, tmp_path):
    proc = run_module("experiments.rl", *args, f"--workdir={tmp_path / 'w'}")
    assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "w").exists()
