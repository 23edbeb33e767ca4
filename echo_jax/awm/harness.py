"""The episode harness: one task, one policy, one running world, one captured episode.

It is shared by the behaviour-policy capture and, later, a closed-loop model agent, so it takes
any object with `next_action(steps) -> {"tool_name": str, "arguments": dict}` and produces the
canonical capture shape (that of OpenEnv's AWM environment, see data/SOURCE.md):

    {"scenario", "task", "task_idx", "tools": [names], "steps": [{"action", "observation"}],
     "reward", "tool_schemas": [tools/list entries], "step_reward_types": [per step]}

Observations follow OpenEnv's `AWMObservation` with None fields left out: a successful call is
{"done": false, "metadata": {}, "reward_type": "tool_call_ok", "tool_name", "tool_result": the
tool's JSON text exactly as the server returned it}; a failed call carries the server's own
failure text in "error" (and no tool_result). The action named "verify" runs the task's code
verifier and appends OpenEnv's verify observation ({"reward_type", "scenario", "task",
"task_idx", "verify_result", "steps_taken"}), which ends the episode. Text the harness adds
itself (truncation, step limit) goes in "warning", never into tool_result or error.

Episode reward: the AWM reward (`rewards.reward_for`) of the final verify step's reward_type,
as in the real capture (verify answered "others", so reward 0.0). Per-step format-error penalties
are visible in step_reward_types but not summed into the episode reward.

Tool-error reward types are read from where fastapi-mcp's error text says the failure arose:
    "Unknown tool: x"                          -> tool_not_found  (-1.0)
    "Input validation error: ..." (schema)     -> invalid_args    (-1.0)
    "Error calling x. Status code: 422. ..."   -> invalid_args    (-1.0)
    "Error calling x. Status code: 5xx. ..."   -> server_error    (0.0)
    "Error calling x. Status code: other 4xx"  -> api_error       (0.0)
    anything else                              -> timeout if it says so, else server_error
OpenEnv instead matches keywords anywhere in the text ("not found" -> tool_not_found, "invalid",
"missing", ... -> invalid_args), which also files an API's own 404 "Order 7 not found" or 400
"Invalid status" under the -1.0 format errors; we keep those apart as api_error. The labels
agree for unknown tools, schema failures, 5xx and timeouts.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol

from echo_jax.awm.mcp_client import McpClient, McpError
from echo_jax.awm.rewards import reward_for
from echo_jax.awm.verifier import VerifierLimits
from echo_jax.awm.warm_verifier import VerifierPool, default_pool
from echo_jax.awm.world_format import World
from echo_jax.awm.world_server import WorldServer

VERIFY_TOOL = "verify"
INVALID_ACTION_TOOL = "invalid_action"
# A policy whose output is no tool call (a model's unparsable text) returns
# {PARSE_ERROR_KEY: why, "raw": its text}; the harness rejects it like any invalid action.
PARSE_ERROR_KEY = "parse_error"
_HTTP_ERROR = re.compile(r"Error calling \S+\. Status code: (\d{3})\.")
_JSON_RPC_INVALID_PARAMS = -32602


class Policy(Protocol):
    def next_action(self, steps: list[dict[str, Any]]) -> dict[str, Any]:
        """Return the next action, {"tool_name": str, "arguments": dict}, given the steps so far."""
        ...


@dataclass(frozen=True)
class HarnessConfig:
    """Episode bounds: tool calls before a forced verify, and the longest text kept per result."""

    max_tool_calls: int = 30
    max_result_chars: int = 16_000
    verifier_limits: VerifierLimits = field(default_factory=VerifierLimits)


def classify_tool_error(text: str) -> str:
    """The reward_type of a tool call that the MCP server flagged as an error (rules above)."""
    if text.startswith("Unknown tool:"):
        return "tool_not_found"
    if text.startswith("Input validation error:"):
        return "invalid_args"
    match = _HTTP_ERROR.match(text)
    if match:
        status = int(match.group(1))
        if status == 422:
            return "invalid_args"
        return "server_error" if status >= 500 else "api_error"
    lowered = text.lower()
    return "timeout" if "timeout" in lowered or "timed out" in lowered else "server_error"


def _verify_reward_type(verify_result: dict[str, Any]) -> str:
    status = verify_result["execution_status"]
    if status == "success":
        return verify_result["result"]
    return "timeout" if status == "timeout" else "judge_error"


def _invalid_action_reason(action: Any) -> str | None:
    if not isinstance(action, dict):
        return f"action must be a dict, got {type(action).__name__}"
    if isinstance(action.get(PARSE_ERROR_KEY), str):
        return action[PARSE_ERROR_KEY]
    if not isinstance(action.get("tool_name"), str) or not action["tool_name"]:
        return "action needs a non-empty string 'tool_name'"
    if not isinstance(action.get("arguments", {}), dict):
        return "action 'arguments' must be a JSON object"
    return None


class _Episode:
    """Accumulates the steps of one episode in the capture shape."""

    def __init__(
        self,
        world: World,
        task_idx: int,
        config: HarnessConfig,
        timings: Counter,
        verifiers: VerifierPool,
    ):
        self.world = world
        self.verifiers = verifiers
        self.task_idx = task_idx
        self.config = config
        self.timings = timings
        self.steps: list[dict[str, Any]] = []
        self.env_steps = 1  # OpenEnv counts the initial tools/list as a step in steps_taken.

    def _clip(self, observation: dict[str, Any], key: str, warnings: list[str]) -> None:
        text = observation[key]
        limit = self.config.max_result_chars
        if len(text) > limit:
            observation[key] = text[:limit]
            what = "tool result" if key == "tool_result" else "error text"
            warnings.append(f"{what} truncated to {limit} characters (was {len(text)})")

    def append(
        self, action: dict[str, Any], observation: dict[str, Any], warnings: list[str]
    ) -> None:
        if warnings:
            observation["warning"] = "; ".join(warnings)
        self.env_steps += 1
        self.steps.append({"action": action, "observation": observation})

    def call_tool(self, client: McpClient, name: str, arguments: dict[str, Any]) -> None:
        observation: dict[str, Any] = {"done": False, "metadata": {}}
        started = time.perf_counter()
        try:
            result = client.call_tool(name, arguments)
        except McpError as error:
            failed = "invalid_args" if error.code == _JSON_RPC_INVALID_PARAMS else "server_error"
            observation.update(reward_type=failed, tool_name=name, error=error.message)
        else:
            if result.is_error:
                reward_type = classify_tool_error(result.text)
                observation.update(reward_type=reward_type, tool_name=name, error=result.text)
            else:
                observation.update(
                    reward_type="tool_call_ok", tool_name=name, tool_result=result.text
                )
        finally:
            self.timings["tool_s"] += time.perf_counter() - started
        warnings: list[str] = []
        self._clip(observation, "error" if "error" in observation else "tool_result", warnings)
        self.append({"tool_name": name, "arguments": arguments}, observation, warnings)

    def reject(self, action: Any, reason: str) -> None:
        """Record a malformed action under a placeholder name, keeping its original form."""
        recorded = {"tool_name": INVALID_ACTION_TOOL, "arguments": {}, "raw": repr(action)[:2000]}
        observation = {
            "done": False,
            "metadata": {},
            "reward_type": "invalid_action",
            "error": f"Invalid action: {reason}",
        }
        self.append(recorded, observation, [])

    def verify(self, server: WorldServer, action: dict[str, Any], warnings: list[str]) -> str:
        final_answer = action.get("arguments", {}).get("final_answer")
        if final_answer is not None and not isinstance(final_answer, str):
            final_answer = json.dumps(final_answer)
        started = time.perf_counter()
        verify_result = self.verifiers.run(
            self.world.name,
            self.world.verifiers[self.task_idx],
            server.initial_db_path,
            server.snapshot(),
            final_answer=final_answer,
            limits=self.config.verifier_limits,
        )
        self.timings["verify_s"] += time.perf_counter() - started
        reward_type = _verify_reward_type(verify_result)
        observation = {
            "done": False,
            "metadata": {},
            "reward_type": reward_type,
            "scenario": self.world.name,
            "task": self.world.tasks[self.task_idx],
            "task_idx": self.task_idx,
            "verify_result": verify_result,
            "steps_taken": self.env_steps + 1,
        }
        self.append(action, observation, warnings)
        return reward_type


def run_episode(
    server: WorldServer,
    client: McpClient,
    world: World,
    task_idx: int,
    policy: Policy,
    config: HarnessConfig | None = None,
    timings: Counter | None = None,
    verifiers: VerifierPool | None = None,
) -> dict[str, Any]:
    """Reset the world, let `policy` act until it calls verify (or hits the step limit).

    Transport failures (mcp_client.WorldUnavailable) propagate: the episode is then unusable and
    the caller decides whether to restart the server and retry. `timings`, if given, gains the
    seconds spent in tool calls ("tool_s", the reset and tool listing included) and in the
    verifier ("verify_s"). Verifiers run in `verifiers`' warm workers (default: the process's
    shared pool), which answer as a cold `run_verifier` would.
    """
    config = config or HarnessConfig()
    timings = Counter() if timings is None else timings
    started = time.perf_counter()
    server.reset()
    tools = client.list_tools()
    timings["tool_s"] += time.perf_counter() - started
    episode = _Episode(world, task_idx, config, timings, verifiers or default_pool())
    tool_calls = 0
    while True:
        if tool_calls >= config.max_tool_calls:
            action = {"tool_name": VERIFY_TOOL, "arguments": {"verifier_mode": "code"}}
            limit_warning = f"step limit reached ({config.max_tool_calls} tool calls); verified"
            final_reward_type = episode.verify(server, action, [limit_warning])
            break
        action = policy.next_action(episode.steps)
        reason = _invalid_action_reason(action)
        if reason is not None:
            episode.reject(action, reason)
        elif action["tool_name"] == VERIFY_TOOL:
            final_reward_type = episode.verify(server, action, [])
            break
        else:
            episode.call_tool(client, action["tool_name"], action.get("arguments", {}))
        tool_calls += 1
    return {
        "scenario": world.name,
        "task": world.tasks[task_idx],
        "task_idx": task_idx,
        "tools": [tool["name"] for tool in tools],
        "steps": episode.steps,
        "reward": reward_for(final_reward_type),
        "tool_schemas": tools,
        "step_reward_types": [step["observation"]["reward_type"] for step in episode.steps],
    }
