"""Shared fixtures: tiny data written by the tests themselves, so nothing depends on a download."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from robuq.data.fashion_mnist import write_idx
from robuq.models.dit import DiT, DiTConfig

torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_config(**overrides) -> DiTConfig:
    base = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=48, depth=2, num_heads=2, num_classes=10)
    base.update(overrides)
    return DiTConfig(**base)


def perturbed(model: DiT, std: float = 0.02) -> DiT:
    """``model`` with noise added to its trainable weights: adaLN-Zero starts with a zero output."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(std * torch.randn_like(p))
    return model


@pytest.fixture
def tiny_dit() -> DiT:
    torch.manual_seed(0)
    model = DiT(tiny_config())
    # adaLN-Zero starts with a zero output; perturb so tests see a non-trivial function.
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn_like(p))
    return model


@pytest.fixture
def fmnist_dir(tmp_path):
    """A Fashion-MNIST folder with 96 train and 32 test images of simple, class-dependent patterns."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 96), ("t10k", 32)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, label in enumerate(labels):
            images[i, 2 * label : 2 * label + 6, 4:24] = 230
        write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", labels)
    return tmp_path
