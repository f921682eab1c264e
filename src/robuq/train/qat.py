"""Quantization-aware training: a quantized copy of the teacher, trained by the same loop as the teacher.

Losses (``QATConfig.loss``): the plain diffusion loss ("diffusion"), distillation to the frozen
full-precision teacher — MSE between the two models' outputs on the same noised inputs, labels and
label dropout ("distill") — or diffusion + ``distill_weight`` · distillation ("mix", the default).

The defaults are the recipe the convergence benchmark's pilot chose on a held-out probe (results/convergence.md):
the full-precision layers train too, the ternary latent weights learn at 5× the learning rate, and "mix" stays
the loss (distillation alone was not better there).

The probe logged during training is the EMA model's error against the teacher on images the run does not
train on (Fashion-MNIST's test split), each noised image once with its label and once with the null
class, and the error of the guided prediction at ``probe_guidance``.
"""

from __future__ import annotations

import copy
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from robuq.train.calibration import batch_output, calibration_batch, output_errors
from robuq.core.options import check_choice, option, with_default
from robuq.core.runtime import default_teacher_path, resolve_device
from torch.utils.data import Dataset
from robuq.data import FashionMNIST
from robuq.diffusion.gaussian import GaussianDiffusion, create_diffusion
from robuq.models.checkpoint import check_compatible, read_state_dict
from robuq.models.dit import DiT
from robuq.quant.linear import QuantLinear
from robuq.precision.plan import BitPlan
from robuq.precision.policy import QuantConfig, quantize_
from robuq.precision.presets import resolve_policy
from robuq.io.full_precision import load_full_precision
from robuq.io.quantized import quantized_meta
from robuq.train.family_qat import family_probe, family_qat_objective, family_training_data, probe_batch, read_table
from robuq.train.state import list_checkpoints
from robuq.train.trainer import LoopConfig, check_data_fits, label_drops, loop_dataset, train_loop
from robuq.core.errors import RobuqError


@dataclass
class QATConfig(LoopConfig):
    """``robuq qat``: quantize a full-precision teacher and train it. The architecture, input size,
    channels and conditioning are the teacher's."""

    teacher: str | None = option(
        None,
        "full-precision model to quantize and distil from: a DiT checkpoint (default: the shipped teacher) or a "
        "diffusers folder of a text-to-image family, with --prompt-embeds",
    )
    preset: str = option("robuq", "quantization method (see the README's preset table; register_preset adds more)")
    act_bits: int = option(4, "activation bits of the four block linears (a --plan overrides them per layer)")
    plan: str | None = option(None, "per-layer activation bits: a plan JSON, e.g. from `robuq ampn allocate`")
    quant_config: str | None = option(
        None, "a policy file (YAML/JSON, QuantConfig.save) instead of --preset/--act-bits"
    )
    lowrank_rank: int = option(16, "rank of the full-precision low-rank branch of the baseline and robuq presets")
    lowrank_share: float | None = option(
        None,
        "the branch's rank as a share of each layer's width instead (the paper's "
        "16 of 1,152: 0.013889, rank 3 at width 192)",
    )
    prompt_embeds: str | None = option(
        None,
        "a text-to-image teacher's prompt table (cached embeddings, the empty prompt first; see "
        "docs/diffusers.md), which conditions the student and the teacher",
    )
    prompt_only: int = option(
        0,
        "text-to-image families with no training data: sample the teacher once for this many prompts drawn from "
        "--prompt-embeds (kept in --out-dir) and train on those samples, noised as in training; 0: train on --data",
    )
    prompt_only_steps: int = option(20, "--prompt-only: the teacher's sampling steps")
    prompt_only_guidance: float = option(3.0, "--prompt-only: the teacher's guidance scale")
    latent_size: int | None = option(
        None, "--prompt-only: side of the latent grid the teacher samples (default: the model's sample_size)"
    )
    init_student: str | None = option(None, "start from this quantized model's weights (AMPN: its warm-up run)")
    loss: str = option(
        "mix",
        "diffusion: the plain DiT loss; distill: MSE to the teacher's output; mix: both",
        choices=("diffusion", "distill", "mix"),
    )
    distill_weight: float = option(1.0, "weight of the distillation term in --loss mix")
    null_fraction: float | None = option(
        None,
        "fraction of samples given the null class, which guided sampling's "
        "unconditional branch sees (default: the teacher's class dropout)",
    )
    ternary_lr_scale: float = option(
        5.0,
        "learning rate of the ternary layers' latent weights as a multiple of --lr: "
        "a latent weight must move about half its channel's scale to change level",
    )
    freeze_fp: bool = option(
        False,
        "train only the quantized layers (and their low-rank branches); otherwise the "
        "full-precision embedders and final layer train too",
    )
    probe_images: int = option(
        128,
        "held-out images in the fixed batch of the probe (error against the teacher; each "
        "with its label and with the null class)",
    )
    probe_guidance: float = option(1.5, "guidance scale of the probe's guided error")
    probe_every: int = with_default(LoopConfig, "probe_every", 100)
    steps: int = with_default(LoopConfig, "steps", 1000)
    global_batch_size: int = with_default(LoopConfig, "global_batch_size", 64)
    lr: float = with_default(LoopConfig, "lr", 1e-4)
    warmup_steps: int = with_default(LoopConfig, "warmup_steps", 50)
    ema_decay: float = with_default(LoopConfig, "ema_decay", 0.999)
    out_dir: str = with_default(LoopConfig, "out_dir", "runs/qat")

    def validate(self, world_size: int = 1) -> None:
        super().validate(world_size)
        check_choice(self, "loss")
        if self.null_fraction is not None and not 0 <= self.null_fraction <= 1:
            raise RobuqError(f"null_fraction must lie in [0, 1], got {self.null_fraction}")
        if self.ternary_lr_scale <= 0:
            raise RobuqError(f"ternary_lr_scale must be positive, got {self.ternary_lr_scale}")

    def quantization(self, plan: BitPlan | None = None) -> QuantConfig:
        """The student's policy: --quant-config or --preset at --act-bits, with ``plan`` (or --plan) on top."""
        return resolve_policy(
            self.preset,
            self.act_bits,
            self.quant_config,
            plan if plan is not None else self.plan,
            self.lowrank_rank,
            self.lowrank_share,
        )


def _teacher_path(config: QATConfig) -> str:
    return config.teacher or str(default_teacher_path())


def qat_objective(
    diffusion: GaussianDiffusion, teacher: DiT, loss: str, distill_weight: float, null_fraction: float | None = None
) -> Callable[..., dict]:
    """Per-sample losses of a student on one batch; the teacher sees exactly the student's inputs. A sample
    gets the null class with probability ``null_fraction`` (default: the teacher's class dropout)."""
    if null_fraction is None:
        null_fraction = teacher.y_embedder.dropout_prob if teacher.y_embedder is not None else 0.0

    def objective(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, generator: torch.Generator) -> dict:
        n = x.shape[0]
        t = torch.randint(0, diffusion.num_timesteps, (n,), generator=generator).to(x.device)
        noise = torch.randn(x.shape, generator=generator).to(x.device)
        x_t = diffusion.q_sample(x, t, noise)
        kwargs = {}
        if y is not None:
            kwargs = {"y": y, "force_drop_ids": label_drops(n, null_fraction, generator, x.device)}
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


def teacher_probe(
    teacher: DiT, images: torch.Tensor, labels: torch.Tensor | None, seed: int = 0, guidance: float = 1.5
) -> Callable[[nn.Module], dict]:
    """``probe(model)`` → the model's output error against the teacher on a fixed batch of ``images``, each
    with its label and with the null class (relative to the teacher's output variance), and the error of
    the guided prediction at ``guidance``: what QAT logs to show how close the student is."""
    batch = calibration_batch(teacher, images, labels, seed, with_null=True)

    def probe(model: nn.Module) -> dict:
        return {f"probe_{k}": v for k, v in output_errors(batch_output(model, batch), batch, guidance).items()}

    return probe


def built_when_used(build: Callable[[], Callable[[nn.Module], dict]]) -> Callable[[nn.Module], dict]:
    """A probe whose batch (the teacher's outputs on it) is made at its first call: only the processes that probe
    pay for it (the main one; every one when the model is sharded)."""
    made: list[Callable[[nn.Module], dict]] = []

    def probe(model: nn.Module) -> dict:
        if not made:
            made.append(build())
        return made[0](model)

    return probe


# Parameters that are fixed by construction, not learned (DiT's sin-cos positional embedding).
FIXED_PARAMETERS = ("pos_embed",)


def build_student(teacher: DiT, quantization: QuantConfig, freeze_fp: bool = False, initialize: bool = True) -> DiT:
    """A quantized copy of ``teacher``: its quantized layers train; the rest (embedders, final layer) train
    too unless ``freeze_fp``, whatever the teacher's own ``requires_grad`` was. ``initialize=False`` skips the
    low-rank branches' SVDs, for a student whose weights are loaded afterwards."""
    student = quantize_(copy.deepcopy(teacher), quantization, initialize=initialize)
    quantized = {id(p) for m in student.modules() if isinstance(m, QuantLinear) for p in m.parameters()}
    for name, p in student.named_parameters():
        if id(p) not in quantized:
            p.requires_grad_(not freeze_fp and name not in FIXED_PARAMETERS)
    return student


def qat_param_groups(ternary_lr_scale: float) -> Callable[[nn.Module], list[dict]]:
    """AdamW groups for the loop: the ternary layers' latent weights at ``ternary_lr_scale``·lr, the rest at lr."""

    def groups(model: nn.Module) -> list[dict]:
        ternary = [
            m.weight
            for m in model.modules()
            if isinstance(m, QuantLinear) and m.config.weight == "ternary" and m.weight.requires_grad
        ]
        chosen = {id(p) for p in ternary}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in chosen]
        return [{"params": rest}, {"params": ternary, "lr_scale": ternary_lr_scale}]

    return groups


def load_student_weights(student: DiT, path: str) -> None:
    """Copy a quantized model's weights into ``student`` (same structure; bit-widths stay the student's)."""
    state, _ = read_state_dict(path)
    check_compatible(student, state, path)
    student.load_state_dict(state)


def calibration_images(dataset: Dataset, count: int, conditional: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``count`` training samples spread evenly over the dataset (so over classes), always the same ones."""
    pick = np.linspace(0, len(dataset) - 1, min(count, len(dataset))).astype(int)
    samples = [dataset[int(i)] for i in pick]
    images = torch.stack([x for x, _ in samples]).float()
    return images, (torch.stack([torch.as_tensor(y) for _, y in samples]).long() if conditional else None)


def _dit_training(config: QATConfig, teacher: DiT, dataset: Dataset | None):
    """(dataset, probe, where the probe's images come from, objective) for a DiT teacher."""
    dataset = teacher_dataset(config, teacher, dataset)
    probe_set, probe_source = probe_dataset(config, dataset)
    images = calibration_images(probe_set, config.probe_images, teacher.num_classes > 0)
    probe = built_when_used(lambda: teacher_probe(teacher, *images, config.seed, config.probe_guidance))
    diffusion = create_diffusion(learn_sigma=teacher.out_channels != teacher.in_channels)
    objective = qat_objective(diffusion, teacher, config.loss, config.distill_weight, config.null_fraction)
    return dataset, probe, probe_source, objective


def _family_training(config: QATConfig, teacher: nn.Module, dataset: Dataset | None):
    """The same for a text-to-image family's teacher, conditioned by the prompt table."""
    table = read_table(config.prompt_embeds, teacher)
    dataset = dataset if dataset is not None else family_training_data(config, table, teacher)
    if config.prompt_only:  # no held-out data: the first of the teacher's samples, which training sees too
        latents, rows = dataset[: config.probe_images]
        probe_source = "the teacher's own samples (training data; no held-out split)"
    else:
        latents, rows = probe_batch(table, config.probe_images, config.data_dir)
        probe_source = "captioned Fashion-MNIST test split"
    probe = built_when_used(lambda: family_probe(teacher, table, latents, rows, config.seed, config.probe_guidance))
    objective = family_qat_objective(teacher, table, config.loss, config.distill_weight, config.null_fraction)
    return dataset, probe, probe_source, objective


def qat(
    config: QATConfig,
    resume: bool = False,
    until: int | None = None,
    progress: bool = True,
    plan: BitPlan | None = None,
    dataset: Dataset | None = None,
) -> Path:
    """Quantize the teacher as ``config`` says (``plan``, if given, sets per-layer bits instead of
    ``config.plan``) and train it on ``dataset`` (any Dataset of (x, y); default: --latents or --data);
    returns the output folder (EMA weights in ``model.safetensors``, loadable with ``robuq.load_quantized``)."""
    clock = time.perf_counter()
    setup: dict[str, float] = {}

    def lap(what: str) -> None:
        nonlocal clock
        setup[what] = round(time.perf_counter() - clock, 3)
        clock = time.perf_counter()

    teacher_path = _teacher_path(config)
    # The teacher, and so the student's SVDs, on this rank's device: on the CPU they take minutes per rank for XL/2.
    device = resolve_device(config.device)
    teacher = load_full_precision(teacher_path, map_location=str(device)).eval().requires_grad_(False)
    config = replace(config, teacher=teacher_path)  # recorded, so a resumed run checks it is the same teacher
    config.validate()
    quantization = config.quantization(plan)
    lap("teacher")
    # The data before the student: a bad --data-dir should fail at once, not after minutes of SVDs.
    training = _dit_training if isinstance(teacher, DiT) else _family_training
    dataset, probe, probe_source, objective = training(config, teacher, dataset)
    lap("data and probe")
    # Weights that a checkpoint or another model will replace need no initial SVD split.
    replaced = bool(config.init_student or config.continue_from or (resume and list_checkpoints(config.out_dir)))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)  # anything random in building the student is part of the run
        student = build_student(teacher, quantization, config.freeze_fp, initialize=not replaced)
    if config.init_student:
        load_student_weights(student, config.init_student)
    lap("student")
    rank = os.environ.get("RANK", "0")
    print(
        f"set-up of rank {rank} in {config.out_dir} (s): " + ", ".join(f"{k} {v:.1f}" for k, v in setup.items()),
        file=sys.stderr,
        flush=True,
    )
    meta = {**quantized_meta(student, quantization), "probe_images_from": probe_source}
    return train_loop(
        config,
        student,
        objective,
        dataset,
        resume=resume,
        until=until,
        extra_meta=meta,
        progress=progress,
        probe=probe,
        param_groups=qat_param_groups(config.ternary_lr_scale),
        frozen=(teacher,),
    )


def probe_dataset(config: LoopConfig, dataset: Dataset) -> tuple[Dataset, str]:
    """Images the probe may use without scoring the student on what it trained on: Fashion-MNIST's test
    split when the run trains on Fashion-MNIST's training split; otherwise (image folders, latent caches,
    a caller's dataset) the training data itself, which the returned description says."""
    if (
        not config.latents
        and config.data == "fashion-mnist"
        and isinstance(dataset, FashionMNIST)
        and dataset.split == "train"
    ):
        return FashionMNIST(
            "test", dataset.input_size, config.data_dir, dataset.conditional
        ), "fashion-mnist test split"
    return dataset, "training data (no held-out split)"


def teacher_dataset(config: LoopConfig, teacher: DiT, dataset: Dataset | None = None) -> Dataset:
    """``dataset``, or ``config.latents`` / ``config.data`` at the teacher's input size and channels (labelled
    if the teacher is conditional); a ValueError naming both when data and teacher do not fit."""
    what = f"a {type(dataset).__name__}" if dataset is not None else (config.latents or config.data)
    if dataset is None:
        size = teacher.x_embedder.grid_size * teacher.patch_size
        dataset = loop_dataset(
            config, size, teacher.num_classes > 0, teacher.in_channels if teacher.in_channels in (1, 3) else 3
        )
    check_data_fits(dataset, teacher, f"{what}, for the teacher {getattr(config, 'teacher', None) or ''}".rstrip())
    return dataset
