"""The λ ablation: one training run per (objective, λ, seed), resumable, then one results table.

Every arm shares the base config (data, steps, model, eval sets); only the objective, λ and the
seed differ. Each run has its own workdir, `<root>/<arm>_seed<s>`:

  summary.json present, same config   finished: skipped
  config.json present, no summary     interrupted: resumed from its last checkpoint
  a different config.json             refused (SweepError), never overwritten
  nothing                             started

After training, an optional closed-loop hook (`ClosedLoopFn`) fills pass@1 / pass@k; its answer
is kept in the workdir (closed_loop.json) so it is computed once per run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from echo_jax.config import EVAL_SPLITS, AgentConfig, Config, validate
from echo_jax.objective.objectives import objective_spec
from echo_jax.train import evaluation
from echo_jax.train.run_dir import RunDir, config_diff, flatten
from echo_jax.train.trainer import TrainingDiverged, run_experiment
from echo_jax.util.atomic import atomic_write_text
from echo_jax.util.jsonl import read_jsonl
from echo_jax.util.provenance import git_commit

SUMMARY = "summary.json"
SWEEP_RECORD = "sweep_run.json"  # Wall time over every attempt, and the commit that ran it.
CLOSED_LOOP = "closed_loop.json"  # The closed-loop hook's answer: {"pass@1", "pass@k", "k"}.
# Further results columns read from it: column -> closed_loop.evaluate_checkpoint's metric.
CLOSED_LOOP_COLUMNS = {
    "tool_call_acc": "teacher_forced_call_acc",
    "tool_name_acc": "teacher_forced_tool_name_acc",
    "format_error_share": "format_error_share",
    "closed_loop_steps": "mean_steps",
}
DIVERGED = "diverged.json"


class SweepError(RuntimeError):
    """A workdir of the grid holds a different run."""


@dataclasses.dataclass(frozen=True)
class Arm:
    objective: str
    lam: float  # λ; 0.0 unless the objective uses λ (as experiments.train sets it).

    @property
    def name(self) -> str:
        return f"{self.objective}_lam{self.lam:g}" if self._uses_lam else self.objective

    @property
    def label(self) -> str:
        return f"{self.objective} λ={self.lam:g}" if self._uses_lam else self.objective

    @property
    def _uses_lam(self) -> bool:
        return objective_spec(self.objective).uses_lam


@dataclasses.dataclass(frozen=True)
class RunSpec:
    arm: Arm
    seed: int
    cfg: Config
    workdir: str

    @property
    def name(self) -> str:
        return f"{self.arm.name}_seed{self.seed}"


# (spec) -> {"pass@1": float, "pass@k": float, "k": int}; called once per finished run.
ClosedLoopFn = Callable[[RunSpec], dict[str, float]]
# (spec, resume, log) -> None: trains spec.cfg in spec.workdir (run_experiment by default).
Runner = Callable[[RunSpec, bool, Callable[[str], None]], Any]


def arms(objectives: Sequence[str], lams: Sequence[float]) -> list[Arm]:
    """Every objective once, except those λ scales (echo), which get one arm per λ; the
    objectives are registered ones (echo_jax.objective.objectives), an unknown name a
    ConfigError."""
    out: list[Arm] = []
    for objective in objectives:
        if objective_spec(objective).uses_lam:
            out += [Arm(objective, float(lam)) for lam in lams]
        else:
            out.append(Arm(objective, 0.0))
    return out


def grid(base: Config, arm_list: Sequence[Arm], seeds: Sequence[int], root: str) -> list[RunSpec]:
    """One validated run per (arm, seed): the base config with objective, λ and seed replaced."""
    specs = []
    for arm in arm_list:
        for seed in seeds:
            cfg = dataclasses.replace(
                base,
                loss=dataclasses.replace(base.loss, objective=arm.objective, lam=arm.lam),
                train=dataclasses.replace(base.train, seed=int(seed)),
            )
            spec = RunSpec(arm, int(seed), validate(cfg), "")
            specs.append(dataclasses.replace(spec, workdir=os.path.join(root, spec.name)))
    return specs


def status(spec: RunSpec) -> str:
    """'done', 'partial', 'diverged' or 'new'; SweepError if the workdir holds another config."""
    run = RunDir(spec.workdir)
    config_path = run.file(RunDir.CONFIG)
    if not os.path.exists(config_path):
        return "new"
    with open(config_path) as f:
        saved = flatten(json.load(f))
    wanted = flatten(json.loads(spec.cfg.to_json()))
    diff = config_diff(saved, wanted)
    if diff:
        raise SweepError(
            f"{spec.workdir} holds a run with a different config ({', '.join(diff)}); move it "
            "away or choose another --root"
        )
    if os.path.exists(run.file(DIVERGED)):
        return "diverged"
    return "done" if os.path.exists(run.file(SUMMARY)) else "partial"


def default_runner(spec: RunSpec, resume: bool, log: Callable[[str], None]) -> Any:
    return run_experiment(spec.cfg, spec.workdir, resume=resume, log=log)


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _write_json(path: str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True))


def run_sweep(
    specs: Sequence[RunSpec],
    *,
    runner: Runner = default_runner,
    closed_loop: ClosedLoopFn | None = None,
    log: Callable[[str], None] = print,
    after_each: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
    """Brings every run of the grid to its last step (skipping finished ones), fills the
    closed-loop columns where a hook is given, and returns one results row per run.

    `after_each(rows)` sees the rows of the whole grid after every run (e.g. to keep a CSV
    current while a long sweep is under way)."""
    for spec in specs:  # Refuse a conflicting workdir before any training starts.
        status(spec)
    commit = git_commit()
    walls: list[float] = []
    for i, spec in enumerate(specs):
        state = status(spec)
        prefix = f"[{i + 1}/{len(specs)}] {spec.name}"
        if state in ("done", "diverged"):
            log(f"{prefix}: {state}, skipped")
        else:
            log(f"{prefix}: {'resuming' if state == 'partial' else 'starting'} in {spec.workdir}")
            record_path = os.path.join(spec.workdir, SWEEP_RECORD)
            t0 = time.perf_counter()
            try:
                runner(spec, state == "partial", lambda m, p=prefix: log(f"{p}: {m}"))
            except TrainingDiverged as e:
                log(f"{prefix}: diverged: {e}")
                _write_json(os.path.join(spec.workdir, DIVERGED), {"error": str(e)})
            walls.append(time.perf_counter() - t0)
            left = sum(status(s) in ("new", "partial") for s in specs[i + 1 :])
            log(
                f"{prefix}: {walls[-1]:.0f}s; {left} runs left, about "
                f"{left * sum(walls) / len(walls) / 60:.0f} min at the mean pace so far"
            )
            record = _read_json(record_path)
            _write_json(
                record_path,
                {
                    "wall_s": record.get("wall_s", 0.0) + time.perf_counter() - t0,
                    "attempts": record.get("attempts", 0) + 1,
                    "git_commit": commit,
                },
            )
        cl_path = os.path.join(spec.workdir, CLOSED_LOOP)
        if closed_loop is not None and status(spec) == "done" and not os.path.exists(cl_path):
            log(f"{prefix}: closed-loop evaluation")
            _write_json(cl_path, dict(closed_loop(spec)))
        if after_each is not None:
            after_each([collect_row(s) for s in specs])
    return [collect_row(spec) for spec in specs]


def collect_row(spec: RunSpec) -> dict[str, Any]:
    """The results row of one run, read back from its workdir (empty metrics if not run)."""
    run = RunDir(spec.workdir)
    row: dict[str, Any] = {
        "arm": spec.arm.name,
        "objective": spec.arm.objective,
        "lam": spec.arm.lam,
        "seed": spec.seed,
        "steps": spec.cfg.train.steps,
    }
    try:
        row["status"] = status(spec)
    except SweepError:
        row["status"] = "conflict"
    metrics = run.read_metrics()
    final = metrics[-1] if metrics else {}
    row["trained_steps"] = final.get("step", 0)
    for key in ("loss", "env_ce", "action_ce"):
        row[f"final_train_{key}"] = final.get(key)
    lines = read_jsonl(run.file(evaluation.EVAL_FILE))
    last = lines[-1] if lines else {}
    row["eval_step"] = last.get("step")
    for split in EVAL_SPLITS:
        for metric in evaluation.METRICS:
            row[f"{split}/{metric}"] = last.get(f"{split}/{metric}")
    cl = _read_json(run.file(CLOSED_LOOP))
    row["pass@1"], row["pass@k"], row["k"] = cl.get("pass@1"), cl.get("pass@k"), cl.get("k")
    for column, key in CLOSED_LOOP_COLUMNS.items():
        row[column] = cl.get(key)
    record = _read_json(run.file(SWEEP_RECORD))
    row["wall_s"] = record.get("wall_s")
    row["git_commit"] = record.get("git_commit", "")
    row["workdir"] = spec.workdir
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}


def agent_closed_loop(
    split: str = "heldout_tasks",
    samples: int = 4,
    max_tasks: int | None = None,
    worlds: str = "data/awm_worlds",
    agent: AgentConfig | None = None,
    tool_call_positions: int = 64,
) -> ClosedLoopFn:
    """The closed-loop hook backed by `echo_jax.agent.closed_loop.evaluate_checkpoint`: the run's
    last     checkpoint acts in the local AWM worlds on the tasks of `split` of the run's corpus.

    pass@1 is the greedy episode's success rate, pass@k the unbiased pass@K over K=`samples`
    sampled episodes per task; the evaluator's whole metrics dict is kept in closed_loop.json.
    """

    def hook(spec: RunSpec) -> dict[str, Any]:
        from echo_jax.agent.closed_loop import evaluate_checkpoint
        from echo_jax.data import corpus

        corpora = [p for p in spec.cfg.data.paths if corpus.is_corpus(p)]
        metrics = evaluate_checkpoint(
            spec.workdir,
            split,
            samples,
            worlds=worlds,
            corpus_dir=corpora[0] if corpora else None,
            agent=agent,
            max_tasks=max_tasks,
            tool_call_positions=tool_call_positions,
        )
        return {
            **metrics,
            "pass@1": metrics.get("pass@1_greedy"),
            "pass@k": metrics.get(f"pass@{samples}"),
            "k": samples,
        }

    return hook


def write_meta(path: str, command: str, specs: Sequence[RunSpec]) -> None:
    """The command and grid behind the results, read back by --report_only."""
    meta = {
        "command": command,
        "git_commit": git_commit(),
        "runs": [s.name for s in specs],
        "base_config": json.loads(specs[0].cfg.to_json()) if specs else None,
    }
    _write_json(path, meta)
