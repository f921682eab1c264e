"""`robuq ampn run`: warm-up QAT at uniform bits → sensitivities → exact allocation → QAT with the plan.

Each stage writes its result into the run folder and is skipped when that result already exists, so
an interrupted run picks up where it stopped (QAT stages also resume from their own checkpoints).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

from robuq.ampn.plan import format_plan, plan_from_sensitivity, write_plan
from robuq.ampn.sensitivity import Sensitivity, measure_sensitivity
from robuq.train.calibration import calibration_batch
from robuq.data import build_dataset
from robuq.core.files import atomic_write_text
from robuq.models.checkpoint import load_dit
from robuq.io.quantized import load_quantized
from robuq.core.runtime import resolve_device
from robuq.train.qat import QATConfig, calibration_images, qat
from robuq.train.state import list_checkpoints


@dataclass
class AMPNConfig:
    budget: float = 3.0
    weighting: str = "plain"  # "plain" or "macs"
    warmup_qat_steps: int = 1000  # QAT steps at uniform bits before sensitivities are measured
    start_bits: int | None = None  # uniform precision of the warm-up run (default: the budget rounded up)
    calibration_images: int = 64
    seed: int = 0

    def resolved_start_bits(self) -> int:
        return self.start_bits if self.start_bits is not None else min(4, math.ceil(self.budget))


def sensitivity_of(model_path: str | Path, teacher_path: str | Path, qat_config: QATConfig, ampn: AMPNConfig,
                   progress: bool = True) -> Sensitivity:
    """Sensitivities of a quantized model file against its teacher on a fixed calibration batch."""
    device = resolve_device(qat_config.device)
    model, _ = load_quantized(model_path, map_location=str(device))
    teacher = load_dit(teacher_path, map_location=str(device)).eval()
    size = teacher.x_embedder.grid_size * teacher.patch_size
    dataset = build_dataset(qat_config.data, size, qat_config.data_dir, teacher.num_classes > 0, channels=qat_config.channels)
    images, labels = calibration_images(dataset, ampn.calibration_images, teacher.num_classes > 0)
    batch = calibration_batch(teacher, images, labels, ampn.seed)
    return measure_sensitivity(model, batch, progress=progress)


def _qat_stage(config: QATConfig, progress: bool) -> Path:
    out = Path(config.out_dir)
    if (out / "model.safetensors").is_file():
        return out
    return qat(config, resume=bool(list_checkpoints(out)), progress=progress)


def ampn_run(config: QATConfig, ampn: AMPNConfig, progress: bool = True) -> Path:
    """The whole AMPN pipeline under ``config.out_dir``; returns the folder of the final QAT run."""
    if config.quant_config:
        raise ValueError("AMPN starts from a preset (--preset); a --quant-config policy file fixes its own bits")
    root = Path(config.out_dir)
    bits = ampn.resolved_start_bits()
    warm = _qat_stage(replace(config, act_bits=bits, plan=None, steps=ampn.warmup_qat_steps, out_dir=str(root / "warmup")), progress)
    warm_config = json.loads((warm / "config.json").read_text())
    sens_path = root / "sensitivity.json"
    if sens_path.is_file():
        sensitivity = Sensitivity.from_dict(json.loads(sens_path.read_text()))
    else:
        sensitivity = sensitivity_of(warm / "model.safetensors", warm_config["teacher"], config, ampn, progress)
        atomic_write_text(sens_path, json.dumps(sensitivity.to_dict(), indent=2) + "\n")
    plan = plan_from_sensitivity(sensitivity, ampn.budget, ampn.weighting)
    plan_path = root / "plan.json"
    if plan_path.is_file() and json.loads(plan_path.read_text())["bits"] != plan["bits"]:
        raise ValueError(
            f"{plan_path} holds a different plan than budget {ampn.budget} ({ampn.weighting}) gives now; "
            "the final QAT was trained with it — use a new --out-dir for a new budget"
        )
    write_plan(plan, plan_path)
    print(format_plan(plan))
    final = replace(config, act_bits=bits, plan=str(plan_path), init_student=str(warm / "model.safetensors"),
                    out_dir=str(root / "final"))
    return _qat_stage(final, progress)
