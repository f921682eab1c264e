"""The Stable-Diffusion VAE DiT works in: diffusers' ``AutoencoderKL`` from the user's own files.

diffusers is an optional dependency (``pip install robuq[vae]``), imported only when a VAE is loaded.
Nothing is fetched from a hub: a folder (``save_pretrained`` layout, e.g. stabilityai/sd-vae-ft-ema
downloaded beforehand) or a single checkpoint file (the original LDM layout, e.g. vae-ft-ema-560000-ema-pruned,
or diffusers' own) with ``config`` pointing at such a folder's config.json.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from robuq.core.errors import RobuqError, RobuqFileNotFoundError

# The SD VAE's ``scaling_factor``, which DiT's checkpoints were trained with; a VAE whose config lacks one gets it.
LATENT_SCALE = 0.18215


@dataclass(frozen=True)
class VAEGeometry:
    """How a VAE's latents relate to its images, read off its config: ``downsample``× smaller sides,
    ``channels`` channels, and latent = (posterior sample − ``shift``) × ``scale``, so that DiT sees
    roughly unit variance."""

    downsample: int
    channels: int
    scale: float
    shift: float = 0.0


def vae_geometry(vae: nn.Module) -> VAEGeometry:
    """The geometry of a diffusers ``AutoencoderKL``: each encoder block but the last halves the sides."""
    config = vae.config
    scale = getattr(config, "scaling_factor", None)
    shift = getattr(config, "shift_factor", None)
    return VAEGeometry(
        downsample=2 ** (len(config.block_out_channels) - 1),
        channels=int(config.latent_channels),
        scale=float(LATENT_SCALE if scale is None else scale),
        shift=float(shift or 0.0),
    )


def _autoencoder_class():
    try:
        from diffusers import AutoencoderKL
    except ImportError as exc:
        raise ImportError("the VAE needs diffusers: pip install 'robuq[vae]' (or pip install diffusers)") from exc
    return AutoencoderKL


def _load(build, path: Path) -> nn.Module:
    """``build()``, with diffusers' errors for files it cannot read (OSError for a bad config or weights file,
    ValueError and RuntimeError for contents that do not fit an AutoencoderKL) as one line naming ``path``."""
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # its notes on optional packages say nothing about the user's files
    try:
        return build()
    except (OSError, ValueError, RuntimeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RobuqError(f"--vae {path} cannot be loaded as an AutoencoderKL: {reason}") from None
    finally:
        diffusers_logging.set_verbosity(verbosity)


def load_vae(
    path: str | os.PathLike,
    config: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """An ``AutoencoderKL`` in eval mode without gradients, from a folder or a single file (local only)."""
    AutoencoderKL = _autoencoder_class()
    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise RobuqFileNotFoundError(
                f"{path} has no config.json: give a folder written by AutoencoderKL.save_pretrained "
                "(e.g. a local copy of stabilityai/sd-vae-ft-ema)"
            )
        vae = _load(lambda: AutoencoderKL.from_pretrained(str(path), local_files_only=True, torch_dtype=dtype), path)
    elif path.is_file():
        if config is None:
            raise RobuqError(
                f"{path} is a single file: also give the folder of its config.json (--vae-config), "
                "robuq never fetches a configuration from a hub"
            )
        config = Path(config)
        folder = config.parent if config.name == "config.json" and config.is_file() else config
        if not (folder / "config.json").is_file():
            raise RobuqFileNotFoundError(
                f"--vae-config {config} holds no config.json: give the folder of the VAE's config.json "
                "(e.g. a local copy of stabilityai/sd-vae-ft-ema) or that file itself"
            )
        vae = _load(
            lambda: AutoencoderKL.from_single_file(
                str(path), config=str(folder), local_files_only=True, torch_dtype=dtype
            ),
            path,
        )
    else:
        raise RobuqFileNotFoundError(f"VAE {path} does not exist; give a local folder or file")
    return vae.to(device).eval().requires_grad_(False)


@torch.no_grad()
def encode(vae: nn.Module, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Images in [-1, 1] → latents, shifted and scaled by the VAE's geometry, sampled from the posterior with
    ``generator`` as DiT does (its extract_features takes ``latent_dist.sample()``; None: the posterior's mode)."""
    geometry = vae_geometry(vae)
    posterior = vae.encode(images.to(vae.dtype)).latent_dist
    if generator is None:
        sample = posterior.mode()
    else:  # DiagonalGaussianDistribution.sample draws on the generator's device; the CPU's draws are device-independent
        noise = torch.randn(posterior.mean.shape, generator=generator).to(posterior.mean.device, posterior.mean.dtype)
        sample = posterior.mean + posterior.std * noise
    return (sample.float() - geometry.shift) * geometry.scale


@torch.no_grad()
def decode(vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Latents (as ``encode`` makes them) → images in [-1, 1] (clamped)."""
    geometry = vae_geometry(vae)
    return vae.decode((latents / geometry.scale + geometry.shift).to(vae.dtype)).sample.float().clamp(-1, 1)
