"""A DiT's elementwise inference work through robuq's C kernels: tanh-GELU (inside an integer fc1's
epilogue where there is one), and each adaLN block's LayerNorm + modulation and gated residual updates
fused into one pass each.

PyTorch spends two or three passes over the tokens on each of these (``modulate(norm(x), shift, scale)``
is a LayerNorm, a multiply and an add). ``use_native_kernels`` swaps them into a model for float32 CPU
inference; anything else (gradients, other devices and dtypes) takes the model's own PyTorch code.
"""
from __future__ import annotations

import itertools

import torch
import torch.nn as nn

from robuq.deploy.integer_linear import IntegerLinear
from robuq.kernels import native
from robuq.quant.backends import wants_grad
from robuq.models.dit import DiTBlock, FinalLayer, Mlp


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


class NativeDiTBlock(DiTBlock):
    """DiTBlock whose norm + modulation and gated residuals each take one C pass (same modules and names,
    so it loads the same state dicts)."""

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if not _native_inference(self, x, c):
            return super().forward(x, c)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        h = native.layer_norm_modulate(x, shift_msa, scale_msa, self.norm1.eps)
        x = native.gated_residual(x, gate_msa, self.attn(h))
        h = native.layer_norm_modulate(x, shift_mlp, scale_mlp, self.norm2.eps)
        return native.gated_residual(x, gate_mlp, self.mlp(h))


class NativeFinalLayer(FinalLayer):
    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if not _native_inference(self, x, c):
            return super().forward(x, c)
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(native.layer_norm_modulate(x, shift, scale, self.norm_final.eps))


_NATIVE_CLASSES = {DiTBlock: NativeDiTBlock, FinalLayer: NativeFinalLayer}


def use_native_kernels(model: nn.Module) -> nn.Module:
    """Swap, in place, robuq's C kernels into a DiT's elementwise work (every tanh-GELU, every block and
    final layer); returns the model. Parameters, buffers and module names are untouched."""
    for module in model.modules():
        if isinstance(module, Mlp) and isinstance(module.fc1, IntegerLinear) and _is_tanh_gelu(module.act):
            module.fc1.gelu = True  # the GELU runs in fc1's epilogue, on values still in cache
            module.act = nn.Identity()
    for name, module in list(model.named_modules()):
        if _is_tanh_gelu(module) and not isinstance(module, NativeGELU):
            model.set_submodule(name, NativeGELU())
        elif type(module) in _NATIVE_CLASSES:
            # Same state, only forward differs: a class change, not a copy of the block's weights.
            module.__class__ = _NATIVE_CLASSES[type(module)]
    return model


def _is_tanh_gelu(module: nn.Module) -> bool:
    return isinstance(module, nn.GELU) and module.approximate == "tanh"
