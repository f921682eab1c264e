"""Attention with quantized matmul operands: Q and K per token, V per channel, the softmax probabilities."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from robuq.core.quantizer_spec import PROBABILITY_SCALE_EPS, check_bits, level_range
from robuq.quant.activation import quantize_activation
from robuq.quant.backends import backend_for, wants_grad
from robuq.quant.primitives import affine_fake_quantize, in_fp32


def quantize_probabilities(p: torch.Tensor, bits: int) -> torch.Tensor:
    """Softmax rows on an unsigned grid from 0 to the row's maximum.

    A fixed [0, 1] grid wastes most levels: with N tokens typical probabilities are ≈ 1/N. One scale per
    query row is still integer-kernel friendly, because probs·V sums along the row.
    """
    low, top = level_range(bits)
    scale = (p.detach().amax(dim=-1, keepdim=True) / top).clamp_min(PROBABILITY_SCALE_EPS)
    return affine_fake_quantize(p, scale, 0.0, low, top)[0]


class QuantAttentionCore(nn.Module):
    """softmax(Q̂ K̂ᵀ/√d) quantized, times V̂; replaces ``AttentionCore`` (same call signature)."""

    def __init__(self, bits: int = 8, probs_bits: int | None = None):
        super().__init__()
        self.bits = check_bits(bits, "attention bits")
        self.probs_bits = check_bits(probs_bits if probs_bits is not None else bits, "attention probability bits")

    def _quantized_operands(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        q, k = (quantize_activation(t, self.bits, "token", "minmax")[0] for t in (q, k))
        # probs·V sums over tokens, so V's scales must not vary along tokens: one scale per channel.
        v = quantize_activation(v.transpose(-2, -1), self.bits, "token", "minmax")[0].transpose(-2, -1)
        return q, k, v

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None = None,
        scale: float | None = None,
    ) -> torch.Tensor:
        """softmax(Q̂ K̂ᵀ·scale + mask) V̂; ``mask`` as SDPA takes it (boolean: True attends; float: added),
        ``scale`` 1/√d unless given."""
        plain = mask is None and scale is None
        backend = None if wants_grad((q, k, v)) or not plain else backend_for("attention", q, k, v)
        if backend is not None:
            # Inference: the same quantizers, the two matmuls on integer levels (robuq's C kernels on the CPU).
            return backend.run(q, k, v, self.bits, self.probs_bits)
        q, k, v = in_fp32(self._quantized_operands, q, k, v)
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        probs = in_fp32(lambda s: quantize_probabilities(s.softmax(dim=-1), self.probs_bits), scores)
        return probs @ v

    def extra_repr(self) -> str:
        return f"bits={self.bits}, probs_bits={self.probs_bits}"
