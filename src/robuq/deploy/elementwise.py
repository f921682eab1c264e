"""A DiT's elementwise inference work through robuq's C kernels: tanh-GELU (inside an integer fc1's
epilogue where there is one), and each adaLN LayerNorm + modulation and gated residual update fused into
one pass each.

PyTorch spends two or three passes over the tokens on each of these (``modulate(norm(x), shift, scale)``
is a LayerNorm, a multiply and an add). The model gives each its own module (``ModulatedLayerNorm``,
``GatedResidual``, the activation), and ``use_native_kernels`` fills those seams with the kernels; the
blocks' own ``forward`` stays the model's. Anything but float32 CPU inference (gradients, other devices
and dtypes) takes the PyTorch code of the module replaced.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn as nn

from robuq.deploy.integer_linear import IntegerLinear
from robuq.kernels import native
from robuq.models.dit import GatedResidual, Mlp, ModulatedLayerNorm
from robuq.quant.backends import wants_grad


def _native_inference(module: nn.Module, *inputs: torch.Tensor) -> bool:
    """Float32 CPU inputs, and no gradient wanted through the module (the C kernels have no backward)."""
    return native.takes(*inputs) and not wants_grad(itertools.chain(inputs, module.parameters()))


class NativeGELU(nn.GELU):
    """tanh-GELU on robuq's C kernel (PyTorch's took 2.3–2.7× as long on a 2-core x86 CPU:
    results/cpu_kernels.md); the same values to ~4e-7 absolute."""

    def __init__(self) -> None:
        super().__init__(approximate="tanh")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return native.gelu_tanh(x) if _native_inference(self, x) else super().forward(x)


class NativeModulatedLayerNorm(ModulatedLayerNorm):
    """ModulatedLayerNorm in one C pass over the tokens."""

    def forward(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        if _native_inference(self, x, shift, scale):
            return native.layer_norm_modulate(x, shift, scale, self.eps)
        return super().forward(x, shift, scale)


class NativeGatedResidual(GatedResidual):
    """GatedResidual in one C pass over the tokens."""

    def forward(self, x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if _native_inference(self, x, gate, y):
            return native.gated_residual(x, gate, y)
        return super().forward(x, gate, y)


def _native_twin(module: nn.Module) -> nn.Module | None:
    """The kernel-backed module that replaces ``module``, or None if there is none."""
    if type(module) is ModulatedLayerNorm:
        return NativeModulatedLayerNorm(module.normalized_shape[-1], eps=module.eps)
    if type(module) is GatedResidual:
        return NativeGatedResidual()
    if _is_tanh_gelu(module) and not isinstance(module, NativeGELU):
        return NativeGELU()
    return None


def use_native_kernels(model: nn.Module) -> nn.Module:
    """Fill, in place, a DiT's elementwise seams with robuq's C kernels (every tanh-GELU, modulated
    LayerNorm and gated residual); returns the model. The replaced modules hold no state, so parameters,
    buffers and the state dict's keys are untouched."""
    for module in model.modules():
        if isinstance(module, Mlp) and isinstance(module.fc1, IntegerLinear) and _is_tanh_gelu(module.act):
            module.fc1.gelu = True  # the GELU runs in fc1's epilogue, on values still in cache
            module.act = nn.Identity()
    for name, module in list(model.named_modules()):
        twin = _native_twin(module)
        if twin is not None:
            model.set_submodule(name, twin)
    return model


def _is_tanh_gelu(module: nn.Module) -> bool:
    return isinstance(module, nn.GELU) and module.approximate == "tanh"
