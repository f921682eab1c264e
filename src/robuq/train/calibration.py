"""A fixed set of noised inputs spread over timesteps and classes, and a model's error on it.

QAT's collapse probe and AMPN's sensitivities both measure "how far is this model's output from the
teacher's" on the same kind of batch; this is that batch, built once from a seed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from robuq.diffusion.gaussian import create_diffusion
from robuq.models.dit import DiT
from robuq.models.families import model_family, model_output


@dataclass
class CalibrationBatch:
    x_t: torch.Tensor
    t: torch.Tensor
    y: torch.Tensor | None
    target: torch.Tensor  # the teacher's output on (x_t, t, y)

    @property
    def kwargs(self) -> dict:
        return {} if self.y is None else {"y": self.y}

    def to(self, device: torch.device | str) -> "CalibrationBatch":
        move = lambda v: None if v is None else v.to(device)  # noqa: E731
        return CalibrationBatch(move(self.x_t), move(self.t), move(self.y), move(self.target))


@torch.no_grad()
def calibration_batch(teacher: DiT, images: torch.Tensor, labels: torch.Tensor | None, seed: int = 0) -> CalibrationBatch:
    """Clean ``images`` noised at timesteps spaced evenly over [0, T), with noise drawn from ``seed``."""
    channels = (teacher.in_channels, teacher.out_channels) if model_family(teacher) == "dit" else (
        teacher.config.in_channels, teacher.out_channels)  # a diffusers teacher
    diffusion = create_diffusion(learn_sigma=channels[0] != channels[1])
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, diffusion.num_timesteps - 1, len(images)).long()
    x_t = diffusion.q_sample(images, t, torch.randn(images.shape, generator=g))
    device = next(teacher.parameters()).device
    was_training = teacher.training
    teacher.eval()
    target = model_output(teacher, x_t.to(device), t.to(device), None if labels is None else labels.to(device)).cpu()
    teacher.train(was_training)
    return CalibrationBatch(x_t, t, labels, target)


@torch.no_grad()
def relative_error(model: nn.Module, batch: CalibrationBatch) -> float:
    """mean((model − teacher)²) / var(teacher) on the batch, with the model in eval mode."""
    device = next(model.parameters()).device
    b = batch.to(device)
    was_training = model.training
    model.eval()
    out = model_output(model, b.x_t, b.t, b.y)
    model.train(was_training)
    return float((out - b.target).pow(2).mean() / b.target.var())
