"""Quantization-aware training of a text-to-image family's transformer (PixArt, SD3, FLUX.1, FLUX.2, Sana).

The teacher is a diffusers folder; the conditioning comes from a prompt table (``robuq.io.prompts``) made
once with the user's own text encoders — robuq never runs one. Each training sample is a latent with the
row of its caption in the table; the student and the frozen teacher see the same noisy latents, timesteps
and captions (dropped to the empty prompt, row 0, with ``null_fraction``), under the family's own objective.
The losses are those of DiT's QAT: the diffusion loss, distillation to the teacher's output, or both ("mix").
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from pathlib import Path

from robuq.core.distributed import wait_for_files
from robuq.core.errors import RobuqError
from robuq.core.files import load_tensors, save_tensors
from robuq.data.captions import CaptionedFashionMNIST
from robuq.io.prompts import PromptTable, load_prompt_table
from robuq.models.families import family_of, predict_latents
from robuq.sample.family_sampler import sample_latents
from robuq.train.family_objective import noisy_batch
from robuq.train.trainer import label_drops

DEFAULT_NULL_FRACTION = 0.1  # the caption dropout the miniature's teachers trained with


class CaptionRows(Dataset):
    """Captioned Fashion-MNIST as (latent, the caption's row in a prompt table)."""

    text_conditioning = True

    def __init__(self, table: PromptTable, split: str = "train", data_dir: str | os.PathLike | None = None):
        data = CaptionedFashionMNIST(split, data_dir)
        self.latents, self.rows, self.labels = data.latents, table.index(data.captions), data.labels
        self.num_classes = data.num_classes

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.latents[index], self.rows[index]


def text_model_takes(model: nn.Module) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


def read_table(path: str | None, teacher: nn.Module) -> PromptTable:
    if not path:
        raise RobuqError(
            f"a {family_of(teacher).name} teacher is conditioned on text: give --prompt-embeds, a prompt table "
            "made once with your own text encoders (robuq.io.prompts.save_prompt_table)"
        )
    return load_prompt_table(path)


def family_qat_objective(
    teacher: nn.Module, table: PromptTable, loss: str, distill_weight: float, null_fraction: float | None
) -> Callable[..., dict]:
    """Per-sample losses of a family student on a batch of (latents, caption rows)."""
    family, takes = family_of(teacher), text_model_takes(teacher)
    drop = DEFAULT_NULL_FRACTION if null_fraction is None else null_fraction
    out_channels = teacher.config.out_channels

    def objective(model: nn.Module, x: torch.Tensor, rows: torch.Tensor, generator: torch.Generator) -> dict:
        rows = torch.where(label_drops(len(rows), drop, generator, rows.device).bool(), torch.zeros_like(rows), rows)
        text = table.forward_arguments(rows, takes, x.device)
        batch = noisy_batch(family, out_channels or x.shape[1], x, generator)
        out = predict_latents(model, batch.inputs, batch.timesteps, text)
        terms: dict[str, torch.Tensor] = batch.losses(out) if loss in ("diffusion", "mix") else {}
        if loss in ("distill", "mix"):
            with torch.no_grad():
                target = predict_latents(teacher, batch.inputs, batch.timesteps, text)
            terms["distill"] = (out - target).pow(2).flatten(1).mean(1)
            terms["loss"] = terms["distill"] if loss == "distill" else terms["loss"] + distill_weight * terms["distill"]
        return terms

    return objective


def family_probe(
    teacher: nn.Module, table: PromptTable, latents: torch.Tensor, rows: torch.Tensor, seed: int, guidance: float
) -> Callable[[nn.Module], dict]:
    """``probe(model)`` → the model's output error against the teacher on a fixed batch of held-out latents,
    each with its caption and with the empty prompt (relative to the teacher's output variance), and the error
    of the guided prediction at ``guidance``."""
    family, takes = family_of(teacher), text_model_takes(teacher)
    device = next(teacher.parameters()).device
    batch = noisy_batch(
        family, teacher.config.out_channels or latents.shape[1], latents.to(device), torch.Generator().manual_seed(seed)
    )
    both = torch.cat([rows, torch.zeros_like(rows)])
    text = table.forward_arguments(both, takes, device)
    inputs, timesteps = torch.cat([batch.inputs] * 2), torch.cat([batch.timesteps] * 2)
    channels = latents.shape[1]

    def outputs(model: nn.Module, chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():  # in chunks: the activations of one chunk at a time, at any probe size
            out = torch.cat(
                [
                    predict_latents(
                        model,
                        inputs[i : i + chunk],
                        timesteps[i : i + chunk],
                        {k: v[i : i + chunk] for k, v in text.items()},
                    )[:, :channels]
                    for i in range(0, len(inputs), chunk)
                ]
            )
        cond, uncond = out.chunk(2)
        return out, uncond + guidance * (cond - uncond)

    reference, guided_reference = outputs(teacher)

    def probe(model: nn.Module) -> dict:
        was_training = model.training
        model.eval()
        out, guided = outputs(model)
        model.train(was_training)
        return {
            "probe_rel_mse": float((out - reference).pow(2).mean() / reference.var()),
            "probe_guided_rel_mse": float((guided - guided_reference).pow(2).mean() / guided_reference.var()),
        }

    return probe


def probe_batch(
    table: PromptTable, count: int, data_dir: str | os.PathLike | None, split: str = "test"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` latents of captioned Fashion-MNIST (default: the held-out test split), spread over the split,
    with their captions' rows."""
    held_out = CaptionRows(table, split, data_dir)
    pick = torch.linspace(0, len(held_out) - 1, min(count, len(held_out))).long()
    return held_out.latents[pick], held_out.rows[pick]


class TeacherSamples(Dataset):
    """The teacher's own samples as training data: (latent, its prompt's row in the table)."""

    text_conditioning = True

    def __init__(self, latents: torch.Tensor, rows: torch.Tensor):
        self.latents, self.rows = latents, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.latents[index], self.rows[index]


def teacher_samples(config, table: PromptTable, teacher: nn.Module) -> TeacherSamples:
    """``config.prompt_only`` samples of the teacher, one per prompt drawn at random (not the empty one) from
    the table, with its sampler at ``prompt_only_steps`` and ``prompt_only_guidance``; drawn once by the first
    process and kept in ``out_dir`` (``teacher-samples.safetensors``), which the others and any resumption read."""
    path = Path(config.out_dir) / "teacher-samples.safetensors"
    wanted = {
        "count": config.prompt_only,
        "steps": config.prompt_only_steps,
        "guidance": config.prompt_only_guidance,
        "seed": config.seed,
        "prompts": len(table),
        "latent_size": config.latent_size,
        "teacher": str(config.teacher),
    }
    if os.environ.get("RANK", "0") == "0" and not path.is_file():
        side = config.latent_size or getattr(teacher.config, "sample_size", None)
        if not side:
            raise RobuqError(f"--prompt-only: give --latent-size (the {family_of(teacher).name} model names none)")
        if len(table) < 2:
            raise RobuqError("--prompt-only needs prompts in the table beyond the empty one")
        rows = torch.randint(1, len(table), (config.prompt_only,), generator=torch.Generator().manual_seed(config.seed))
        latents = sample_latents(
            teacher,
            table,
            rows,
            (family_of(teacher).latent_channels(teacher), side, side),
            steps=config.prompt_only_steps,
            guidance=config.prompt_only_guidance,
            seed=config.seed,
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        save_tensors(path, {"latents": latents.cpu(), "rows": rows}, {"kind": "teacher-samples", **wanted})
    wait_for_files([path])
    tensors, meta = load_tensors(path)
    if {k: meta.get(k) for k in wanted} != wanted:
        raise RobuqError(f"{path} holds teacher samples of other settings ({meta}); use a new --out-dir")
    return TeacherSamples(tensors["latents"], tensors["rows"])


def family_training_data(config, table: PromptTable, teacher: nn.Module) -> Dataset:
    """Captioned Fashion-MNIST (the miniature), or with ``prompt_only`` the teacher's own samples."""
    if config.prompt_only:
        return teacher_samples(config, table, teacher)
    if config.latents or config.data != "fashion-mnist":
        raise RobuqError(
            "QAT of a text-to-image family trains on captioned Fashion-MNIST (the miniature) or, with "
            "--prompt-only N, on its teacher's own samples; a latent cache with captions is not supported yet"
        )
    return CaptionRows(table, "train", config.data_dir)
