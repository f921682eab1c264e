"""``robuq sample``: sample any model file into a PNG grid (a row per class) and an ADM-style ``.npz``."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from robuq.core.options import option
from robuq.core.runtime import default_teacher_path, resolve_device
from robuq.io.model_files import load_any
from robuq.sample.generate import generate, save_grid, to_uint8


@dataclass
class SampleConfig:
    """``robuq sample``: a model file's samples as a PNG grid and an ADM-style .npz."""

    ckpt: str | None = option(None, "model file: full-precision, quantized or exported (default: the shipped teacher)")
    out: str = option("samples", "output folder for grid.png and samples.npz")
    per_class: int = option(8, "images per class (class-conditional models; a row per class in the grid)")
    num_samples: int | None = option(None, "how many images an unconditional model draws (default 64)")
    sampler: str = option("ddpm", "respaced DDPM or deterministic DDIM", choices=("ddpm", "ddim"))
    steps: int = option(100, "sampling steps (respaced from the 1,000 training steps)")
    cfg_scale: float = option(1.5, "classifier-free guidance scale (1: none)")
    seed: int = option(0, "seed of all sampling noise (the same seed gives the same images on any device)")
    batch_size: int = option(100, "images per forward pass")
    device: str = option("auto", "'auto' (a GPU when CUDA is available, else the CPU), 'cpu' or 'cuda[:N]'")
    retain_memory: bool = option(True, "exported models: keep freed memory in the process instead of returning it "
                                       "to the OS (faster integer inference; see load_exported)")


def sample_to_files(config: SampleConfig) -> dict[str, Path]:
    """Sample a model file and write ``grid.png`` (one row per class) and ``samples.npz`` (``arr_0``: uint8 NHWC)."""
    model = load_any(config.ckpt or default_teacher_path(), retain_memory=config.retain_memory)
    model = model.to(resolve_device(config.device))
    if model.num_classes > 0:
        labels = torch.arange(model.num_classes).repeat_interleave(config.per_class)
        columns = config.per_class
    else:
        labels, columns = None, 8
    n = len(labels) if labels is not None else (config.num_samples or 64)
    images = generate(model, labels, n, config.sampler, config.steps, config.cfg_scale, config.seed, config.batch_size)
    pixels = to_uint8(images)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    npz = out / "samples.npz"
    np.savez(npz, arr_0=pixels, labels=(labels.numpy() if labels is not None else np.zeros(n, dtype=np.int64)))
    return {"grid": save_grid(pixels, out / "grid.png", columns), "npz": npz}
