"""Sampling for evaluation at scale (e.g. 50,000 images): shards per process, one ADM-style .npz at the end.

As in DiT's sample_ddp.py, labels are drawn uniformly at random (or class-balanced). Unlike it, shard k's
labels and noise come from a generator seeded by (seed, k) alone, so the merged samples are the same for
any number of processes, and a killed run resumes by skipping the shards already written (each is
written atomically) — nothing finished is drawn again.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from robuq.core.distributed import DEFAULT_TIMEOUT_HOURS, LONG_WAIT_HOURS, DistInfo, wait_for_files
from robuq.core.files import merge_npz, save_npz
from robuq.data.vae import decode
from robuq.sample.generate import generate, save_grid, to_uint8


def shard_seed(seed: int, shard: int) -> int:
    return (seed * 1_000_003 + shard * 7919 + 17) % (2**63 - 1)


def shard_labels(
    num_classes: int, num_samples: int, shard: int, shard_size: int, seed: int, balanced: bool
) -> torch.Tensor | None:
    """Labels of shard ``shard``: uniform draws from its own generator, or a slice of one seeded permutation
    of ⌈N/C⌉ copies of every class (class-balanced); None for an unconditional model."""
    if num_classes == 0:
        return None
    rows = range(shard * shard_size, min(num_samples, (shard + 1) * shard_size))
    if balanced:
        g = torch.Generator().manual_seed(seed)
        everything = torch.arange(num_classes).repeat(math.ceil(num_samples / num_classes))
        return everything[torch.randperm(len(everything), generator=g)][rows.start : rows.stop]
    g = torch.Generator().manual_seed(shard_seed(seed, shard) ^ 0x5EED)
    return torch.randint(0, num_classes, (len(rows),), generator=g)


def sample_shards(
    model: nn.Module,
    out: str | Path,
    num_samples: int,
    info: DistInfo,
    *,
    vae: nn.Module | None = None,
    shard_size: int = 1000,
    balanced: bool = False,
    sampler: str = "ddpm",
    steps: int = 250,
    cfg_scale: float = 1.5,
    cfg_channels: int | None = None,
    seed: int = 0,
    batch_size: int = 100,
    progress: bool = True,
    precision: str = "fp32",
    timeout_hours: float = DEFAULT_TIMEOUT_HOURS,
) -> dict[str, Path]:
    """Write ``out/shards/shard-*.npz`` (this rank's share of those missing), then rank 0 merges them into
    ``out/samples.npz`` (``arr_0``: uint8 NHWC, ``labels``) and ``out/grid.png`` (the first 64)."""
    out = Path(out)
    num_shards = math.ceil(num_samples / shard_size)
    path = lambda k: out / "shards" / f"shard-{k:05d}.npz"  # noqa: E731
    todo = [k for k in range(num_shards) if k % info.world_size == info.rank and not path(k).is_file()]
    total = sum(min(shard_size, num_samples - k * shard_size) for k in todo)
    with tqdm(
        total=total, desc=f"sample (rank {info.rank})", unit="img", disable=not progress, dynamic_ncols=True
    ) as bar:
        for k in todo:
            n = min(shard_size, num_samples - k * shard_size)
            labels = shard_labels(model.num_classes, num_samples, k, shard_size, seed, balanced)
            images = generate(
                model,
                labels,
                n,
                sampler,
                steps,
                cfg_scale,
                shard_seed(seed, k),
                batch_size,
                progress=False,
                cfg_channels=cfg_channels,
                clip_denoised=vae is None,
                precision=precision,
            )
            if vae is not None:
                images = _decoded(vae, images, batch_size)
            ys = labels.numpy() if labels is not None else np.zeros(n, dtype=np.int64)
            save_npz(path(k), arr_0=to_uint8(images), labels=ys)
            bar.update(n)
    result = {"npz": out / "samples.npz", "grid": out / "grid.png"}
    if info.is_main:
        # Shards are uneven work (50 over 8 ranks: some ranks draw one more); rank 0 polls for the others' files
        # instead of waiting in a barrier, which a process group's collective timeout would end.
        shards = [path(k) for k in range(num_shards)]
        wait_for_files(shards, max(timeout_hours, LONG_WAIT_HOURS))
        merge_npz(result["npz"], shards, ("arr_0", "labels"))
        save_grid(_first_images(shards, 64), result["grid"], columns=8)
    return result


def _decoded(vae: nn.Module, latents: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Latents through the VAE's decoder in batches on its device, back on the CPU."""
    device = next(vae.parameters()).device
    return torch.cat(
        [decode(vae, latents[i : i + batch_size].to(device)).cpu() for i in range(0, len(latents), batch_size)]
    )


def _first_images(shards: list[Path], count: int) -> np.ndarray:
    """The first ``count`` images of the shards in order, reading no more shards than it needs."""
    shown: list[np.ndarray] = []
    for shard_path in shards:
        if sum(map(len, shown)) >= count:
            break
        with np.load(shard_path) as shard:
            shown.append(shard["arr_0"][: count - sum(map(len, shown))])
    return np.concatenate(shown)
