"""`robuq ampn run`: warm-up QAT at uniform bits → sensitivities → exact allocation → QAT with the plan.

Warm-up and final QAT are one schedule of ``qat.steps``: the warm-up is its first ``warmup_qat_steps``
(learning-rate schedule, data order, EMA and AdamW state all carry on), the final run continues from the
warm-up's checkpoint with the plan's bits. The warm-up trains at 4 bits, the most AMPN allocates, so every
candidate width is a step down from what the model was trained at and a sensitivity is an increase of
error (trained at 2 bits, a layer given 3 can score worse than at 2, and the plan's objective says
nothing). Each stage writes its result into the run folder and is skipped when that result already
exists, so an interrupted run picks up where it stopped (QAT stages resume from their own checkpoints).
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from torch.utils.data import Dataset

from robuq.ampn.plan_files import format_plan, plan_from_sensitivity, write_plan
from robuq.ampn.sensitivity import METRICS, Sensitivity, block_layers, measure_sensitivity
from robuq.core.distributed import DistInfo, barrier, init_distributed, shutdown, wait_for_files
from robuq.core.files import atomic_write, atomic_write_text, load_tensors, read_meta
from robuq.core.options import check_choice, option, with_default
from robuq.core.runtime import (
    default_teacher_path,
    device_context,
    precision_context,
    release_memory,
    resolve_device,
)
from robuq.io.model_files import load_any
from robuq.io.quantized import load_quantized
from robuq.models.checkpoint import load_dit
from robuq.models.families import model_family
from robuq.models.families.base import forward_embeddings
from robuq.precision.plan import BitPlan
from robuq.sample.to_files import CLASS_CONDITIONAL
from robuq.io.prompts import load_prompt_table
from robuq.train.calibration import calibration_batch, family_calibration_batch, family_data_batch
from robuq.train.family_qat import probe_batch, text_model_takes
from robuq.train.qat import QATConfig, calibration_images, qat, teacher_dataset
from robuq.train.state import checkpoint_path, list_checkpoints
from robuq.core.errors import RobuqError


@dataclass
class AMPNConfig:
    """``robuq ampn run``: the QAT runs' options (``qat``; the warm-up takes its bits from here, the
    final run its plan) and how bits are allocated."""

    qat: QATConfig = option(
        help="the QAT schedule's options (--steps spans warm-up and final run together)",
        factory=lambda: QATConfig(out_dir="runs/ampn", steps=2000),
    )
    budget: float = option(3.0, "average activation bits the plan may spend (the paper: 2 or 3)")
    weighting: str = option(
        "plain", "average over layers (plain) or weighted by each layer's MACs (macs)", choices=("plain", "macs")
    )
    warmup_qat_steps: int = option(
        1000,
        "the first N of --steps run at uniform --start-bits before sensitivities are "
        "measured; the rest continue with the plan",
    )
    start_bits: int = option(4, "uniform activation bits of the warm-up (4: every candidate is a step down from it)")
    calibration_images: int = option(
        128,
        "training images sensitivities are measured on (each with its label and "
        "the null class, at timesteps spread over the schedule)",
    )
    sensitivity_metric: str = option(
        "perturbation",
        "perturbation: how far a layer's lower bits move the output; "
        "error-increase: how much they raise the error against the teacher "
        "(noisier: it can fall as bits fall)",
        choices=METRICS,
    )

    def validate(self) -> None:
        check_choice(self, "weighting")
        check_choice(self, "sensitivity_metric")
        if not 0 < self.warmup_qat_steps < self.qat.steps:
            raise RobuqError(
                f"--warmup-qat-steps {self.warmup_qat_steps} must lie inside the schedule's --steps "
                f"{self.qat.steps} (the warm-up is its first part)"
            )
        if self.start_bits < math.ceil(self.budget):
            raise RobuqError(
                f"--start-bits {self.start_bits} is below the budget {self.budget}: the warm-up must train "
                "at least the bits the plan may give"
            )


# The QAT options AMPN sets itself (the warm-up's uniform bits, the final run's plan and where it continues from).
SET_BY_AMPN = ("qat.plan", "qat.init_student", "qat.act_bits", "qat.quant_config", "qat.continue_from")


@dataclass
class SensitivityConfig:
    """``robuq ampn sensitivity``: one quantized model's per-layer sensitivities."""

    model: str | None = option(None, "quantized model file (e.g. after ~1,000 QAT steps)")
    teacher: str | None = option(None, "full-precision teacher (default: the shipped teacher)")
    data: str = with_default(QATConfig, "data", "fashion-mnist")
    data_dir: str | None = with_default(QATConfig, "data_dir", None)
    latents: str | None = with_default(QATConfig, "latents", None)
    calibration_images: int = with_default(AMPNConfig, "calibration_images", 128)
    metric: str = option(
        "perturbation", "perturbation (output change) or error-increase (error against the teacher)", choices=METRICS
    )
    seed: int = option(0, "seed of the calibration batch's noise")
    prompt_embeds: str | None = option(
        None,
        "text-to-image families: cached prompt embeddings (the file `robuq sample` "
        "takes) whose rows condition the calibration inputs; default: random",
    )
    teacher_samples: str | None = option(
        None,
        "text-to-image families: calibrate on these teacher samples (the file `qat --prompt-only` keeps) instead "
        "of captioned data",
    )
    precision: str = with_default(QATConfig, "precision", "fp32")
    device: str = with_default(QATConfig, "device", "auto")
    out: str = option("sensitivity.json", "where to write the sensitivities (JSON)")


@dataclass
class AllocateConfig:
    """``robuq ampn allocate``: the exact (dynamic-programming) allocation of per-layer bits."""

    sensitivity: str | None = option(None, "JSON from `robuq ampn sensitivity`")
    budget: float = with_default(AMPNConfig, "budget", 3.0)
    weighting: str = with_default(AMPNConfig, "weighting", "plain")
    out: str = option("plan.json", "plan JSON; its figure goes beside it as .png")


def sensitivity_of(
    config: SensitivityConfig, progress: bool = True, dataset: Dataset | None = None, share: tuple[int, int] = (0, 1)
) -> Sensitivity:
    """``_sensitivity_of`` under ``config.precision`` (AMPN: the training's), the teacher's reference included."""
    check_choice(config, "precision")
    with precision_context(config.precision, resolve_device(config.device)):
        return _sensitivity_of(config, progress, dataset, share)


def _sensitivity_of(
    config: SensitivityConfig, progress: bool, dataset: Dataset | None, share: tuple[int, int]
) -> Sensitivity:
    """Sensitivities of a quantized model file against its teacher on a fixed calibration batch drawn from
    ``dataset`` (default: --latents or --data); ``share`` = (k, n): only every n-th layer from the k-th."""
    if not config.model:
        raise RobuqError("give the quantized model whose sensitivities to measure: --model FILE")
    device = resolve_device(config.device)
    model, _ = load_quantized(config.model, map_location=str(device))
    if model_family(model) not in CLASS_CONDITIONAL:
        return _family_sensitivity(config, model, device, progress, share)
    teacher = load_dit(config.teacher or default_teacher_path(), map_location=str(device)).eval()
    dataset = teacher_dataset(
        QATConfig(data=config.data, data_dir=config.data_dir, latents=config.latents, teacher=config.teacher),
        teacher,
        dataset,
    )
    images, labels = calibration_images(dataset, config.calibration_images, teacher.num_classes > 0)
    batch = calibration_batch(teacher, images, labels, config.seed, with_null=True)
    return measure_sensitivity(model, batch, layers=_share(model, share), progress=progress, metric=config.metric)


def _share(model, share: tuple[int, int]) -> list[str]:
    k, n = share
    return block_layers(model)[k::n]


def _family_sensitivity(config: SensitivityConfig, model, device, progress: bool, share=(0, 1)) -> Sensitivity:
    """A text-to-image family's sensitivities on Gaussian latents over the schedule with the cached prompts."""
    teacher = load_any(config.teacher, map_location=str(device)).eval() if config.teacher else None
    if config.metric == "error-increase" and teacher is None:
        raise RobuqError(
            "--metric error-increase measures against a teacher: give --teacher (the full-precision "
            "model folder), or use --metric perturbation"
        )
    if config.prompt_embeds and read_meta(config.prompt_embeds).get("kind") == "prompt-table" and not config.latents:
        # A prompt table and captioned data: real latents, each with its caption and with the empty prompt.
        table = load_prompt_table(config.prompt_embeds)
        if config.teacher_samples:
            kept = load_tensors(config.teacher_samples)[0]
            pick = torch.linspace(0, len(kept["rows"]) - 1, min(config.calibration_images, len(kept["rows"]))).long()
            latents, rows = kept["latents"][pick], kept["rows"][pick]
        else:
            latents, rows = probe_batch(table, config.calibration_images, config.data_dir, split="train")
        takes = text_model_takes(model)
        text = table.forward_arguments(rows, takes, torch.device("cpu"))
        empty = table.forward_arguments(torch.zeros(1, dtype=torch.long), takes, torch.device("cpu"))
        batch = family_data_batch(model, latents, text, empty, config.seed, reference=teacher)
    else:
        embeds = forward_embeddings(load_tensors(config.prompt_embeds)[0]) if config.prompt_embeds else None
        batch = family_calibration_batch(model, config.calibration_images, embeds, config.seed, reference=teacher)
    return measure_sensitivity(model, batch, layers=_share(model, share), progress=progress, metric=config.metric)


def write_sensitivity(config: SensitivityConfig, progress: bool = True, dataset: Dataset | None = None) -> Sensitivity:
    """``sensitivity_of``, written to ``config.out``."""
    result = sensitivity_of(config, progress, dataset)
    atomic_write_text(config.out, json.dumps(result.to_dict(), indent=2) + "\n")
    return result


def allocate_from_file(config: AllocateConfig) -> tuple[BitPlan, Path]:
    """The plan for a sensitivity file, written (with its figure) to ``config.out``."""
    check_choice(config, "weighting")
    if not config.sensitivity:
        raise RobuqError("give the sensitivities to allocate from: --sensitivity FILE (from `robuq ampn sensitivity`)")
    try:
        sensitivity = Sensitivity.from_dict(json.loads(Path(config.sensitivity).read_text()))
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise RobuqError(f"cannot read sensitivities from {config.sensitivity}: {exc}") from exc
    plan = plan_from_sensitivity(sensitivity, config.budget, config.weighting)
    return plan, write_plan(plan, config.out)


def _qat_stage(
    config: QATConfig,
    progress: bool,
    plan: BitPlan | None = None,
    dataset: Dataset | None = None,
    until: int | None = None,
) -> Path:
    out = Path(config.out_dir)
    stop = config.steps if until is None else min(until, config.steps)
    if checkpoint_path(out, stop).is_file():
        return out
    try:
        return qat(
            config, resume=bool(list_checkpoints(out)), until=until, progress=progress, plan=plan, dataset=dataset
        )
    finally:
        release_memory()  # the stage's student, EMA, optimizer and teacher, before the next stage builds its own


def ampn_run(
    config: AMPNConfig,
    progress: bool = True,
    dataset: Dataset | None = None,
    until: int | None = None,
    announce_plan: bool = True,
) -> Path:
    """The whole AMPN pipeline under ``config.qat.out_dir``, on ``dataset`` (any Dataset of (x, y); default:
    --latents or --data) for both QAT stages and the calibration batch; returns the final QAT run's folder.
    ``until`` stops the final stage at that step (the schedule still spans ``qat.steps``); ``announce_plan``
    prints the plan once chosen.

    Under torchrun the process group is created here, once, and every stage runs in it (a group destroyed and
    created again in the same processes hangs); sensitivities are measured on rank 0 only, in its device's
    context, and the other ranks read them from the file after a barrier."""
    config.validate()
    if config.qat.quant_config:
        raise RobuqError("AMPN starts from a preset (--preset); a --quant-config policy file fixes its own bits")
    device = resolve_device(config.qat.device)
    info = init_distributed(device, config.qat.dist_timeout_hours)
    current = device_context(device)
    try:
        with current:
            return _ampn_stages(config, progress, dataset, until, info, announce_plan)
    finally:
        shutdown(info)


def _measure_sensitivity(
    config: AMPNConfig,
    warm: Path,
    warm_checkpoint: Path,
    sens_path: Path,
    progress: bool,
    dataset: Dataset | None,
    info: DistInfo,
) -> None:
    """``sens_path``, measured from the warm-up checkpoint unless it exists: every process measures its share
    of the layers on the same calibration batch and rank 0 joins the parts into what one process would
    measure. Files, not collectives: the shares are uneven work. Every process returns once the file exists."""
    base, root = config.qat, sens_path.parent
    if not sens_path.is_file():
        part = root / f"sensitivity-part-{info.rank}-of-{info.world_size}.json"
        measured = (
            None
            if part.is_file()
            else sensitivity_of(
                SensitivityConfig(
                    model=str(warm_checkpoint),
                    teacher=json.loads((warm / "config.json").read_text())["teacher"],
                    data=base.data,
                    data_dir=base.data_dir,
                    latents=base.latents,
                    calibration_images=config.calibration_images,
                    metric=config.sensitivity_metric,
                    seed=base.seed,
                    precision=base.precision,
                    prompt_embeds=base.prompt_embeds,
                    teacher_samples=str(warm / "teacher-samples.safetensors") if base.prompt_only else None,
                    device=base.device,
                    out=str(sens_path),
                ),
                progress and info.is_main,
                dataset,
                share=(info.rank, info.world_size),
            )
        )
        if measured is not None:
            atomic_write_text(part, json.dumps(measured.to_dict()) + "\n")
        release_memory()  # the sensitivity pass's models and calibration batch
        parts = [root / f"sensitivity-part-{k}-of-{info.world_size}.json" for k in range(info.world_size)]
        wait_for_files(parts)
        if info.is_main:
            joined = Sensitivity.merged([Sensitivity.from_dict(json.loads(p.read_text())) for p in parts])
            atomic_write_text(sens_path, json.dumps(joined.to_dict(), indent=2) + "\n")
    wait_for_files([sens_path])


def _ampn_stages(
    config: AMPNConfig, progress: bool, dataset: Dataset | None, until: int | None, info: DistInfo, announce_plan: bool
) -> Path:
    base = config.qat
    root = Path(base.out_dir)
    uniform = replace(base, act_bits=config.start_bits, plan=None, init_student=None, continue_from=None)
    warm = _qat_stage(
        replace(uniform, out_dir=str(root / "warmup")), progress, dataset=dataset, until=config.warmup_qat_steps
    )
    warm_checkpoint = checkpoint_path(warm, config.warmup_qat_steps)
    sens_path = root / "sensitivity.json"
    _measure_sensitivity(config, warm, warm_checkpoint, sens_path, progress, dataset, info)
    sensitivity = Sensitivity.from_dict(json.loads(sens_path.read_text()))
    plan = plan_from_sensitivity(sensitivity, config.budget, config.weighting)
    plan_path = root / "plan.json"
    if plan_path.is_file() and BitPlan.load(plan_path).bits != plan.bits:
        raise RobuqError(
            f"{plan_path} holds a different plan than budget {config.budget} ({config.weighting}) gives now; "
            "the final QAT was trained with it — use a new --out-dir for a new budget"
        )
    barrier(info)  # every rank has compared the plan with the file before rank 0 writes it
    if info.is_main:
        write_plan(plan, plan_path)
        if announce_plan:
            print(format_plan(plan))
    final = replace(uniform, continue_from=str(warm_checkpoint), out_dir=str(root / "final"))
    kept = warm / "teacher-samples.safetensors"
    if base.prompt_only and info.is_main and not (root / "final" / kept.name).is_file():
        (root / "final").mkdir(parents=True, exist_ok=True)
        # The final stage trains on the warm-up's samples; the other processes wait for the whole file.
        atomic_write(root / "final" / kept.name, lambda tmp: shutil.copyfile(kept, tmp))
    return _qat_stage(final, progress, plan=plan, dataset=dataset, until=until)
