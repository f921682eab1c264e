"""``robuq sample``: sample any model file into a PNG grid (a row per class) and an ADM-style ``.npz``."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from robuq.core.runtime import default_teacher_path, resolve_device
from robuq.io.model_files import load_any
from robuq.sample.generate import generate, save_grid, to_uint8


@dataclass
class SampleConfig:
    ckpt: str | None = None
    out: str = "samples"
    per_class: int = 8
    num_samples: int | None = None
    sampler: str = "ddpm"
    steps: int = 100
    cfg_scale: float = 1.5
    seed: int = 0
    batch_size: int = 100
    device: str = "auto"
    retain_memory: bool = True  # exported models: keep freed memory in the process (see load_exported)


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
