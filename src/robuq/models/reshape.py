"""Exact re-expressions of a layer that give each of its parts a quantizer of its own.

``JoinedInputLinear``: a linear whose input joins different sources (FLUX's single-stream ``proj_out``
reads ``[attention, MLP]``) as one linear per source, summed. ``PointwiseConv``: a 1×1 convolution as a
linear over channels. Both compute what the original computes (up to float summation order) and hold
plain ``nn.Linear`` parts that ``quantize_`` swaps like any other linear.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from robuq.core.errors import RobuqError


class JoinedInputLinear(nn.Module):
    """y = Σ_i W_i x_i + b over the input's consecutive slices x_i, one named ``nn.Linear`` per slice."""

    def __init__(self, in_features: int, out_features: int, parts: tuple[tuple[str, int], ...]):
        super().__init__()
        widths = [w for _, w in parts]
        if sum(widths) != in_features or min(widths) <= 0:
            raise RobuqError(f"parts {parts} do not add up to the layer's {in_features} input features")
        self.in_features, self.out_features, self.widths = in_features, out_features, widths
        self.part_names = [n for n, _ in parts]
        for i, (name, width) in enumerate(parts):
            self.add_module(name, nn.Linear(width, out_features, bias=False))
        self.bias: nn.Parameter | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, parts: tuple[tuple[str, int], ...]) -> "JoinedInputLinear":
        module = cls(linear.in_features, linear.out_features, parts).to(linear.weight.device, linear.weight.dtype)
        with torch.no_grad():
            for name, weight in zip(module.part_names, linear.weight.split(module.widths, dim=1)):
                getattr(module, name).weight.copy_(weight)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().clone())
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pieces = x.split(self.widths, dim=-1)
        y = sum(getattr(self, name)(piece) for name, piece in zip(self.part_names, pieces))
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"{' + '.join(f'{n}:{w}' for n, w in zip(self.part_names, self.widths))} → {self.out_features}"


class PointwiseConv(nn.Module):
    """A 1×1 convolution (N, C, H, W) → (N, C', H, W) computed by ``self.linear`` over the channels."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "PointwiseConv":
        if (
            conv.kernel_size != (1, 1)
            or conv.groups != 1
            or conv.stride != (1, 1)
            or conv.padding not in ((0, 0), "valid")
        ):
            raise RobuqError(f"{conv} is not a plain 1×1 convolution")
        linear = nn.Linear(conv.in_channels, conv.out_channels, bias=conv.bias is not None)
        linear = linear.to(conv.weight.device, conv.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(conv.weight[:, :, 0, 0])
            if conv.bias is not None:
                linear.bias.copy_(conv.bias)
        return cls(linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.movedim(1, -1)).movedim(-1, 1)
