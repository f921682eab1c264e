"""A fixed set of noised inputs spread over timesteps and classes, and a model's error on it.

QAT's probe and AMPN's sensitivities both measure "how far is this model's output from the teacher's" on
the same kind of batch; this is that batch, built once from a seed. Guided sampling runs the model on
each input twice, with its label and with the null class, so the batch can hold both branches: every
noised image appears once labelled and once unlabelled (``with_null=True``), which also lets the error
of the guided prediction itself be measured.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn as nn

from robuq.diffusion.gaussian import create_diffusion
from robuq.train.family_objective import noisy_batch
from robuq.models.dit import DiT
from robuq.models.families import family_of, model_family, model_output, run_model
from robuq.core.errors import RobuqError


@dataclass
class CalibrationBatch:
    x_t: torch.Tensor
    t: torch.Tensor
    y: torch.Tensor | None
    target: torch.Tensor  # the teacher's output on (x_t, t, y)
    paired_null: bool = False  # the second half repeats the first with y = the null class

    @property
    def kwargs(self) -> dict:
        return {} if self.y is None else {"y": self.y}

    def to(self, device: torch.device | str) -> "CalibrationBatch":
        move = lambda v: None if v is None else v.to(device)  # noqa: E731
        return CalibrationBatch(move(self.x_t), move(self.t), move(self.y), move(self.target), self.paired_null)


def null_label(model: nn.Module) -> int | None:
    """The label a model reads as "no class" (classifier-free guidance), or None when it has none."""
    if model_family(model) == "dit":
        embedder = model.y_embedder
        return embedder.num_classes if embedder is not None and embedder.dropout_prob > 0 else None
    return None  # diffusers' DiT: DiTPipeline feeds 1000, which only 1000-class models have


@torch.no_grad()
def calibration_batch(
    teacher: DiT, images: torch.Tensor, labels: torch.Tensor | None, seed: int = 0, with_null: bool = False
) -> CalibrationBatch:
    """Clean ``images`` noised at timesteps spaced evenly over [0, T), with noise drawn from ``seed``;
    ``with_null`` adds each noised image again with the null class (when the teacher has one)."""
    channels = (
        (teacher.in_channels, teacher.out_channels)
        if model_family(teacher) == "dit"
        else (teacher.config.in_channels, teacher.out_channels)
    )  # a diffusers teacher
    diffusion = create_diffusion(learn_sigma=channels[0] != channels[1])
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, diffusion.num_timesteps - 1, len(images)).long()
    x_t = diffusion.q_sample(images, t, torch.randn(images.shape, generator=g))
    null = null_label(teacher) if labels is not None and with_null else None
    if null is not None:
        x_t, t, labels = torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([labels, torch.full_like(labels, null)])
    device = next(teacher.parameters()).device
    was_training = teacher.training
    teacher.eval()
    target = model_output(teacher, x_t.to(device), t.to(device), None if labels is None else labels.to(device)).cpu()
    teacher.train(was_training)
    return CalibrationBatch(x_t, t, labels, target, null is not None)


@dataclass
class FamilyBatch:
    """A calibration batch of a text-to-image family: forward arguments in chunks, and the reference output
    of each chunk (a teacher's, or the model's own where no teacher is given)."""

    inputs: list[dict]
    targets: list[torch.Tensor]


def _rows(value, index: int):
    return value[index : index + 1] if isinstance(value, torch.Tensor) and value.ndim >= 2 else value


def _outputs(model: nn.Module, inputs: list[dict]) -> list[torch.Tensor]:
    """The model's output for each set of forward arguments, in eval mode."""
    was_training = model.training
    model.eval()
    try:
        return [run_model(model, one).cpu() for one in inputs]
    finally:
        model.train(was_training)


@torch.no_grad()
def family_calibration_batch(
    model: nn.Module,
    count: int,
    prompt_embeds: dict[str, torch.Tensor] | None = None,
    seed: int = 0,
    reference: nn.Module | None = None,
) -> FamilyBatch:
    """``count`` inputs of the model's family: Gaussian latents (the noisy input's distribution over most of
    the schedule) at timesteps spread evenly over it, each with a row of ``prompt_embeds`` in turn (cached
    embeddings, under the family's forward-argument names, e.g. ``encoder_hidden_states``) or random
    embeddings; targets from ``reference`` (default: the model itself)."""
    family = family_of(model)
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    accepted = set(inspect.signature(model.forward).parameters)
    unknown = sorted(set(prompt_embeds or {}) - accepted)
    if unknown:
        raise RobuqError(
            f"{family.name} models take no {', '.join(unknown)} (their forward takes {', '.join(sorted(accepted))})"
        )
    inputs = []
    for i in range(count):
        one = family.example_inputs(model, 1)
        one["hidden_states"] = torch.randn(one["hidden_states"].shape, generator=g).to(device)
        one["timestep"] = torch.full_like(one["timestep"], (i + 0.5) / count * family.timestep_scale)
        for name, value in (prompt_embeds or {}).items():
            one[name] = value[i % len(value)][None].to(device)
        inputs.append(one)
    return FamilyBatch(inputs, _outputs(reference if reference is not None else model, inputs))


@torch.no_grad()
def family_data_batch(
    model: nn.Module,
    latents: torch.Tensor,
    text: dict[str, torch.Tensor],
    empty: dict[str, torch.Tensor],
    seed: int = 0,
    reference: nn.Module | None = None,
    chunk: int = 32,
) -> FamilyBatch:
    """A calibration batch of a text-to-image family from real latents (N, C, H, W), noised as the family
    trains, each once with its caption's embeddings ``text`` and once with the empty prompt's ``empty`` (one
    row, repeated): the inputs guided sampling runs. Targets from ``reference`` (default: the model itself)."""
    family = family_of(model)
    device = next(model.parameters()).device
    noisy = noisy_batch(
        family, model.config.out_channels or latents.shape[1], latents.to(device), torch.Generator().manual_seed(seed)
    )
    inputs = []
    for start in range(0, len(latents), chunk):
        rows = slice(start, start + chunk)
        n = len(noisy.inputs[rows])
        for condition in (
            {k: v[rows] for k, v in text.items()},
            {k: v.expand(n, *v.shape[1:]) for k, v in empty.items()},
        ):
            arguments = family.latent_arguments(
                model, noisy.inputs[rows], noisy.timesteps[rows], {k: v.to(device) for k, v in condition.items()}
            )
            inputs.append(arguments)
    return FamilyBatch(inputs, _outputs(reference if reference is not None else model, inputs))


def guided(output: torch.Tensor, scale: float) -> torch.Tensor:
    """The guided prediction from a paired batch's output: uncond + scale·(cond − uncond)."""
    cond, uncond = output.chunk(2)
    return uncond + scale * (cond - uncond)


def output_errors(out: torch.Tensor, batch: CalibrationBatch, guidance: float | None = None) -> dict[str, float]:
    """Relative errors of ``out`` against the batch's target: ``rel_mse`` over every row and, for a
    paired batch with ``guidance``, ``guided_rel_mse`` of the guided prediction."""
    target = batch.target.to(out.device)
    errors = {"rel_mse": float((out - target).pow(2).mean() / target.var())}
    if batch.paired_null and guidance is not None:
        wanted = guided(target, guidance)
        errors["guided_rel_mse"] = float((guided(out, guidance) - wanted).pow(2).mean() / wanted.var())
    return errors


@torch.no_grad()
def batch_output(model: nn.Module, batch: CalibrationBatch, chunk: int = 256) -> torch.Tensor:
    """The model's output on the batch, in eval mode and in chunks of ``chunk`` rows."""
    device = next(model.parameters()).device
    b = batch.to(device)
    was_training = model.training
    model.eval()
    try:
        return torch.cat(
            [
                model_output(
                    model, b.x_t[i : i + chunk], b.t[i : i + chunk], None if b.y is None else b.y[i : i + chunk]
                )
                for i in range(0, len(b.t), chunk)
            ]
        )
    finally:
        model.train(was_training)


def relative_error(model: nn.Module, batch: CalibrationBatch) -> float:
    """mean((model − teacher)²) / var(teacher) on the batch, with the model in eval mode."""
    return output_errors(batch_output(model, batch), batch)["rel_mse"]
