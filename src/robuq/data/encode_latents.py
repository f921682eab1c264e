"""``robuq latents``: encode an ImageNet-style folder through the VAE into a latent cache (robuq.data.latents).

Under torchrun, rank r encodes shards r, r+W, r+2W, … of those not yet on disk; each shard's posterior
noise comes from a generator seeded by (seed, shard), so the cache is the same whatever the number of
processes and however often the run was interrupted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from robuq.core.files import save_tensors
from robuq.core.options import option
from robuq.core.runtime import DEVICE_HELP, device_context, resolve_device
from robuq.data.image_stream import StreamingImageFolder
from robuq.data.latents import LatentIndex, missing_shards, shard_path, write_index
from robuq.data.vae import encode, load_vae, vae_geometry
from robuq.core.distributed import (
    DEFAULT_TIMEOUT_HOURS,
    LONG_WAIT_HOURS,
    TIMEOUT_HELP,
    barrier,
    init_distributed,
    shutdown,
    wait_for_files,
)
from robuq.core.errors import RobuqError


@dataclass
class LatentsConfig:
    """``robuq latents``: an image folder (a sub-folder per class) encoded into a sharded latent cache."""

    images: str | None = option(
        None, "image folder with one sub-folder per class (ImageNet's train/ layout)", positional=True
    )
    vae: str | None = option(None, "local AutoencoderKL: a save_pretrained folder, or a single file with --vae-config")
    vae_config: str | None = option(None, "the config.json (or its folder) of a single-file --vae")
    out: str = option("latents", "cache folder: index.json and shard-*.safetensors")
    image_size: int = option(
        256,
        "side of the centre crop (ADM's) fed to the VAE; latents are smaller by the VAE's "
        "downsampling factor (8 for the SD VAE)",
    )
    flip: bool = option(
        False,
        "also encode every image mirrored (stored as latents_flip; training picks one of the two per sample and epoch)",
    )
    shard_size: int = option(1024, "images per shard file; a shard is the unit of resumption and of work per process")
    batch_size: int = option(32, "images per VAE forward pass")
    num_workers: int = option(4, "DataLoader worker processes decoding images")
    seed: int = option(0, "seed of the posterior samples (each shard draws from (seed, shard))")
    device: str = option("auto", DEVICE_HELP)
    dist_timeout_hours: float = option(DEFAULT_TIMEOUT_HOURS, TIMEOUT_HELP)


def _shard_latents(
    vae, dataset: StreamingImageFolder, rows: range, config: LatentsConfig, seed: int, device: torch.device, bar
) -> tuple[torch.Tensor, torch.Tensor]:
    loader = DataLoader(
        Subset(dataset, rows),
        batch_size=config.batch_size,
        num_workers=config.num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(seed),
    )  # not the global RNG
    generator = torch.Generator().manual_seed(seed)
    latents, labels = [], []
    for x, y in loader:
        latents.append(encode(vae, x.to(device, non_blocking=True), generator).cpu())
        labels.append(y)
        bar.update(len(y))
    return torch.cat(latents), torch.cat(labels)


def encode_latents(config: LatentsConfig, progress: bool = True) -> Path:
    """Encode ``config.images`` into the cache ``config.out`` (skipping finished shards); returns the folder."""
    if not config.images or not config.vae:
        raise RobuqError("give the image folder and the VAE: robuq latents IMAGES --vae VAE_DIR")
    device = resolve_device(config.device)
    info = init_distributed(device, config.dist_timeout_hours)
    current = device_context(device)
    try:
        with current:
            return _encode(config, progress, device, info)
    finally:
        shutdown(info)


def _encode(config: LatentsConfig, progress: bool, device: torch.device, info) -> Path:
    dataset = StreamingImageFolder(config.images, config.image_size)
    vae = load_vae(config.vae, config.vae_config, device)
    geometry = vae_geometry(vae)
    if config.image_size % geometry.downsample:
        raise RobuqError(
            f"--image-size {config.image_size} is not a multiple of {geometry.downsample}, the factor "
            f"{config.vae} downsamples by"
        )
    side = config.image_size // geometry.downsample
    index = LatentIndex(
        num_images=len(dataset),
        shard_size=config.shard_size,
        latent_shape=(geometry.channels, side, side),
        scale=geometry.scale,
        flip=config.flip,
        image_size=config.image_size,
        class_names=dataset.class_names,
        vae=str(config.vae),
        downsample=geometry.downsample,
        shift=geometry.shift,
    )
    out = Path(config.out)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_index(out, index)
    barrier(info)
    if not info.is_main:
        write_index(out, index)  # only checks: every rank must be encoding the same cache
    todo = [k for k in missing_shards(out, index) if k % info.world_size == info.rank]
    total = sum(len(index.shard_range(k)) for k in todo) * (2 if config.flip else 1)
    with tqdm(
        total=total, desc=f"latents (rank {info.rank})", unit="img", disable=not progress, dynamic_ncols=True
    ) as bar:
        for k in todo:
            rows = index.shard_range(k)
            latents, labels = _shard_latents(vae, dataset, rows, config, config.seed * 1_000_003 + 2 * k, device, bar)
            tensors = {"latents": latents, "labels": labels}
            if config.flip:
                mirrored = range(len(dataset) + rows.start, len(dataset) + rows.stop)  # the folder's mirrored indices
                tensors["latents_flip"], _ = _shard_latents(
                    vae, dataset, mirrored, config, config.seed * 1_000_003 + 2 * k + 1, device, bar
                )
            save_tensors(shard_path(out, k), tensors, {"kind": "latent-shard", "shard": k, "first": rows.start})
    if info.is_main:  # uneven shares of shards: poll for the others' files rather than wait in a barrier
        wait_for_files(
            [shard_path(out, k) for k in range(index.num_shards)], max(config.dist_timeout_hours, LONG_WAIT_HOURS)
        )
    return out
