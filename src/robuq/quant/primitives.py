"""The arithmetic every quantizer shares: rounding with a straight-through gradient and affine codes.

A quantized tensor is always ``value ≈ scale · level + offset`` with integer ``level``; weights use
offset 0 and signed levels, activations unsigned levels 0 … 2^b − 1 with a per-token (or per-tensor)
scale and offset. Keeping levels and scales apart is what lets the deployment code pack the levels and
run integer kernels on exactly the numbers training saw.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def in_fp32(fn, *tensors: torch.Tensor):
    """``fn(*tensors)`` in fp32 with autocast off, when autocast is on for the tensors' device; else as is.

    Under bf16 autocast, the quantizers' statistics (per-token min/max or σ, mean|W|), scales, the
    Hadamard transform and the rounding to levels would run on 8-bit mantissas and pick other levels
    than fp32 does; only the matmul that consumes the quantized values is left to autocast.
    """
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return fn(*tensors)
    with torch.autocast(device, enabled=False):
        return fn(*(t.float() for t in tensors))


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward (the straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


@dataclass
class QuantizedTensor:
    """Integer levels and the affine map back to real values: ``levels · scale + offset``."""

    levels: torch.Tensor  # integer-valued (int8/uint8 when exported; float during training)
    scale: torch.Tensor  # broadcastable to levels
    offset: torch.Tensor | float = 0.0
    bits: float = 8

    def dequantize(self) -> torch.Tensor:
        return self.levels.to(self.scale.dtype) * self.scale + self.offset


def _rounded(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | float) -> torch.Tensor:
    """round((x − offset)/scale), half to even, in a new tensor: a true division, as the kernels do."""
    return (x - offset).div_(scale).round_()


def affine_levels(
    x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | float, low: int, high: int
) -> torch.Tensor:
    """clamp(round((x − offset)/scale), low, high) as floats, without autograd: the levels alone, for inference."""
    with torch.no_grad():
        return _rounded(x, scale, offset).clamp_(low, high)


class _FakeQuantize(torch.autograd.Function):
    """The same maths as the autograd path below, in a few in-place passes and one mask for backward.

    QAT spends most of its extra time in these element-wise passes (the CPU is memory-bound), so the
    common case — scale and offset computed from the data, not learned — gets this fused version.
    """

    @staticmethod
    def forward(ctx, x, scale, offset, low, high):
        rounded = _rounded(x, scale, offset)
        if ctx.needs_input_grad[0]:
            # Inside the range ⇔ clamping changed nothing: two passes instead of three compares.
            levels = rounded.clamp(low, high)
            ctx.save_for_backward(levels == rounded)
        else:  # sampling and evaluation need no mask
            levels = rounded.clamp_(low, high)
        ctx.mark_non_differentiable(levels)
        return torch.addcmul(torch.as_tensor(offset, dtype=levels.dtype), levels, scale), levels

    @staticmethod
    def backward(ctx, grad, _grad_levels):
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None, None


def affine_fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | float, low: int, high: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(fake-quantized x, levels) for levels clamp(round((x − offset)/scale), low, high).

    The gradient reaches x where it lies inside the clipping range (zero outside), and reaches
    ``scale``/``offset`` when they carry gradients (learned clipping), as in LSQ.
    """
    learned = scale.requires_grad or (isinstance(offset, torch.Tensor) and offset.requires_grad)
    if not learned:
        return _FakeQuantize.apply(x, scale, offset, low, high)
    levels = torch.clamp(round_ste((x - offset) / scale), low, high)
    return levels * scale + offset, levels
