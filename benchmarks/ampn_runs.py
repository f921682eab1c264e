"""Collect finished `robuq ampn run` folders (scripts/ampn_teacher.sh) into results/ampn/ and one table.

    python benchmarks/ampn_runs.py runs/ampn-b3 runs/ampn-b2     # → results/ampn.{json,md}, results/ampn/<run>/

For each run: the plan (bits per layer type beside the paper's DiT-XL/2 averages), the achieved averages,
the teacher probe (relative output MSE on a fixed training batch) through warm-up and final QAT, and the
wall time of each QAT stage from its log. The plan, its figure, the sensitivity table and both logs are
copied beside the table.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from common import ROOT, invocation, parse_config, write_result
from robuq.core.options import option
from robuq.ampn.plan_files import format_plan
from robuq.precision.plan import BitPlan


def probes(log: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return [(r["step"], r["probe_rel_mse"]) for r in records if "probe_rel_mse" in r]


def stage_seconds(log: Path) -> float:
    """Wall time from the log: the span of its records plus the first logging window."""
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    first = records[0]
    window = (
        first["step"]
        * json.loads((log.parent / "config.json").read_text())["global_batch_size"]
        / first["images_per_s"]
    )
    return records[-1]["time"] - first["time"] + window


def summarize(run: Path, out: Path) -> dict:
    plan = json.loads((run / "plan.json").read_text())
    target = out / run.name
    target.mkdir(parents=True, exist_ok=True)
    for name in ("plan.json", "plan.png", "sensitivity.json"):
        shutil.copy(run / name, target / name)
    for stage in ("warmup", "final"):
        shutil.copy(run / stage / "log.jsonl", target / f"{stage}-log.jsonl")
        shutil.copy(run / stage / "config.json", target / f"{stage}-config.json")
    warm, final = probes(run / "warmup" / "log.jsonl"), probes(run / "final" / "log.jsonl")
    return {
        "run": run.name,
        "budget": plan["budget"],
        "weighting": plan["weighting"],
        "average_plain": plan["average_plain"],
        "average_macs": plan["average_macs"],
        "role_averages": plan["role_averages"],
        "paper_role_averages_dit_xl2": plan.get("paper_role_averages_dit_xl2"),
        "start_bits_probe": warm,
        "plan_probe": final,
        "warmup_seconds": stage_seconds(run / "warmup" / "log.jsonl"),
        "final_seconds": stage_seconds(run / "final" / "log.jsonl"),
        "summary": format_plan(BitPlan.from_dict(plan)),
    }


@dataclass
class AMPNRunsConfig:
    """Options of this benchmark."""

    runs: str | None = option(None, "`robuq ampn run` output folders, comma-separated", positional=True)
    results_dir: str = option(str(ROOT / "results"), "where ampn.{json,md} and the runs' files go")


def main(argv: list[str] | None = None) -> None:
    config = parse_config(AMPNRunsConfig, argv, __doc__)
    out = Path(config.results_dir)
    rows = [summarize(Path(r), out / "ampn") for r in (config.runs or "").split(",") if r]
    roles = ("qkv", "proj", "fc1", "fc2")
    lines = [
        "| run | budget | achieved plain / MAC-weighted | "
        + " | ".join(roles)
        + " | probe after warm-up | probe after plan QAT | QAT minutes (warm-up + plan) |",
        "|---|---|---|" + "---|" * len(roles) + "---|---|---|",
    ]
    for r in rows:
        paper = r["paper_role_averages_dit_xl2"] or {}
        bits = " | ".join(f"{r['role_averages'][k]:.2f}" + (f" ({paper[k]:.2f})" if k in paper else "") for k in roles)
        lines.append(
            f"| [{r['run']}](ampn/{r['run']}/plan.png) | {r['budget']} | {r['average_plain']:.2f} / {r['average_macs']:.2f} | {bits} "
            f"| {r['start_bits_probe'][-1][1]:.4f} | {r['plan_probe'][-1][1]:.4f} "
            f"| {r['warmup_seconds'] / 60:.0f} + {r['final_seconds'] / 60:.0f} |"
        )
    lines += [
        "",
        "Bits per layer type are averages over the six blocks; in brackets the paper's DiT-XL/2 allocation at the "
        "same budget (docs/method.md §7). The probe is the relative output MSE against the teacher on a fixed batch of "
        "training images, at the end of each stage.",
    ]
    write_result("ampn", {"runs": rows}, "\n".join(lines), out, invocation(__file__, argv))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
