"""Capture behaviour-policy episodes from AWM worlds (logic in echo_jax.awm.capture).

    python -m experiments.capture --worlds=data/awm_worlds --episodes_per_task=4 --seed=0 \
        --out=runs/capture0 [--scenarios=a,b] [--workers=2]

In a folder without scripted-policy parameters (e.g. a downloaded AgentWorldModel-1K copy) a
trained agent acts instead: --policy=agent --checkpoint=RUN_DIR [--temperature --top_p
--max_new_tokens]; its steps carry the generated tokens and log-probs under "policy".
"""

import shlex
import sys

from absl import app, flags, logging

from echo_jax import config as C
from echo_jax.awm import sandbox
from echo_jax.awm.capture import POLICIES, CaptureConfig, CaptureError, run_capture, write_manifest
from echo_jax.awm.harness import HarnessConfig
from echo_jax.awm.replay import check_corpus
from echo_jax.awm.world_format import WorldFormatError, load_worlds
from echo_jax.data import corpus
from echo_jax.util import stop_signals

_WORLDS = flags.DEFINE_string("worlds", None, "AWM-format world folder.", required=True)
_EPISODES = flags.DEFINE_integer("episodes_per_task", 1, "Episodes per (scenario, task).")
_SEED = flags.DEFINE_integer("seed", 0, "Root seed; episode seeds derive from it.")
_OUT = flags.DEFINE_string(
    "out", None, "Output folder (episodes/ and manifest.json).", required=True
)
_SCENARIOS = flags.DEFINE_list("scenarios", None, "Only these scenarios (default: all).")
_WORKERS = flags.DEFINE_integer("workers", 2, "Worker processes, one world server each.")
_MAX_TOOL_CALLS = flags.DEFINE_integer("max_tool_calls", 30, "Step limit before a forced verify.")
_REPLAY = flags.DEFINE_bool(
    "replay_check", True, "Replay every episode against a fresh world and record the result."
)
_POLICY_MODULE = flags.DEFINE_string(
    "policy_module", "echo_jax.awm.policies", "Module providing the scripted policies."
)
_POLICY = flags.DEFINE_enum(
    "policy", "scripted", POLICIES, "scripted (--policy_module) or agent (--checkpoint's model)."
)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Training run whose agent acts (agent).")
_A = C.AgentConfig()
_TEMPERATURE = flags.DEFINE_float("temperature", _A.temperature, "Agent sampling temperature.")
_TOP_P = flags.DEFINE_float("top_p", _A.top_p, "Agent nucleus sampling mass.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", _A.max_new_tokens, "Agent tokens per call.")


def main(argv: list[str]) -> None:
    stop_signals.stop_on_signals()  # SIGTERM cleans up as Ctrl-C does.
    try:
        sandbox.require_sandbox("world code")  # Before any work: bubblewrap, or the opt-in.
        _main(argv)
    except (WorldFormatError, CaptureError, sandbox.SandboxUnavailable) as e:  # Input, machine.
        raise SystemExit(f"error: {e}") from None


def _main(argv: list[str]) -> None:
    del argv
    config = CaptureConfig(
        worlds_dir=_WORLDS.value,
        out_dir=_OUT.value,
        episodes_per_task=_EPISODES.value,
        seed=_SEED.value,
        scenarios=tuple(_SCENARIOS.value) if _SCENARIOS.value else None,
        workers=_WORKERS.value,
        policy_module=_POLICY_MODULE.value,
        harness=HarnessConfig(max_tool_calls=_MAX_TOOL_CALLS.value),
        policy=_POLICY.value,
        checkpoint=_CHECKPOINT.value,
        agent=C.AgentConfig(
            temperature=_TEMPERATURE.value,
            top_p=_TOP_P.value,
            max_new_tokens=_MAX_NEW.value,
            max_steps=_MAX_TOOL_CALLS.value,
        ),
        command=shlex.join([sys.executable, "-m", "experiments.capture", *sys.argv[1:]]),
    )
    agent_episodes = None
    if config.policy == "agent":
        from echo_jax.agent.capture import capture_agent_scenario as agent_episodes
    manifest = run_capture(config, agent_episodes)
    worlds = load_worlds(config.worlds_dir, config.scenarios)
    manifest["splits"] = corpus.assign_splits(
        {name: len(world.tasks) for name, world in worlds.items()}, seed=config.seed
    )
    manifest.update(corpus.describe(config.out_dir, manifest["splits"]))
    if _REPLAY.value:
        manifest["replay"] = check_corpus(
            config.worlds_dir,
            corpus.shard_files(config.out_dir),
            workers=config.workers,
            config=config.harness,
        )
        logging.info(
            "replay: %d of %d episodes reproduced",
            manifest["replay"]["reproduced"],
            manifest["replay"]["replayed"],
        )
    write_manifest(config.out_dir, manifest)
    logging.info(
        "%d episodes, success rate %.3f, %.2f episodes/s; failed scenarios: %s",
        manifest["n_episodes"],
        manifest["success_rate"],
        manifest["episodes_per_s"],
        sorted(manifest["failed_scenarios"]) or "none",
    )
    if manifest["failed_scenarios"] or manifest["failed_episodes"]:
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
