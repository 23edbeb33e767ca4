"""A real-format world with 61 tools (fixtures/wide_world, made by make_wide_world.py), as
large as AWM-1K's largest tool lists: a checkpoint whose rows hold the list runs closed-loop
episodes in it."""

from pathlib import Path

from echo_jax.agent.closed_loop import evaluate_checkpoint
from echo_jax.awm.capture_shards import read_shard
from echo_jax.config import AgentConfig

HERE = Path(__file__).parent
WIDE = HERE / "fixtures" / "wide_world"
QWEN = HERE.parent / "fixtures" / "hf" / "tiny-qwen3"


def test_a_tiny_qwen3_runs_episodes_in_a_61_tool_world(tmp_path):
    metrics = evaluate_checkpoint(
        str(QWEN),
        "train",
        0,
        worlds=str(WIDE),
        corpus_dir=None,
        agent=AgentConfig(max_new_tokens=8, max_steps=1),
        max_tasks=1,
        tool_call_positions=0,
        out=str(tmp_path / "eval"),
        max_len=4096,
    )
    (episode,) = read_shard(metrics["rollouts"])
    assert len(episode["tools"]) == 61  # Listed by the server over MCP.
    (row,) = episode["rows"]
    assert len(row["tokens"]) > 2048  # The tool list alone outgrows the shipped model's rows.
    assert episode["steps"][-1]["observation"]["verify_result"]["execution_status"] == "success"
