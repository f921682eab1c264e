"""``robuq sample``: sample any model file into a PNG grid (a row per class) and an ADM-style ``.npz``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from robuq.core.files import save_npz
from robuq.core.distributed import DEFAULT_TIMEOUT_HOURS, TIMEOUT_HELP, init_distributed, shutdown
from robuq.core.options import check_choice, option
from robuq.core.runtime import DEVICE_HELP, PRECISIONS, default_teacher_path, device_context, resolve_device
from robuq.io.model_files import load_any
from robuq.data.vae import decode, load_vae, vae_geometry
from robuq.sample.at_scale import sample_shards
from robuq.data.captions import latents_to_pixels
from robuq.io.prompts import load_prompt_table
from robuq.models.families import family_of, model_family
from robuq.sample.family_sampler import sample_latents
from robuq.sample.generate import generate, row_names, save_grid, to_uint8
from robuq.sample.text_to_image import sample_text_to_image
from robuq.core.errors import RobuqError

CLASS_CONDITIONAL = ("dit", "diffusers")  # the families robuq samples with its own diffusion code


@dataclass
class SampleConfig:
    """``robuq sample``: a model file's samples as a PNG grid and an ADM-style .npz."""

    ckpt: str | None = option(None, "model file: full-precision, quantized or exported (default: the shipped teacher)")
    out: str = option("samples", "output folder for grid.png and samples.npz")
    per_class: int = option(8, "images per class (class-conditional models; a row per class in the grid)")
    num_samples: int | None = option(
        None,
        "draw this many images for evaluation (e.g. 50000): labels at random "
        "(--labels), per-process shards under torchrun, resumable, merged into "
        "samples.npz; without it: --per-class images per class (unconditional: 64)",
    )
    labels: str = option(
        "uniform",
        "labels with --num-samples: uniform at random (as DiT's sample_ddp.py) or class-balanced",
        choices=("uniform", "balanced"),
    )
    shard_size: int = option(1000, "images per shard file with --num-samples (the unit of resumption)")
    vae: str | None = option(
        None, "decode latents through this local AutoencoderKL (folder, or file with --vae-config)"
    )
    vae_config: str | None = option(None, "the config.json (or its folder) of a single-file --vae")
    cfg_channels: int | None = option(
        None,
        "guide only the first N noise channels (3: the reference DiT's behaviour, "
        "for its published numbers); default: all",
    )
    sampler: str = option("ddpm", "respaced DDPM or deterministic DDIM", choices=("ddpm", "ddim"))
    steps: int = option(100, "sampling steps (respaced from the 1,000 training steps)")
    cfg_scale: float = option(
        1.5,
        "classifier-free guidance scale (1: none); text-to-image families keep their "
        "pipeline's own default unless another value is given",
    )
    seed: int = option(0, "seed of all sampling noise (the same seed gives the same images on any device)")
    batch_size: int = option(100, "images per forward pass")
    dist_timeout_hours: float = option(DEFAULT_TIMEOUT_HOURS, TIMEOUT_HELP)
    precision: str = option(
        "fp32",
        "fp32; tf32 (CUDA matmuls in TF32); bf16 (autocast; quantizer statistics, scales and "
        "rounding stay fp32, as in training)",
        choices=PRECISIONS,
    )
    device: str = option("auto", DEVICE_HELP)
    retain_memory: bool = option(
        True,
        "exported models: keep freed memory in the process instead of returning it "
        "to the OS (faster integer inference; see load_exported)",
    )
    pipeline: str | None = option(
        None,
        "text-to-image families (PixArt, SD3, FLUX, Sana): a local folder of the family's "
        "diffusers pipeline whose VAE and scheduler sample the model (no text encoder is read)",
    )
    prompt_embeds: str | None = option(
        None,
        "text-to-image families: a safetensors file of cached prompt embeddings "
        "(prompt_embeds, and pooled_prompt_embeds / masks / negative_* where the "
        "family's pipeline takes them), one image per row",
    )
    height: int | None = option(None, "text-to-image families: image height (default: the pipeline's)")
    width: int | None = option(None, "text-to-image families: image width (default: the pipeline's)")
    latent_decode: str | None = option(
        None,
        "text-to-image families without --pipeline: sample the transformer directly from a prompt table "
        "(--prompt-embeds) and turn latents into pixels by space-to-depth (robuq's text-to-image miniature: "
        "each latent position holds 2 × 2 grey pixels)",
        choices=(None, "space-to-depth"),
    )
    prompts: str | None = option(
        None,
        "with --latent-decode: a text file of prompts from the table, one per line, to sample (default: "
        "every prompt but the empty one); --num-samples draws them at random, else each once",
    )


def _sample_from_table(config: SampleConfig, model, progress: bool) -> dict[str, Path]:
    """The transformer sampled directly from a prompt table, latents decoded as ``--latent-decode`` says;
    ``labels`` in the .npz: each sample's prompt's line in ``--prompts`` (or row − 1 in the table)."""
    table = load_prompt_table(config.prompt_embeds)
    prompts = Path(config.prompts).read_text().splitlines() if config.prompts else table.prompts[1:]
    rows = table.index(prompts)
    if config.num_samples is not None:
        which = torch.randint(
            0, len(prompts), (config.num_samples,), generator=torch.Generator().manual_seed(config.seed)
        )
    else:
        which = torch.arange(len(prompts))
    side = (config.height or 28) // 2, (config.width or 28) // 2
    latents = sample_latents(
        model,
        table,
        rows[which],
        (family_of(model).latent_channels(model), *side),
        steps=config.steps,
        guidance=config.cfg_scale,
        seed=config.seed,
        shard_size=config.shard_size,
        progress=progress,
        clip=True,  # space-to-depth latents are pixels in [-1, 1]
    )
    grey = latents_to_pixels(latents)
    pixels = np.repeat(grey[..., None], 3, axis=-1)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    npz = out / "samples.npz"
    save_npz(npz, arr_0=pixels, labels=which.numpy())
    return {"grid": save_grid(pixels[:64], out / "grid.png", 8, scale=2), "npz": npz}


def _sample_text_to_image(config: SampleConfig, model, device, progress: bool = True) -> dict[str, Path]:
    if config.latent_decode and config.pipeline:
        raise RobuqError("--latent-decode samples without a pipeline; give it or --pipeline, not both")
    if config.latent_decode and config.prompt_embeds:
        return _sample_from_table(config, model, progress)
    if not config.pipeline or not config.prompt_embeds:
        raise RobuqError(
            f"a {model_family(model)} model samples through its diffusers pipeline from cached prompt "
            "embeddings: give --pipeline FOLDER (its vae/ and scheduler/) and --prompt-embeds FILE"
        )
    pixels = sample_text_to_image(
        model,
        config.pipeline,
        config.prompt_embeds,
        config.steps,
        config.height,
        config.width,
        config.seed,
        None if config.cfg_scale == SampleConfig.cfg_scale else config.cfg_scale,
    )
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    npz = out / "samples.npz"
    save_npz(npz, arr_0=pixels, labels=np.arange(len(pixels)))  # labels: the prompt's row in --prompt-embeds
    return {"grid": save_grid(pixels, out / "grid.png", min(8, len(pixels)), scale=1), "npz": npz}


def sample_to_files(config: SampleConfig, progress: bool = True) -> dict[str, Path]:
    """Sample a model file and write ``grid.png`` and ``samples.npz`` (``arr_0``: uint8 NHWC, ``labels``):
    at scale with ``num_samples`` (see robuq.sample.at_scale), else one row per class."""
    check_choice(config, "labels")
    check_choice(config, "precision")
    device = resolve_device(config.device)
    model = load_any(config.ckpt or default_teacher_path(), retain_memory=config.retain_memory).to(device)
    if model_family(model) not in CLASS_CONDITIONAL:
        return _sample_text_to_image(config, model, device, progress)
    vae = load_vae(config.vae, config.vae_config, device) if config.vae else None
    if vae is not None and vae_geometry(vae).channels != model.in_channels:
        raise RobuqError(
            f"--vae {config.vae} makes {vae_geometry(vae).channels}-channel latents but the model denoises "
            f"{model.in_channels} channels; give the VAE whose latents it was trained on"
        )
    if config.num_samples is not None:
        return _sample_at_scale(config, model, vae, device, progress)
    return _sample_a_grid(config, model, vae, device, progress)


def _sample_at_scale(config: SampleConfig, model, vae, device: torch.device, progress: bool) -> dict[str, Path]:
    """``num_samples`` samples in resumable shards, split over torchrun's processes (robuq.sample.at_scale)."""
    info = init_distributed(device, config.dist_timeout_hours)
    current = device_context(device)
    try:
        with current:
            return sample_shards(
                model,
                config.out,
                config.num_samples,
                info,
                vae=vae,
                shard_size=config.shard_size,
                balanced=config.labels == "balanced",
                sampler=config.sampler,
                steps=config.steps,
                cfg_scale=config.cfg_scale,
                cfg_channels=config.cfg_channels,
                seed=config.seed,
                batch_size=config.batch_size,
                progress=progress,
                precision=config.precision,
                timeout_hours=config.dist_timeout_hours,
            )
    finally:
        shutdown(info)


def _sample_a_grid(config: SampleConfig, model, vae, device: torch.device, progress: bool) -> dict[str, Path]:
    """``per_class`` samples of every class, a row each (64 samples of an unconditional model)."""
    if model.num_classes > 0:
        labels = torch.arange(model.num_classes).repeat_interleave(config.per_class)
        columns = config.per_class
    else:
        labels, columns = None, 8
    n = len(labels) if labels is not None else 64
    images = generate(
        model,
        labels,
        n,
        config.sampler,
        config.steps,
        config.cfg_scale,
        config.seed,
        config.batch_size,
        progress=progress,
        cfg_channels=config.cfg_channels,
        clip_denoised=vae is None,
        precision=config.precision,
    )
    if vae is not None:
        images = decode(vae, images.to(device)).cpu()
    pixels = to_uint8(images)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    npz = out / "samples.npz"
    save_npz(npz, arr_0=pixels, labels=labels.numpy() if labels is not None else np.zeros(n, dtype=np.int64))
    names = row_names(model) if labels is not None else None
    return {"grid": save_grid(pixels, out / "grid.png", columns, row_labels=names), "npz": npz}
