"""Quantization-aware training: a quantized copy of the teacher, trained by the same loop as the teacher.

Losses (``QATConfig.loss``): the plain diffusion loss ("diffusion"), distillation to the frozen
full-precision teacher — MSE between the two models' outputs on the same noised inputs, labels and
label dropout ("distill") — or diffusion + ``distill_weight`` · distillation ("mix").
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from robuq.train.calibration import calibration_batch, relative_error
from robuq.data import build_dataset
from robuq.diffusion.gaussian import GaussianDiffusion, create_diffusion
from robuq.models.checkpoint import check_compatible, load_dit, read_state_dict
from robuq.models.dit import DiT
from robuq.quant.linear import QuantLinear
from robuq.quantize.policy import QuantConfig, load_plan, quantize_
from robuq.quantize.presets import preset
from robuq.io.quantized import quantized_meta
from robuq.train.trainer import TrainConfig, label_drops, train

LOSSES = ("diffusion", "distill", "mix")


@dataclass
class QATConfig(TrainConfig):
    """A QAT run. The architecture, input size and conditioning come from the teacher."""

    teacher: str | None = None  # full-precision checkpoint (default: the shipped teacher)
    preset: str = "robuq"
    act_bits: int = 4
    plan: str | None = None  # per-layer activation bits (JSON), e.g. from `robuq ampn allocate`
    quant_config: str | None = None  # a policy file (YAML/JSON) instead of preset/act_bits
    init_student: str | None = None  # start from this quantized model's weights (e.g. AMPN's warm-up run)
    loss: str = "mix"
    distill_weight: float = 1.0
    freeze_fp: bool = False  # train only the quantized layers (and their low-rank branches)
    probe_every: int = 100
    probe_images: int = 64
    steps: int = 1000
    global_batch_size: int = 64
    lr: float = 1e-4
    warmup_steps: int = 50
    ema_decay: float = 0.999
    out_dir: str = "runs/qat"

    def validate(self, world_size: int = 1) -> None:
        super().validate(world_size)
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, not {self.loss!r}")

    def quantization(self) -> QuantConfig:
        config = QuantConfig.load(self.quant_config) if self.quant_config else preset(self.preset, self.act_bits)
        if self.plan:
            config.plan = load_plan(self.plan)
        return config


def _teacher_path(config: QATConfig) -> str:
    if config.teacher:
        return config.teacher
    from robuq.core.runtime import default_teacher_path

    return str(default_teacher_path())


def qat_objective(diffusion: GaussianDiffusion, teacher: DiT, loss: str, distill_weight: float) -> Callable[..., dict]:
    """Per-sample losses of a student on one batch; the teacher sees exactly the student's inputs."""

    def objective(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, generator: torch.Generator) -> dict:
        n = x.shape[0]
        t = torch.randint(0, diffusion.num_timesteps, (n,), generator=generator).to(x.device)
        noise = torch.randn(x.shape, generator=generator).to(x.device)
        x_t = diffusion.q_sample(x, t, noise)
        kwargs = {}
        if y is not None:
            kwargs = {"y": y, "force_drop_ids": label_drops(n, teacher.y_embedder.dropout_prob, generator, x.device)}
        out = model(x_t, t, **kwargs)
        terms: dict[str, torch.Tensor] = {}
        if loss in ("diffusion", "mix"):
            terms = diffusion.losses_from_output(out, x, x_t, t, noise)
        if loss in ("distill", "mix"):
            with torch.no_grad():
                target = teacher.to(x.device)(x_t, t, **kwargs)
            terms["distill"] = (out - target).pow(2).flatten(1).mean(dim=1)
        if loss == "distill":
            terms["loss"] = terms["distill"]
        elif loss == "mix":
            terms["loss"] = terms["loss"] + distill_weight * terms["distill"]
        return terms

    return objective


def teacher_probe(teacher: DiT, images: torch.Tensor, labels: torch.Tensor | None, seed: int = 0) -> Callable[[nn.Module], dict]:
    """``probe(model)`` → the model's output error against the teacher on a fixed calibration batch
    (relative to the teacher's output variance): the collapse detector logged during QAT."""
    batch = calibration_batch(teacher, images, labels, seed)
    return lambda model: {"probe_rel_mse": relative_error(model, batch)}


def build_student(teacher: DiT, quantization: QuantConfig, freeze_fp: bool = False) -> DiT:
    student = quantize_(copy.deepcopy(teacher), quantization)
    if freeze_fp:
        quantized = {id(p) for m in student.modules() if isinstance(m, QuantLinear) for p in m.parameters()}
        for p in student.parameters():
            p.requires_grad_(id(p) in quantized and p.requires_grad)
    return student


def load_student_weights(student: DiT, path: str) -> None:
    """Copy a quantized model's weights into ``student`` (same structure; bit-widths stay the student's)."""
    state, _ = read_state_dict(path)
    check_compatible(student, state, path)
    student.load_state_dict(state)


def calibration_images(dataset, count: int, conditional: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``count`` training images spread evenly over the dataset (so over classes), always the same ones."""
    pick = np.linspace(0, len(dataset) - 1, min(count, len(dataset))).astype(int)
    return dataset.images[pick], (dataset.labels[pick] if conditional else None)


def qat(config: QATConfig, resume: bool = False, until: int | None = None, progress: bool = True) -> Path:
    """Quantize the teacher as ``config`` says and train it; returns the output folder (EMA weights in
    ``model.safetensors``, loadable with ``robuq.load_quantized``)."""
    teacher_path = _teacher_path(config)
    teacher = load_dit(teacher_path).eval().requires_grad_(False)
    size = teacher.x_embedder.grid_size * teacher.patch_size
    # The teacher fixes the architecture; recording it here makes a resumed run check it too.
    config = replace(
        config, teacher=teacher_path, input_size=size, conditional=teacher.num_classes > 0, model=f"teacher:{Path(teacher_path).name}"
    )
    config.validate()
    quantization = config.quantization()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)  # anything random in building the student is part of the run
        student = build_student(teacher, quantization, config.freeze_fp)
    if config.init_student:
        load_student_weights(student, config.init_student)
    dataset = build_dataset(config.data, size, config.data_dir, config.conditional, channels=config.channels)
    if dataset.in_channels != teacher.in_channels:
        raise ValueError(f"the data has {dataset.in_channels} channels, the teacher {teacher.in_channels}")
    probe = teacher_probe(teacher, *calibration_images(dataset, config.probe_images, config.conditional), config.seed)
    diffusion = create_diffusion(learn_sigma=teacher.out_channels != teacher.in_channels)
    objective = qat_objective(diffusion, teacher, config.loss, config.distill_weight)
    meta = quantized_meta(student, quantization)
    return train(config, resume=resume, until=until, model=student, objective=objective, extra_meta=meta,
                 progress=progress, probe=probe, dataset=dataset)
