"""The main job: quantize the shipped teacher to W1.58 with RobuQ + AMPN, train it briefly, show the result.

    robuq run            # ≈ 10 minutes on a 2-core CPU; everything lands in runs/quickstart/

Writes the teacher's and the quantized model's sample grids (same noise, same labels), a side-by-side
figure, and a one-screen summary: the bit plan by layer type, size and bit-operations against full
precision, the error against the teacher, and the PSNR between the two models' samples.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from robuq.ampn.pipeline import SET_BY_AMPN, AMPNConfig, ampn_run
from robuq.ampn.plan_files import format_plan
from robuq.precision.cost import cost_summary
from robuq.eval.metrics import psnr
from robuq.core.files import atomic_write_text
from robuq.core.options import option
from robuq.models.checkpoint import load_dit
from robuq.io.quantized import load_quantized
from robuq.core.runtime import default_teacher_path
from robuq.sample.generate import generate, row_names, save_comparison, save_grid, to_uint8
from robuq.precision.plan import BitPlan
from robuq.train.qat import QATConfig


def _quickstart_ampn() -> AMPNConfig:
    """AMPN at a 3-bit budget in one short QAT schedule: minutes on a laptop CPU."""
    qat = QATConfig(
        steps=300, global_batch_size=32, lr=2e-4, warmup_steps=37, probe_every=50, log_every=10, ckpt_every=50
    )
    return AMPNConfig(qat=qat, budget=3.0, warmup_qat_steps=150, calibration_images=64)


@dataclass
class QuickstartConfig:
    """``robuq run``: AMPN on a teacher (QAT, sensitivities, allocation, QAT), then both models' samples."""

    out_dir: str = option("runs/quickstart", "output folder: the AMPN run under ampn/, grids, summary.txt/json")
    ampn: AMPNConfig = option(help="the AMPN run", factory=_quickstart_ampn)
    per_class: int = option(4, "samples per class in each grid")
    sample_steps: int = option(50, "sampling steps for the grids")
    sampler: str = option("ddim", "sampler for the grids", choices=("ddpm", "ddim"))
    cfg_scale: float = option(1.5, "classifier-free guidance scale for the grids (1: none)")


# The AMPN run lives under the quickstart's own folder: its out_dir is derived, not an option.
DERIVED = ("ampn.qat.out_dir", *(f"ampn.{name}" for name in SET_BY_AMPN))


def run_quickstart(config: QuickstartConfig, progress: bool = True) -> dict:
    """Run the main job and write its grids and summary under ``config.out_dir``; returns the summary."""
    out = Path(config.out_dir)
    qat = config.ampn.qat
    teacher_path = str(qat.teacher or default_teacher_path())
    ampn = replace(config.ampn, qat=replace(qat, teacher=teacher_path, out_dir=str(out / "ampn")))
    final = ampn_run(ampn, progress=progress, announce_plan=False)  # the summary below shows the plan

    teacher = load_dit(teacher_path)
    student, _ = load_quantized(final / "model.safetensors")
    labels = torch.arange(teacher.num_classes).repeat_interleave(config.per_class) if teacher.num_classes else None
    n = len(labels) if labels is not None else 8 * config.per_class
    columns = config.per_class if labels is not None else 8
    grids, pixels = {}, {}
    for name, model in (("teacher", teacher), ("quantized", student)):
        images = generate(
            model, labels, n, config.sampler, config.sample_steps, config.cfg_scale, qat.seed, progress=progress
        )
        pixels[name] = to_uint8(images)
        grids[name] = save_grid(pixels[name], out / f"{name}_grid.png", columns, row_labels=row_names(teacher))
    compare = save_comparison(
        {"teacher (full precision)": pixels["teacher"], "W1.58, AMPN activation bits": pixels["quantized"]},
        out / "compare.png",
        columns,
        f"{qat.preset} W1.58, AMPN at a {ampn.budget:g}-bit budget, {qat.steps} QAT steps: "
        f"same noise and labels, a row per class",
        row_labels=row_names(teacher),
    )

    plan = BitPlan.load(out / "ampn" / "plan.json")
    cost_q, cost_fp = cost_summary(student), cost_summary(teacher)
    log = [json.loads(line) for line in (final / "log.jsonl").read_text().splitlines()]
    probes = [r["probe_rel_mse"] for r in log if "probe_rel_mse" in r]
    summary = {
        "teacher": teacher_path,
        "preset": qat.preset,
        "budget": ampn.budget,
        "plan_role_averages": plan.role_averages,
        "average_bits_plain": plan.average_plain,
        "average_bits_macs": plan.average_macs,
        "weight_mib": cost_q.weight_storage_bits / 8 / 2**20,
        "fp32_weight_mib": cost_fp.weight_storage_bits / 8 / 2**20,
        "bops_reduction": cost_q.to_dict()["bops_reduction"],
        "probe_rel_mse_first": probes[0] if probes else None,
        "probe_rel_mse_last": probes[-1] if probes else None,
        "psnr_vs_teacher_db": psnr(pixels["quantized"], pixels["teacher"]),
        "grids": {k: str(v) for k, v in grids.items()},
        "compare": str(compare),
        "config": asdict(config),
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    text = format_summary(summary, plan)
    atomic_write_text(out / "summary.txt", text + "\n")
    print(text)
    return summary


def format_summary(summary: dict, plan: BitPlan) -> str:
    probe = (
        f"{summary['probe_rel_mse_first']:.4f} → {summary['probe_rel_mse_last']:.4f}"
        if summary["probe_rel_mse_first"] is not None
        else "n/a"
    )
    return "\n".join(
        [
            f"robuq: {summary['preset']} W1.58, AMPN activation bits at a {summary['budget']:g}-bit budget, from {summary['teacher']}",
            format_plan(plan),
            f"weights: {summary['weight_mib']:.2f} MiB vs {summary['fp32_weight_mib']:.2f} MiB in fp32; "
            f"{summary['bops_reduction']:.1f}× fewer bit-operations than fp32",
            f"output error vs teacher (relative MSE, fixed batch) during the final QAT: {probe}",
            f"samples from the same noise: PSNR vs teacher {summary['psnr_vs_teacher_db']:.1f} dB",
            f"grids: {summary['grids']['teacher']} (teacher), {summary['grids']['quantized']} (quantized); side by side: {summary['compare']}",
        ]
    )
