"""The training loop every robuq run uses: AdamW, EMA, clipping, logging, atomic checkpoints, exact resume.

Exactness comes from construction rather than from saving RNG streams: the data order (and flips) of every epoch
is a permutation seeded by (seed, epoch), and all randomness of step k (timesteps, noise, label
dropout) is drawn from a generator seeded with (seed, k, rank). A run stopped at step k and resumed is
therefore the same computation as one that never stopped. Randomness a model draws from the global
RNG is seeded the same way inside ``torch.random.fork_rng``, so the caller's RNG is left as it was.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.utils.data import Dataset
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from robuq.data import CorruptImageError, StreamingImageFolder, build_dataset
from robuq.data.latents import LatentDataset
from robuq.diffusion.gaussian import GaussianDiffusion, create_diffusion
from robuq.core.files import atomic_write_text, read_meta, save_tensors
from robuq.models.checkpoint import load_dit
from robuq.models.dit import DiT, create_dit
from robuq.train.guards import first_nonfinite_grad, first_nonfinite_module
from robuq.core.distributed import (
    DEFAULT_TIMEOUT_HOURS,
    TIMEOUT_HELP,
    DistInfo,
    any_rank,
    barrier,
    init_distributed,
    shutdown,
)
from robuq.core.options import check_choice, check_known_fields, option
from robuq.core.runtime import DEVICE_HELP, device_context, precision_context, resolve_device
from robuq.train.state import (
    checkpoint_path,
    is_sharded,
    list_checkpoints,
    load_training_state,
    model_state,
    save_training_state,
)
from robuq.core.errors import RobuqError, RobuqFileNotFoundError


@dataclass
class LoopConfig:
    """The training loop's options, shared by every job that trains (``train``, ``qat``); written to
    ``out_dir/config.json`` and into every checkpoint with the job's own options."""

    data: str = option(
        "fashion-mnist",
        "training data: 'fashion-mnist' or the path of an image folder (a sub-folder per class, "
        "read from disk as it is used)",
    )
    data_dir: str | None = option(
        None, "folder of the Fashion-MNIST IDX files (default: $ROBUQ_DATA, then /usr/share/datasets/fashion-mnist)"
    )
    latents: str | None = option(None, "train on a latent cache written by `robuq latents` instead of --data")
    num_workers: int | None = option(
        None,
        "DataLoader worker processes feeding the loop (default: up to 8 for an image "
        "folder, which decodes images, else 0; 0: read batches in the loop's process)",
    )
    flip: bool = option(
        True,
        "random horizontal flips, drawn per sample and epoch from --seed: image folders, and latent "
        "caches encoded with --flip (Fashion-MNIST is never flipped)",
    )
    precision: str = option(
        "fp32",
        "fp32; tf32 (CUDA matmuls in TF32); bf16 (autocast; quantizer statistics, scales and rounding stay fp32)",
        choices=("fp32", "tf32", "bf16"),
    )
    grad_checkpoint: bool = option(
        False, "recompute each DiT block in the backward pass instead of storing its activations"
    )
    compile: bool = option(False, "torch.compile the model for the loop (the first steps are slow while it compiles)")
    steps: int = option(10_000, "optimizer steps of the whole run; the learning-rate schedule spans them")
    global_batch_size: int = option(128, "images per step, summed over all processes")
    lr: float = option(3e-4, "peak learning rate (AdamW)")
    lr_schedule: str = option(
        "cosine",
        "learning rate after warm-up: constant, or cosine down to --min-lr-ratio·lr",
        choices=("constant", "cosine"),
    )
    min_lr_ratio: float = option(0.1, "where the cosine schedule ends, as a fraction of --lr")
    warmup_steps: int = option(200, "steps of linear learning-rate warm-up")
    weight_decay: float = option(0.0, "AdamW weight decay")
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0: no clipping)")
    ema_decay: float = option(0.9999, "decay of the exponential moving average of the weights (the saved model)")
    ema_warmup: bool = option(True, "use decay min(ema_decay, (1+k)/(10+k)) at step k, which suits short runs")
    seed: int = option(0, "seed of the initial weights, the data order, timesteps, noise and label dropout")
    log_every: int = option(25, "write a line to log.jsonl every N steps")
    ckpt_every: int = option(500, "write a resumable training checkpoint every N steps")
    keep_checkpoints: int = option(2, "how many of the newest training checkpoints to keep")
    probe_every: int = option(
        0,
        "log a quality probe of the EMA weights every N steps (QAT: output error against the "
        "teacher on held-out images); 0: never",
    )
    shard: str = option(
        "none",
        "none: every process holds the whole model (DDP); fsdp: parameters, gradients, optimizer state and "
        "EMA sharded over the processes with PyTorch's FSDP2, each block its own unit (under torchrun)",
        choices=("none", "fsdp"),
    )
    continue_from: str | None = option(
        None,
        "a training checkpoint of another run to carry on from: its step, weights, "
        "EMA and optimizer state, under the same schedule (AMPN's final run "
        "continues its warm-up this way)",
    )
    out_dir: str = option("runs/train", "output folder: config.json, log.jsonl, checkpoints/, model.safetensors")
    device: str = option("auto", DEVICE_HELP)
    dist_timeout_hours: float = option(DEFAULT_TIMEOUT_HOURS, TIMEOUT_HELP)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        return cls(**check_known_fields(data, cls, cls.__name__))

    def validate(self, world_size: int = 1) -> None:
        if self.steps <= 0 or self.global_batch_size <= 0:
            raise RobuqError("steps and global_batch_size must be positive")
        if self.global_batch_size % world_size:
            raise RobuqError(f"global_batch_size {self.global_batch_size} is not divisible by {world_size} processes")
        check_choice(self, "lr_schedule")
        check_choice(self, "precision")
        check_choice(self, "shard")


@dataclass
class TrainConfig(LoopConfig):
    """``robuq train``: a full-precision DiT, from scratch or from ``init_from``."""

    model: str = option("DiT-T/4", "DiT configuration by registry name (see `robuq models`)")
    input_size: int = option(32, "image (or latent) side length the model is built for")
    channels: int = option(3, "channels of image-folder data: 1 (grayscale) or 3 (RGB); Fashion-MNIST is grayscale")
    conditional: bool = option(True, "class-conditional (labels from the data) or unconditional")
    learn_sigma: bool = option(True, "predict the variance too (DiT's hybrid loss) or only the noise")
    init_from: str | None = option(None, "start from the weights of this checkpoint instead of a fresh initialisation")


# Options that may differ between a run and its resumption without changing the computation.
_RESUMABLE_CHANGES = {
    "log_every",
    "ckpt_every",
    "keep_checkpoints",
    "probe_every",
    "device",
    "data_dir",
    "out_dir",
    "num_workers",
    "grad_checkpoint",
    "compile",
    "dist_timeout_hours",
    "shard",  # sharded or not, a step computes the same (checkpoints are written whole either way)
}
# What a run continued from another (``continue_from``) may set differently from it: the network it trains
# (bits, plan) is the caller's business; the loop's schedule, data and randomness must be the same.
_LOOP_FIELDS = {f.name for f in fields(LoopConfig)} - _RESUMABLE_CHANGES - {"continue_from"}


class TrainingDivergedError(RuntimeError):
    """The loss or a gradient stopped being finite."""


def learning_rate(config: LoopConfig, step: int) -> float:
    """The scheduled peak-relative learning rate of step ``step`` (a parameter group scales it by its ``lr_scale``)."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return config.lr
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)


# A step's noise, timesteps and label drops come from one generator seeded by (run seed, step, rank), and an
# epoch's data order from (run seed, epoch): exact on resume and independent of the worker count. The
# multipliers are distinct primes larger than any step count or rank robuq meets, so that two different
# triples do not collide in practice; their values are arbitrary but fixed (changing them changes every run).
SEED_PRIME, STEP_PRIME, RANK_PRIME, EPOCH_SEED_PRIME = 1_000_003, 7919, 104_729, 65_537


def step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * SEED_PRIME + step * STEP_PRIME + rank * RANK_PRIME) % (2**63 - 1)


class StepBatches:
    """The samples each rank sees at each step, a pure function of (seed, step, rank).

    With ``mirrors`` each epoch also draws, per sample, whether to use its mirrored copy — index
    ``num_samples + i`` of a dataset with ``has_mirrors`` — so flips too are exact on resume and do not
    depend on which worker reads a sample.
    """

    def __init__(self, num_samples: int, global_batch: int, seed: int, info: DistInfo, mirrors: bool = False):
        if num_samples < global_batch:
            raise RobuqError(f"the dataset has {num_samples} samples, fewer than one batch of {global_batch}")
        self.num_samples, self.global_batch, self.seed, self.info, self.mirrors = (
            num_samples,
            global_batch,
            seed,
            info,
            mirrors,
        )
        self.steps_per_epoch = num_samples // global_batch
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def indices(self, step: int) -> torch.Tensor:
        epoch, within = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * EPOCH_SEED_PRIME + epoch)
            perm = torch.randperm(self.num_samples, generator=g)
            if self.mirrors:  # drawn after the permutation, which thus stays what it is without flips
                flipped = torch.rand(self.num_samples, generator=g) < 0.5
                perm = perm + self.num_samples * flipped[perm].long()
            self._epoch, self._perm = epoch, perm
        batch = self._perm[within * self.global_batch : (within + 1) * self.global_batch]
        return batch[self.info.rank :: self.info.world_size]


class StepBatchSampler:
    """``StepBatches`` for steps [start, stop), as a DataLoader batch sampler: workers prefetch, order stays exact."""

    def __init__(self, batches: StepBatches, start: int, stop: int):
        self.batches, self.start, self.stop = batches, start, stop

    def __iter__(self):
        return (self.batches.indices(step).tolist() for step in range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


def loop_dataset(config: LoopConfig, input_size: int, conditional: bool, channels: int = 3) -> Dataset:
    """The loop's data: the latent cache ``config.latents`` if given, else ``config.data`` at ``input_size``."""
    if config.latents:
        return LatentDataset(config.latents)
    return build_dataset(config.data, input_size, config.data_dir, conditional, channels=channels)


def loader_workers(config: LoopConfig, dataset: Dataset, info: DistInfo) -> int:
    """``config.num_workers``, or by default a share of this machine's CPUs (at most 8) for a folder of images
    to decode and 0 for data already in memory, where worker processes only cost start-up time."""
    if config.num_workers is not None:
        return config.num_workers
    if not isinstance(dataset, StreamingImageFolder):
        return 0
    return max(1, min(8, len(os.sched_getaffinity(0)) // info.world_size - 1))


def data_shape(dataset: Dataset) -> tuple[int, int]:
    """(channels, side) of the dataset's samples: its ``in_channels``/``input_size`` or its first sample's shape."""
    x = dataset[0][0]
    return int(getattr(dataset, "in_channels", x.shape[0])), int(getattr(dataset, "input_size", x.shape[-1]))


def check_data_fits(dataset: Dataset, model: nn.Module, what: str) -> None:
    """Raise a ValueError naming both when the data's channels or size differ from the model's."""
    channels, side = data_shape(dataset)
    size = model.x_embedder.grid_size * model.patch_size
    if (channels, side) != (model.in_channels, size):
        raise RobuqError(
            f"the data ({what}) holds {channels}×{side}×{side} samples but the model takes "
            f"{model.in_channels}×{size}×{size}; use data of the model's kind (latents for a latent DiT: --latents)"
        )


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema ← decay·ema + (1 − decay)·model for trained parameters, in a few fused multi-tensor ops (a
    Python loop over DiT-XL/2's parameters launched hundreds of kernels a step); frozen ones (pos_embed,
    frozen QAT parts) and buffers are copied: averaging would only add rounding noise."""
    pairs = list(zip(ema.parameters(), model.parameters()))
    trained = [(e, p.detach()) for e, p in pairs if p.requires_grad]
    if trained:
        averages, values = map(list, zip(*trained))
        torch._foreach_mul_(averages, decay)
        torch._foreach_add_(averages, values, alpha=1 - decay)
    for e, p in pairs:
        if not p.requires_grad:
            e.copy_(p.detach())
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def label_drops(n: int, probability: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Which of n labels classifier-free-guidance training replaces by the null class (1) this step."""
    return (torch.rand(n, generator=generator) < probability).long().to(device)


def diffusion_objective(
    diffusion: GaussianDiffusion, label_dropout: float = 0.0
) -> Callable[..., dict[str, torch.Tensor]]:
    """The plain DiT loss: per-sample hybrid (or MSE) loss at random timesteps, labels dropped with
    probability ``label_dropout`` (the model's own class_dropout_prob)."""

    def objective(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, generator: torch.Generator) -> dict:
        t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), generator=generator).to(x.device)
        noise = torch.randn(x.shape, generator=generator).to(x.device)
        kwargs = (
            {} if y is None else {"y": y, "force_drop_ids": label_drops(len(y), label_dropout, generator, x.device)}
        )
        return diffusion.training_losses(model, x, t, noise, model_kwargs=kwargs)

    return objective


def initial_model(config: TrainConfig, in_channels: int, num_classes: int) -> DiT:
    if config.init_from:
        model = load_dit(config.init_from)
        if model.in_channels != in_channels or model.num_classes != num_classes:
            raise RobuqError(
                f"{config.init_from} has {model.in_channels} channels and {model.num_classes} classes, "
                f"the data has {in_channels} and {num_classes}"
            )
        return model
    return create_dit(
        config.model,
        input_size=config.input_size,
        num_classes=num_classes,
        learn_sigma=config.learn_sigma,
        in_channels=in_channels,
    )


def _check_resumable(saved: dict[str, Any], current: LoopConfig, path: Path, only: set[str] | None = None) -> None:
    """Raise if ``current`` differs from the checkpoint's settings in anything but what may change on resume
    (or, with ``only``, in any of those options)."""
    defaults = {f.name: f.default for f in fields(type(current))}
    # Options added after a checkpoint was written count as having had their default value.
    diffs = [
        f"{k}: checkpoint {saved.get(k, defaults.get(k))!r} vs now {v!r}"
        for k, v in current.to_dict().items()
        if (k in only if only is not None else k not in _RESUMABLE_CHANGES) and saved.get(k, defaults.get(k)) != v
    ]
    if diffs:
        verb = "continue" if only is not None else "resume"
        raise RobuqError(f"cannot {verb} from {path}: the run's settings changed ({'; '.join(diffs)})")


def _check_same_meta(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """What the caller says defines the network (QAT: policy and bit plan) must match the checkpoint's."""
    changed = sorted(k for k, v in current.items() if k != "kind" and k in saved and saved[k] != v)
    if changed:
        raise RobuqError(
            f"cannot resume from {path}: the run's {', '.join(changed)} changed since it was written "
            "(a different bit plan or quantization policy); start a new --out-dir"
        )


def train(
    config: TrainConfig,
    resume: bool = False,
    until: int | None = None,
    progress: bool = True,
    dataset: Dataset | None = None,
    model: nn.Module | None = None,
    objective: Callable[..., dict[str, torch.Tensor]] | None = None,
) -> Path:
    """``robuq train``: build the data, the DiT and the diffusion loss that ``config`` names (or take the
    given ones) and run the training loop; returns the output folder."""
    if dataset is None:
        dataset = loop_dataset(config, config.input_size, config.conditional, config.channels)
    if model is None:
        channels, side = data_shape(dataset)
        if side != config.input_size and not config.init_from:
            raise RobuqError(
                f"the data holds {side}×{side} samples but --input-size is {config.input_size}; "
                f"pass --input-size {side}"
            )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)  # the initial weights are part of the run's reproducible state
            num_classes = getattr(dataset, "num_classes", None) if config.conditional else 0
            if num_classes is None:
                raise RobuqError(
                    f"a class-conditional model needs the class count: give the {type(dataset).__name__} "
                    "a num_classes attribute, pass a model, or train with conditional=False"
                )
            model = initial_model(config, channels, num_classes)
    if isinstance(model, DiT):  # another nn.Module from the Python API states its own input shape
        check_data_fits(dataset, model, config.latents or config.data)
    if objective is None:
        dropout = model.y_embedder.dropout_prob if getattr(model, "y_embedder", None) is not None else 0.0
        objective = diffusion_objective(create_diffusion(learn_sigma=config.learn_sigma), dropout)
    return train_loop(config, model, objective, dataset, resume=resume, until=until, progress=progress)


def train_loop(
    config: LoopConfig,
    model: nn.Module,
    objective: Callable[..., dict[str, torch.Tensor]],
    dataset: Dataset,
    resume: bool = False,
    until: int | None = None,
    extra_meta: dict[str, Any] | None = None,
    progress: bool = True,
    probe: Callable[[nn.Module], dict[str, float]] | None = None,
    param_groups: Callable[[nn.Module], list[dict]] | None = None,
    frozen: tuple[nn.Module, ...] = (),
) -> Path:
    """Run (or continue) the loop every robuq training job uses; returns the output folder.

    ``until`` stops early at that step, keeping the schedule of the full ``config.steps``, so long runs
    can be done in chunks with ``resume=True``. ``objective(model, x, y, generator)`` gives per-sample
    losses; ``probe(ema)`` is called with the EMA weights every ``config.probe_every`` steps on the main
    process and its numbers go into the log (e.g. QAT's error against the teacher). Labels are passed when
    the model is class-conditional (``model.num_classes > 0``) or the dataset's are text conditioning (its
    ``text_conditioning`` is true: caption ids or prompt-table rows). ``param_groups(model)`` splits the trainable
    parameters into AdamW groups, each with an ``lr_scale`` on the schedule (default: one group). ``frozen``
    modules (QAT's teacher) are sharded with the model under ``shard="fsdp"``; the objective must run them on
    every process.
    """
    device = resolve_device(config.device)
    info = init_distributed(device, config.dist_timeout_hours)
    # The rank's GPU is current only while the loop runs (NCCL and autocast use the current device).
    current = device_context(device)
    try:
        with current:
            run = LoopRun(resume, until, extra_meta or {}, progress, probe, param_groups, tuple(frozen))
            return _loop(config, model, objective, dataset, run, device, info)
    finally:
        shutdown(info)


def enable_grad_checkpointing(model: nn.Module) -> None:
    """Recompute each block in the backward pass: robuq's DiT by its switch, a diffusers transformer by its own
    ``enable_gradient_checkpointing`` (for a text-to-image teacher in training, the one it wraps)."""
    inner = getattr(model, "transformer", model)
    if hasattr(model, "grad_checkpoint"):
        model.grad_checkpoint = True
    elif getattr(inner, "_supports_gradient_checkpointing", False):
        inner.enable_gradient_checkpointing()
    else:
        raise RobuqError(f"--grad-checkpoint: {type(inner).__name__} has no gradient checkpointing switch")


def _config_dict(model: nn.Module) -> dict[str, Any]:
    """The model's configuration as JSON-ready data (robuq's config objects, or a diffusers model's config)."""
    config = model.config
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def _next_batch(loader) -> tuple[torch.Tensor, torch.Tensor]:
    """The loader's next batch. A DataLoader worker's CorruptImageError arrives re-raised with the worker's
    traceback as its text; the user needs only the original line (which image, what to do)."""
    try:
        return next(loader)
    except CorruptImageError as exc:
        raise CorruptImageError(str(exc).strip().splitlines()[-1].split("CorruptImageError: ", 1)[-1]) from None


def _steps(state: StepState, run: LoopRun, batches, start: int, stop: int, conditioned: bool, meta: dict) -> None:
    """Steps start … stop − 1, one batch each: the step, then the probe, the log and the checkpoint due after it."""
    config, info, device = state.config, state.info, state.device
    out_dir, sharded = Path(config.out_dir), config.shard == "fsdp"
    bar = tqdm(
        range(start, stop),
        initial=start,
        total=stop,
        desc="train",
        disable=not (run.progress and info.is_main),
        dynamic_ncols=True,
    )
    window = LogWindow(out_dir / "log.jsonl", config.global_batch_size)
    for step, (x, y) in zip(bar, batches):
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True) if conditioned else None
        loss, grad_norm, losses = train_step(state, x, y, step)
        window.add(loss)
        done = step + 1
        probe_due = (
            run.probe is not None and config.probe_every > 0 and (done % config.probe_every == 0 or done == stop)
        )
        # A sharded EMA runs its forward on every process (each gathers its blocks' weights from the others).
        probed = run.probe(state.ema) if probe_due and (sharded or info.is_main) else {}
        if info.is_main and (done % config.log_every == 0 or done == stop or probe_due):
            record = window.write(done, learning_rate(config, step), grad_norm, losses, probed)
            bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.0f}")
        if done % config.ckpt_every == 0 or done == stop:
            _checkpoint(state, out_dir, done, meta, sharded)
    bar.close()


def _loop(
    config: LoopConfig,
    model: nn.Module,
    objective: Callable[..., dict[str, torch.Tensor]],
    dataset: Dataset,
    run: LoopRun,
    device: torch.device,
    info: DistInfo,
) -> Path:
    config.validate(info.world_size)
    out_dir = Path(config.out_dir)
    # Labels (or a text-conditioned model's caption ids) reach the objective; an unconditional model gets None.
    conditioned = getattr(model, "num_classes", 0) > 0 or getattr(dataset, "text_conditioning", False)
    sharded = config.shard == "fsdp"
    if sharded and not info.enabled:
        raise RobuqError("--shard fsdp shards the model over processes: run under torchrun with 2 or more")
    model = model.to(device)
    ema, optimizer = ema_and_optimizer(model, config, run.param_groups, shard=sharded)
    if sharded:
        _shard_frozen(model, run.frozen, info)
    meta = {"train_config": config.to_dict(), "model_config": _config_dict(model), **run.extra_meta}

    start = _restore(config, run, model, ema, optimizer, device)
    stop = min(config.steps, run.until) if run.until is not None else config.steps
    loader = _batches(config, dataset, info, device, start, stop)
    first = _next_batch(loader) if start < stop else None  # a first batch that cannot be read leaves no folder
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "config.json", json.dumps(config.to_dict(), indent=2) + "\n")
        _truncate_log(out_dir / "log.jsonl", start)
    if config.grad_checkpoint:
        enable_grad_checkpointing(model)
    # Gradients as views into DDP's buckets: one copy of them instead of two (1.3 GB at DiT-XL/2).
    net = DistributedDataParallel(model, gradient_as_bucket_view=True) if info.enabled and not sharded else model
    state = StepState(
        torch.compile(net) if config.compile else net, model, ema, optimizer, objective, config, info, device
    )
    model.train()
    batches = ((first if step == start else _next_batch(loader)) for step in range(start, stop))
    _steps(state, run, batches, start, stop, conditioned, meta)
    weights = model_state(ema) if stop == config.steps and (info.is_main or sharded) else None
    if info.is_main and stop == config.steps:
        save_tensors(out_dir / "model.safetensors", weights, {**meta, "kind": "model", "step": stop, "weights": "ema"})
    barrier(info)
    return out_dir


def _shard_frozen(model: nn.Module, frozen: tuple[nn.Module, ...], info: DistInfo) -> None:
    """Shard the modules the objective runs without training them, and say what is sharded."""
    for module in frozen:
        shard_blocks(module)
    if info.is_main:
        units = sum(1 for m in model.modules() if isinstance(m, FSDPModule))
        others = sum(1 for f in frozen for m in f.modules() if isinstance(m, FSDPModule))
        print(
            f"FSDP2: {units} units sharded over {info.world_size} processes, and {others} of frozen modules",
            file=sys.stderr,
            flush=True,
        )


def _restore(
    config: LoopConfig, run: LoopRun, model: nn.Module, ema: nn.Module, optimizer: torch.optim.Optimizer, device
) -> int:
    """The step the run starts at: its newest checkpoint's (``resume``), another run's (``continue_from``), or 0;
    the weights, EMA and optimizer state restored from it after checking that the settings allow it."""
    out_dir = Path(config.out_dir)
    found = list_checkpoints(out_dir) if run.resume else []
    if run.resume and not found:
        raise RobuqFileNotFoundError(f"--resume: no checkpoint under {out_dir / 'checkpoints'}; start without --resume")
    if found:
        start, path = found[-1]
        header = read_meta(path)
        _check_resumable(header.get("train_config", {}), config, path)
        _check_same_meta(header, run.extra_meta, path)
        load_training_state(path, model, ema, optimizer, device)
        return start
    if config.continue_from:
        path = Path(config.continue_from)
        _check_resumable(read_meta(path).get("train_config", {}), config, path, only=_LOOP_FIELDS)
        return int(load_training_state(path, model, ema, optimizer, device)["step"])
    return 0


def _batches(config: LoopConfig, dataset: Dataset, info: DistInfo, device: torch.device, start: int, stop: int):
    """An iterator over this process's batches of steps start … stop − 1, in the run's fixed order."""
    mirrors = config.flip and bool(getattr(dataset, "has_mirrors", False))
    batches = StepBatches(len(dataset), config.global_batch_size, config.seed, info, mirrors)
    return iter(
        torch.utils.data.DataLoader(
            dataset,
            batch_sampler=StepBatchSampler(batches, start, stop),
            num_workers=loader_workers(config, dataset, info),
            pin_memory=device.type == "cuda",
            generator=torch.Generator().manual_seed(config.seed),  # not the global RNG
        )
    )


class LogWindow:
    """The losses since the last line of ``log.jsonl``, and the writing of that line."""

    def __init__(self, path: Path, batch: int):
        self.path, self.batch = path, batch
        self.total, self.count, self.since = 0.0, 0, time.perf_counter()

    def add(self, loss: torch.Tensor) -> None:
        self.total, self.count = self.total + loss.item(), self.count + 1

    def write(self, step: int, lr: float, grad_norm, losses: dict[str, torch.Tensor], probed: dict) -> dict:
        """One line: the window's mean loss, the step's learning rate, gradient norm and every loss term the
        objective reported (its per-sample means), the throughput, and the probe's numbers when it ran."""
        record = {
            "step": step,
            "loss": self.total / self.count,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "images_per_s": self.count * self.batch / (time.perf_counter() - self.since),
            "time": time.time(),
            **{k: float(v.detach().mean()) for k, v in losses.items() if k != "loss"},
            **probed,
        }
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        self.total, self.count, self.since = 0.0, 0, time.perf_counter()
        return record


def _checkpoint(state: "StepState", out_dir: Path, step: int, meta: dict, sharded: bool) -> None:
    """The training state at ``step`` (gathered from every process when sharded), the oldest ones pruned."""
    info, config = state.info, state.config
    if info.is_main or sharded:
        save_training_state(
            checkpoint_path(out_dir, step), state.model, state.ema, state.optimizer, step, meta, write=info.is_main
        )
    if info.is_main:
        for _, old in list_checkpoints(out_dir)[: -config.keep_checkpoints]:
            old.unlink()
    barrier(info)


def shard_blocks(model: nn.Module) -> None:
    """FSDP2 over ``model``: each block of its outermost block lists (a DiT's ``blocks``, a diffusers model's
    ``transformer_blocks`` and ``single_transformer_blocks``) one unit, gathered for its own forward and
    backward only, and the rest (embedders, final layer) the root unit."""
    from torch.distributed.fsdp import fully_shard

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(child, nn.ModuleList):
                for block in child:
                    fully_shard(block)
            else:
                visit(child)

    visit(model)
    fully_shard(model)
    # FSDP2 leaves the root unit gathered after a forward with no backward (the EMA's probe, a frozen teacher):
    # shard it again, or the next EMA update would mix whole tensors with shards (and hold the memory).
    model.register_forward_hook(lambda module, args, output: module.reshard())


def ema_and_optimizer(
    model: nn.Module,
    config: LoopConfig,
    param_groups: Callable[[nn.Module], list[dict]] | None = None,
    shard: bool = False,
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The loop's frozen EMA copy of ``model`` and its AdamW over the trainable parameters (in the groups
    ``param_groups(model)`` gives, each with an ``lr_scale``; default one group at scale 1); with ``shard``,
    model and EMA sharded alike (``shard_blocks``) before the optimizer takes the shards."""
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    if shard:
        shard_blocks(model)
        shard_blocks(ema)
    groups = (
        param_groups(model)
        if param_groups is not None
        else [{"params": [p for p in model.parameters() if p.requires_grad]}]
    )
    groups = [{"lr_scale": 1.0, **g, "params": list(g["params"])} for g in groups]
    groups = [g for g in groups if g["params"]]
    return ema, torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)


@dataclass
class StepState:
    """What every step of the loop works on: the model and ``net`` (the model itself, or its DDP or compiled
    wrapper), its EMA, the optimizer, the objective, the run's config and where it runs."""

    net: nn.Module
    model: nn.Module
    ema: nn.Module
    optimizer: torch.optim.Optimizer
    objective: Callable[..., dict[str, torch.Tensor]]
    config: LoopConfig
    info: DistInfo
    device: torch.device


@dataclass
class LoopRun:
    """How one call runs the loop (``train_loop``'s keyword arguments)."""

    resume: bool = False
    until: int | None = None
    extra_meta: dict[str, Any] = field(default_factory=dict)
    progress: bool = True
    probe: Callable[[nn.Module], dict[str, float]] | None = None
    param_groups: Callable[[nn.Module], list[dict]] | None = None
    frozen: tuple[nn.Module, ...] = ()  # modules the objective runs but does not train (QAT's teacher)


def train_step(
    state: StepState, x: torch.Tensor, y: torch.Tensor | None, step: int
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Step ``step`` of the loop on the batch (x, y): the objective through ``state.net`` under the config's
    precision, its randomness drawn from (seed, step, rank); backward, clipping, AdamW at the scheduled
    learning rate, the EMA update. Returns (mean loss, gradient norm, losses).

    A non-finite loss on any rank stops every rank at this step, before the backward pass: a rank that raised
    alone would leave the others waiting in the gradient all-reduce until the group's timeout."""
    net, model, ema, optimizer, objective = state.net, state.model, state.ema, state.optimizer, state.objective
    config, info, device = state.config, state.info, state.device
    rank = info.rank
    rng_devices = [device] if device.type == "cuda" else []
    generator = torch.Generator().manual_seed(step_seed(config.seed, step, rank))
    with torch.random.fork_rng(devices=rng_devices), precision_context(config.precision, device):
        torch.manual_seed(step_seed(config.seed, step, rank))  # any randomness of the model's own
        losses = objective(net, x, y, generator)
    loss = losses["loss"].float().mean()
    finite = bool(torch.isfinite(loss))
    if any_rank(info, not finite, device) and finite:
        raise TrainingDivergedError(f"non-finite loss on another rank at step {step}; the last checkpoint is intact")
    if not finite:

        def rerun() -> object:
            with torch.random.fork_rng(devices=rng_devices):
                torch.manual_seed(step_seed(config.seed, step, rank))
                return objective(model, x, y, torch.Generator().manual_seed(step_seed(config.seed, step, rank)))

        # A sharded model cannot be re-run by this process alone: the others are not in the forward pass.
        where = None if is_sharded(model) else first_nonfinite_module(model, rerun)
        origin = f", first in module {where!r}" if where else ""
        where_rank = f" on rank {rank}" if info.enabled else ""
        raise TrainingDivergedError(
            f"non-finite loss ({loss.item()}) at step {step}{where_rank}{origin}; the last checkpoint is intact"
        )
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(config, step) * group.get("lr_scale", 1.0)
    optimizer.zero_grad(set_to_none=True)  # a no-op but for gradients a caller left on the model
    loss.backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip if config.grad_clip > 0 else float("inf"))
    if isinstance(grad_norm, DTensor):  # sharded gradients: the norm over every process's shards
        grad_norm = grad_norm.full_tensor()
    if not torch.isfinite(grad_norm):
        where = None if is_sharded(model) else first_nonfinite_grad(model)
        origin = f", first in the gradient of {where!r}" if where else ""
        raise TrainingDivergedError(f"non-finite gradient norm at step {step}{origin}; the last checkpoint is intact")
    optimizer.step()
    # Gradients live from the backward pass to the optimizer step only: kept until the next step's forward
    # pass, they would add a whole gradient copy to its peak memory (and to checkpointing's).
    optimizer.zero_grad(set_to_none=True)
    decay = min(config.ema_decay, (1 + step) / (10 + step)) if config.ema_warmup else config.ema_decay
    update_ema(ema, model, decay)
    return loss, grad_norm, losses


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines written after ``step`` so a resumed run's log reads as one continuous run."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))
