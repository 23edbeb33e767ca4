"""The performance table: each benchmark's latest JSON line per configuration, against its target.

python -m benchmarks.report               # the table on stdout and into docs/performance.md
python -m benchmarks.report --print_only  # on stdout only

A row is the newest line in benchmarks/results/<name>.jsonl for that configuration on that
machine (processor and core count: a run on another machine gets a row of its own). "met" says
whether it reaches the issue's target; a line run with a tuning variable set (common.PERF_ENV,
shown in the machine column) is a comparison, since the targets are for the defaults.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any

RESULTS = os.path.join(os.path.dirname(__file__), "results")
PAGE = os.path.join(os.path.dirname(__file__), "..", "docs", "performance.md")
SECTION = "performance"  # The page's markers: <!-- performance:begin ... --> ... :end -->

Row = tuple[str, str, str, bool | None]  # (configuration, figure, target, met)


def _echo_loss(r: dict[str, Any]) -> Row:
    c = r["config"]
    figure = f"{r['speedup']:.2f}x faster, peak memory {r['memory_ratio']:.2f} of PyTorch's"
    met = r["speedup"] >= 2.5 and r["memory_ratio"] <= 0.5
    return f"(B,T,V)=({c['B']},{c['T']},{c['V']})", figure, ">= 2.5x, <= 0.5 memory", met


def _cpu_step_row(c: dict[str, Any], config: str, figure: str, target: str, met: bool) -> Row:
    """A CPU train-step row. Lines from before "loss_impl" was recorded all timed the plain
    loss, no longer what experiments.train runs on a CPU: they are shown as comparisons."""
    impl = c.get("loss_impl", "plain")
    config = f"{config}, {impl} loss"
    return (
        (config, figure, "(comparison)", None) if impl == "plain" else (config, figure, target, met)
    )


def _train_step(r: dict[str, Any]) -> Row:
    res, c = r["results"], r["config"]
    ratio = res["torch"]["median_s"] / res["jax"]["median_s"]
    params = res["jax"]["params"] / 1e6
    figure = f"{ratio:.2f}x PyTorch's tokens/s"
    if "speedup_vs_torch_skip" in r:
        figure += f" ({r['speedup_vs_torch_skip']:.2f}x PyTorch skipping the same targets)"
    if "speedup_one_step_per_call" in r:  # Lines from before TrainConfig.steps_per_call: 1.
        calls = f"{c['steps_per_call']} steps per call"
        figure += f"; {calls}, {r['speedup_one_step_per_call']:.2f}x at one"
    return _cpu_step_row(
        c, f"{c['preset']} ({params:.1f}M params)", figure, ">= 1.5x", ratio >= 1.5
    )


def _overhead(r: dict[str, Any]) -> Row:
    c = r["config"]
    figure = f"echo {r['overhead'] * 100:+.1f}% time per step vs grpo"
    config = f"{c['preset']}, B={c['B']}, T={c['T']}"
    return _cpu_step_row(c, config, figure, "<= +3%", r["overhead"] <= 0.03)


def _data(r: dict[str, Any]) -> Row:
    eps = r["episodes_per_s"]
    figure = f"{eps['cold']:,.0f} episodes/s cold, {eps['cached']:,.0f} cached"
    return f"{r['episodes']} episodes -> {r['rows']} rows", figure, "(measured)", None


def _fused(r: dict[str, Any]) -> Row:
    c = r["config"]
    figure = f"memory {r['memory_ratio']:.2f} of plain, time {r['time_ratio']:.2f}x"
    config = f"{c['tokens']:,} tokens, V={c['V']:,}, d={c['d']}"
    if c["tokens"] != 16_384:  # The target is set at B·T = 16,384; other sizes are looks.
        return config, figure, "(not the target size)", None
    return config, figure, "<= 0.25, <= 1.3x", r["memory_ratio"] <= 0.25 and r["time_ratio"] <= 1.3


def _gpu(r: dict[str, Any]) -> Row:
    c, res = r["config"], r["result"]
    config = (
        f"{c['preset']}, B={c['B']}, T={c['T']}, V={c['V']:,}, {c['loss_impl']} loss, "
        f"{c['attention_resolved']} attention, {c['device_kind']}"
    )
    figure = f"MFU {res['mfu'] * 100:.1f}%, {res['tokens_per_s']:,.0f} tokens/s"
    reference = c["V"] == 8192 and c["loss_impl"] == "plain" and c["attention_resolved"] == "cudnn"
    if not reference:  # The target is for the ~100M config; these are comparisons.
        return config, figure, "(comparison)", None
    return config, figure, ">= 40% MFU", res["mfu"] >= 0.40


BENCHMARKS: dict[str, tuple[str, Callable[[dict[str, Any]], Row]]] = {
    "echo_loss_vs_torch": ("echo_loss fwd+bwd vs PyTorch (CPU)", _echo_loss),
    "train_step_vs_torch": ("train step vs PyTorch (CPU)", _train_step),
    "echo_overhead": ("ECHO overhead (CPU)", _overhead),
    "data_throughput": ("data pipeline (CPU)", _data),
    "fused_loss_memory": ("chunked vs plain loss head (CPU)", _fused),
    "gpu_throughput": ("GPU train step", _gpu),
}


def latest_rows() -> list[tuple[str, Row, dict[str, Any]]]:
    out = []
    for name, (title, row_of) in BENCHMARKS.items():
        path = os.path.join(RESULTS, f"{name}.jsonl")
        if not os.path.exists(path):
            continue
        latest: dict[tuple[str, str, int, str], tuple[Row, dict[str, Any]]] = {}
        with open(path) as f:
            for line in f:
                record = json.loads(line)
                row = row_of(record)
                m, env = record["machine"], _env(record)
                if env and row[2] != "(comparison)":
                    row = (row[0], row[1], "(comparison)", None)
                # Later lines replace earlier ones of the same configuration and machine.
                latest[(row[0], m["cpu"], m["cores"], env)] = (row, record)
        out += [(title, row, record) for row, record in latest.values()]
    return out


def _env(record: dict[str, Any]) -> str:
    """The tuning variables the line was run with (older lines recorded none)."""
    return " ".join(f"{k}={v}" for k, v in sorted(record["machine"].get("env", {}).items()))


def machine(record: dict[str, Any]) -> str:
    m = record["machine"]
    where = m["cpu"] + f", {m['cores']} cores"
    if "device_kind" in record.get("config", {}):
        where = record["config"]["device_kind"]
    env = _env(record)
    where += f"; {env}" if env else ""
    return f"{where}; JAX {m['jax']}; load {m['load_avg_1m']}; {m['date'][:10]}; {m['git_commit']}"


def markdown() -> str:
    lines = [
        "| benchmark | configuration | latest result | target | met | machine |",
        "|---|---|---|---|---|---|",
    ]
    for title, (config, figure, target, met), record in latest_rows():
        flag = "n/a" if met is None else ("yes" if met else "**no**")
        lines.append(f"| {title} | {config} | {figure} | {target} | {flag} | {machine(record)} |")
    return "\n".join(lines)


def write_page(table: str, page: str = PAGE) -> bool:
    """The table into the page's performance section; False when the page has no markers."""
    from echo_jax.reports.generated_sections import splice_section

    return splice_section(page, table, SECTION)


if __name__ == "__main__":
    table = markdown()
    print(table)
    if "--print_only" not in sys.argv[1:]:
        done = write_page(table)
        print(f"{os.path.relpath(PAGE)} updated" if done else f"no {SECTION} markers in {PAGE}")
