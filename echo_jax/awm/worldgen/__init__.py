"""Deterministic generator of local AWM worlds in the AgentWorldModel-1K file format.

`generate_world(seed)` returns every file's records; `write_world` puts them on disk atomically.
The same seed always yields byte-identical files: every scenario draws from its own numpy
Generator seeded by (seed, domain, index), so adding scenarios never reshuffles existing ones.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from . import clinic, ecommerce, library
from .common import (
    ScenarioData,
    api_spec_from_code,
    insert_statement,
    normalize_name,
    replace_dir,
    server_code,
    verifier_code,
    write_jsonl,
)

DOMAINS: tuple[ModuleType, ...] = (ecommerce, clinic, library)
FIRST_INDEX = 101
MAX_DRAWS = 20
TASK_PARAMS_FILE = "echo_task_params.jsonl"
FILES = (
    "gen_scenario.jsonl",
    "gen_tasks.jsonl",
    "gen_db.jsonl",
    "gen_sample.jsonl",
    "gen_spec.jsonl",
    "gen_envs.jsonl",
    "gen_verifier.pure_code.jsonl",
    TASK_PARAMS_FILE,
)


def _draw_scenario(domain: ModuleType, domain_idx: int, index: int, seed: int) -> ScenarioData:
    """Redraw until the data supports every task template (rare; still deterministic)."""
    name = normalize_name(f"{domain.PREFIX}_{index}")
    for attempt in range(MAX_DRAWS):
        rng = np.random.default_rng([seed, domain_idx, index, attempt])
        try:
            return domain.build(name, rng)
        except ValueError:
            continue
    raise RuntimeError(f"could not draw a usable scenario for {name}")


def _scenario_records(domain: ModuleType, data: ScenarioData, code: str, spec: dict) -> dict:
    name = data.name
    verifiers = [
        {
            "scenario": name,
            "task_idx": idx,
            "task": task.text,
            "verification": {
                "code": verifier_code(
                    domain.VERIFIERS[domain.TEMPLATE_VERIFIER[task.template]], task.expected
                )
            },
        }
        for idx, task in enumerate(data.tasks)
    ]
    return {
        "gen_scenario.jsonl": [{"name": name, "description": data.description}],
        "gen_tasks.jsonl": [{"scenario": name, "tasks": [t.text for t in data.tasks]}],
        "gen_db.jsonl": [
            {
                "scenario": name,
                "db_schema": {
                    "tables": [
                        {"name": t.name, "ddl": t.ddl, "indexes": list(t.indexes)}
                        for t in domain.TABLES
                    ]
                },
            }
        ],
        "gen_sample.jsonl": [
            {
                "scenario": name,
                "sample_data": {
                    "tables": [
                        {
                            "table_name": t.name,
                            "insert_statements": [
                                insert_statement(t.name, row) for row in data.rows[t.name]
                            ],
                        }
                        for t in domain.TABLES
                        if data.rows.get(t.name)
                    ]
                },
            }
        ],
        "gen_spec.jsonl": [{"scenario": name, "api_spec": spec}],
        "gen_envs.jsonl": [{"scenario": name, "full_code": code}],
        "gen_verifier.pure_code.jsonl": verifiers,
        TASK_PARAMS_FILE: [
            {"scenario": name, "task_idx": idx, "template": t.template, "params": t.params}
            for idx, t in enumerate(data.tasks)
        ],
    }


def generate_world(
    seed: int = 0, scenarios_per_domain: int = 12
) -> dict[str, list[dict[str, Any]]]:
    """Records of every world file, scenarios ordered by domain then index."""
    files: dict[str, list[dict[str, Any]]] = {f: [] for f in FILES}
    for domain_idx, domain in enumerate(DOMAINS):
        code = server_code(domain.SERVER_FILE)
        spec = api_spec_from_code(code)
        for index in range(FIRST_INDEX, FIRST_INDEX + scenarios_per_domain):
            data = _draw_scenario(domain, domain_idx, index, seed)
            for file_name, records in _scenario_records(domain, data, code, spec).items():
                files[file_name].extend(records)
    return files


def write_world(out_dir: str | Path, seed: int = 0, scenarios_per_domain: int = 12) -> Path:
    """Write the world folder via a sibling temp folder swapped in at the end."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    files = generate_world(seed, scenarios_per_domain)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    for file_name, records in files.items():
        write_jsonl(tmp_dir / file_name, records)
    tmp_dir.chmod(0o755)
    replace_dir(tmp_dir, out_dir)
    return out_dir
