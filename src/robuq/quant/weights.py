"""Weight quantizers: ternary {−α, 0, +α} (BitNet b1.58) and symmetric k-bit, per output channel."""

from __future__ import annotations

import math

import torch

from robuq.core.quantizer_spec import SCALE_EPS
from robuq.quant.primitives import QuantizedTensor
from robuq.core.errors import RobuqError


def parse_weight_format(spec: str) -> float | None:
    """ "fp" → None, "ternary" → log2(3) bits, "int4" → 4 bits; anything else is an error naming the choices."""
    if spec == "fp":
        return None
    if spec == "ternary":
        return math.log2(3)
    if spec.startswith("int") and spec[3:].isdigit() and 2 <= int(spec[3:]) <= 8:
        return float(int(spec[3:]))
    raise RobuqError(f"unknown weight format {spec!r}; use 'fp', 'ternary' or 'int2' … 'int8'")


def ternarize_weight(w: torch.Tensor) -> QuantizedTensor:
    """Per output channel c: α_c = mean|W_c|, levels = clip(round(W / α_c), −1, 1)."""
    scale = w.abs().mean(dim=-1, keepdim=True).clamp_min(SCALE_EPS)
    levels = torch.clamp(torch.round(w / scale), -1, 1)
    return QuantizedTensor(levels, scale, 0.0, bits=math.log2(3))


def quantize_weight_int(w: torch.Tensor, bits: int) -> QuantizedTensor:
    """Symmetric per-output-channel k-bit: levels in [−(2^(k−1) − 1), 2^(k−1) − 1], scale from max|W_c|."""
    qmax = 2 ** (bits - 1) - 1
    scale = (w.abs().amax(dim=-1, keepdim=True) / qmax).clamp_min(SCALE_EPS)
    levels = torch.clamp(torch.round(w / scale), -qmax, qmax)
    return QuantizedTensor(levels, scale, 0.0, bits=bits)


def quantize_weight(w: torch.Tensor, spec: str) -> QuantizedTensor | None:
    """Levels and scales of ``w`` in format ``spec`` (None for "fp")."""
    bits = parse_weight_format(spec)
    if bits is None:
        return None
    w = w.float()  # scales below fp16's range would divide by zero
    return ternarize_weight(w) if spec == "ternary" else quantize_weight_int(w, int(bits))


class _StraightThrough(torch.autograd.Function):
    """Forward the quantized values exactly (``w + (q − w)`` would be off by a rounding error, and an
    exported model must match its training model bit for bit); pass the gradient to ``w`` unchanged."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
        return quantized

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def fake_quantize_weight(w: torch.Tensor, spec: str) -> torch.Tensor:
    """Quantized values forward, identity gradient to the latent full-precision weight (STE)."""
    q = quantize_weight(w.detach(), spec)
    if q is None:
        return w
    return _StraightThrough.apply(w, q.dequantize().to(w.dtype))
