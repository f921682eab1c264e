"""`robuq ampn run`: warm-up QAT at uniform bits → sensitivities → exact allocation → QAT with the plan.

Each stage writes its result into the run folder and is skipped when that result already exists, so
an interrupted run picks up where it stopped (QAT stages also resume from their own checkpoints).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

from torch.utils.data import Dataset

from robuq.ampn.plan import format_plan, plan_from_sensitivity, write_plan
from robuq.ampn.sensitivity import Sensitivity, measure_sensitivity
from robuq.core.files import atomic_write_text
from robuq.core.options import check_choice, option, with_default
from robuq.core.runtime import default_teacher_path, resolve_device
from robuq.io.quantized import load_quantized
from robuq.models.checkpoint import load_dit
from robuq.quantize.plan import BitPlan
from robuq.train.calibration import calibration_batch
from robuq.train.qat import QATConfig, calibration_images, qat, teacher_dataset
from robuq.train.state import list_checkpoints


@dataclass
class AMPNConfig:
    """``robuq ampn run``: the QAT runs' options (``qat``; the warm-up takes its bits from here, the
    final run its plan) and how bits are allocated."""

    qat: QATConfig = option(help="the two QAT runs' options", factory=lambda: QATConfig(out_dir="runs/ampn"))
    budget: float = option(3.0, "average activation bits the plan may spend (the paper: 2 or 3)")
    weighting: str = option("plain", "average over layers (plain) or weighted by each layer's MACs (macs)",
                            choices=("plain", "macs"))
    warmup_qat_steps: int = option(1000, "QAT steps at uniform bits before sensitivities are measured")
    start_bits: int | None = option(None, "uniform activation bits of the warm-up run (default: the budget rounded up)")
    calibration_images: int = option(64, "training images in the fixed batch sensitivities are measured on")

    def resolved_start_bits(self) -> int:
        return self.start_bits if self.start_bits is not None else min(4, math.ceil(self.budget))


# The QAT options AMPN sets itself (the warm-up's uniform bits, the final run's plan and initial weights).
SET_BY_AMPN = ("qat.plan", "qat.init_student", "qat.act_bits", "qat.quant_config")


@dataclass
class SensitivityConfig:
    """``robuq ampn sensitivity``: one quantized model's per-layer sensitivities."""

    model: str | None = option(None, "quantized model file (e.g. after ~1,000 QAT steps)")
    teacher: str | None = option(None, "full-precision teacher (default: the shipped teacher)")
    data: str = with_default(QATConfig, "data", "fashion-mnist")
    data_dir: str | None = with_default(QATConfig, "data_dir", None)
    latents: str | None = with_default(QATConfig, "latents", None)
    calibration_images: int = with_default(AMPNConfig, "calibration_images", 64)
    seed: int = option(0, "seed of the calibration batch's noise")
    device: str = with_default(QATConfig, "device", "auto")
    out: str = option("sensitivity.json", "where to write the sensitivities (JSON)")


@dataclass
class AllocateConfig:
    """``robuq ampn allocate``: the exact (dynamic-programming) allocation of per-layer bits."""

    sensitivity: str | None = option(None, "JSON from `robuq ampn sensitivity`")
    budget: float = with_default(AMPNConfig, "budget", 3.0)
    weighting: str = with_default(AMPNConfig, "weighting", "plain")
    out: str = option("plan.json", "plan JSON; its figure goes beside it as .png")


def sensitivity_of(config: SensitivityConfig, progress: bool = True, dataset: Dataset | None = None) -> Sensitivity:
    """Sensitivities of a quantized model file against its teacher on a fixed calibration batch drawn from
    ``dataset`` (default: --latents or --data)."""
    if not config.model:
        raise ValueError("give the quantized model whose sensitivities to measure: --model FILE")
    device = resolve_device(config.device)
    model, _ = load_quantized(config.model, map_location=str(device))
    teacher = load_dit(config.teacher or default_teacher_path(), map_location=str(device)).eval()
    dataset = teacher_dataset(QATConfig(data=config.data, data_dir=config.data_dir, latents=config.latents,
                                        teacher=config.teacher), teacher, dataset)
    images, labels = calibration_images(dataset, config.calibration_images, teacher.num_classes > 0)
    batch = calibration_batch(teacher, images, labels, config.seed)
    return measure_sensitivity(model, batch, progress=progress)


def write_sensitivity(config: SensitivityConfig, progress: bool = True, dataset: Dataset | None = None) -> Sensitivity:
    """``sensitivity_of``, written to ``config.out``."""
    result = sensitivity_of(config, progress, dataset)
    atomic_write_text(config.out, json.dumps(result.to_dict(), indent=2) + "\n")
    return result


def allocate_from_file(config: AllocateConfig) -> tuple[BitPlan, Path]:
    """The plan for a sensitivity file, written (with its figure) to ``config.out``."""
    check_choice(config, "weighting")
    if not config.sensitivity:
        raise ValueError("give the sensitivities to allocate from: --sensitivity FILE (from `robuq ampn sensitivity`)")
    try:
        sensitivity = Sensitivity.from_dict(json.loads(Path(config.sensitivity).read_text()))
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"cannot read sensitivities from {config.sensitivity}: {exc}") from exc
    plan = plan_from_sensitivity(sensitivity, config.budget, config.weighting)
    return plan, write_plan(plan, config.out)


def _qat_stage(config: QATConfig, progress: bool, plan: BitPlan | None = None, dataset: Dataset | None = None) -> Path:
    out = Path(config.out_dir)
    if (out / "model.safetensors").is_file():
        return out
    return qat(config, resume=bool(list_checkpoints(out)), progress=progress, plan=plan, dataset=dataset)


def ampn_run(config: AMPNConfig, progress: bool = True, dataset: Dataset | None = None) -> Path:
    """The whole AMPN pipeline under ``config.qat.out_dir``, on ``dataset`` (any Dataset of (x, y); default:
    --latents or --data) for both QAT runs and the calibration batch; returns the final QAT run's folder."""
    check_choice(config, "weighting")
    base = config.qat
    if base.quant_config:
        raise ValueError("AMPN starts from a preset (--preset); a --quant-config policy file fixes its own bits")
    root = Path(base.out_dir)
    bits = config.resolved_start_bits()
    warm = _qat_stage(replace(base, act_bits=bits, plan=None, steps=config.warmup_qat_steps, out_dir=str(root / "warmup")),
                      progress, dataset=dataset)
    teacher = json.loads((warm / "config.json").read_text())["teacher"]
    sens_path = root / "sensitivity.json"
    if sens_path.is_file():
        sensitivity = Sensitivity.from_dict(json.loads(sens_path.read_text()))
    else:
        sensitivity = write_sensitivity(SensitivityConfig(
            model=str(warm / "model.safetensors"), teacher=teacher, data=base.data, data_dir=base.data_dir, latents=base.latents,
            calibration_images=config.calibration_images, seed=base.seed, device=base.device, out=str(sens_path)), progress,
            dataset)
    plan = plan_from_sensitivity(sensitivity, config.budget, config.weighting)
    plan_path = root / "plan.json"
    if plan_path.is_file() and BitPlan.load(plan_path).bits != plan.bits:
        raise ValueError(
            f"{plan_path} holds a different plan than budget {config.budget} ({config.weighting}) gives now; "
            "the final QAT was trained with it — use a new --out-dir for a new budget"
        )
    write_plan(plan, plan_path)
    print(format_plan(plan))
    final = replace(base, act_bits=bits, plan=None, init_student=str(warm / "model.safetensors"), out_dir=str(root / "final"))
    return _qat_stage(final, progress, plan=plan, dataset=dataset)
