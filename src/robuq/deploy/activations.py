"""Inference activations through robuq's C kernels, swapped into exported models."""
from __future__ import annotations

import torch
import torch.nn as nn

from robuq.kernels import native


class NativeGELU(nn.GELU):
    """tanh-GELU that runs on robuq's C kernel for float32 CPU inference (PyTorch's took 2.3–2.7× as long on a
    2-core x86 CPU: results/cpu_kernels.md); the same values to ~4e-7 absolute, PyTorch's path otherwise."""

    def __init__(self) -> None:
        super().__init__(approximate="tanh")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if native.takes(x) and not (torch.is_grad_enabled() and x.requires_grad):
            return native.gelu_tanh(x)
        return super().forward(x)


def use_native_activations(model: nn.Module) -> nn.Module:
    """Replace, in place, every ``nn.GELU(approximate="tanh")`` with a ``NativeGELU``; returns the model."""
    targets = [name for name, m in model.named_modules()
               if type(m) is nn.GELU and m.approximate == "tanh"]
    for name in targets:
        model.set_submodule(name, NativeGELU())
    return model
