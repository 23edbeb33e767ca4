"""AWM's default reward table, as OpenEnv's `agent_world_model_env` applies it per reward_type.

complete 1.0 and incomplete 0.1 (only the SQL + LLM-judge verifier mode yields incomplete; the
code verifiers we run answer complete or others). Format errors -- a tool that does not exist,
arguments that fail the tool's schema, an action that is not a tool call -- cost -1.0. Every other
reward_type (others, timeout, server_error, api_error, judge_error, tool_call_ok, ...) is 0.0.
"""

from __future__ import annotations

OUTCOME_REWARDS = {"complete": 1.0, "incomplete": 0.1}
FORMAT_ERROR_TYPES = frozenset({"tool_not_found", "invalid_args", "invalid_action"})
FORMAT_ERROR_REWARD = -1.0


def reward_for(reward_type: str) -> float:
    """The reward AWM assigns to a step or episode outcome labelled `reward_type`."""
    if reward_type in FORMAT_ERROR_TYPES:
        return FORMAT_ERROR_REWARD
    return OUTCOME_REWARDS.get(reward_type, 0.0)
