"""Activation quantizers: uniform, MIN_BITS–MAX_BITS bits (``core.quantizer_spec``), per token or per tensor,
with a choice of scale rule.

Scale rules (docs/method.md §6):
- ``minmax``: the range [min, max] of the token, as BitNet v2 does;
- ``gaussian``: RobustQuantizer's rule — after a Hadamard transform a token is close to N(μ, σ²), so
  the MSE-optimal uniform step for a Gaussian, Δ = c_L · σ, is used around μ;
- either rule with ``learn_clip``: a learnable ratio ρ (one per layer, initialised at 1) scales the
  range (min–max) or the step (Gaussian), trained through the LSQ-style gradient of the fake quantizer.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from robuq.core.quantizer_spec import SCALE_EPS, check_bits, check_rule, gaussian_optimal_step, level_range, rule_error
from robuq.quant.primitives import QuantizedTensor, affine_fake_quantize, affine_levels
from robuq.core.errors import RobuqError

GRANULARITIES = ("token", "tensor")
CLIP_RATIO_RANGE = (0.05, 4.0)  # where a learned clip ratio is clamped before use


def _reduce_dims(x: torch.Tensor, granularity: str) -> tuple[int, ...]:
    if granularity == "token":
        return (-1,)
    if granularity == "tensor":
        # One scale per sample, not per batch: a sample's output must not depend on its batch-mates
        # (classifier-free guidance runs the conditional and unconditional halves in one batch).
        return tuple(range(1, x.dim())) if x.dim() > 1 else (0,)
    raise RobuqError(f"unknown granularity {granularity!r}; use one of {GRANULARITIES}")


def activation_scale_offset(
    x: torch.Tensor, bits: int, granularity: str = "token", rule: str = "minmax", clip_ratio: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (or per-tensor) ``scale`` and ``offset`` so that x ≈ offset + scale · level, level ∈ [0, 2^b − 1].

    Statistics of x are treated as constants for autograd; only ``clip_ratio`` receives a gradient.
    """
    dims = _reduce_dims(x, granularity)
    stats = x.detach().float()  # fp16 cannot hold SCALE_EPS, and its sums lose the small statistics we need
    top = level_range(bits)[1]
    if rule == "minmax":
        # amin + amax, not aminmax: on the CPU in torch 2.x the fused kernel is ~30× slower than the two.
        lo, hi = stats.amin(dim=dims, keepdim=True), stats.amax(dim=dims, keepdim=True)
        center, half = (lo + hi) / 2, (hi - lo) / 2
        if clip_ratio is not None:
            half = half * clip_ratio
        scale = (2 * half / top).clamp_min(SCALE_EPS)
        return scale, center - half
    if rule == "gaussian":
        # Two-pass σ (centre, then norm) instead of torch.var_mean, which is ~10× slower on the CPU.
        mean = stats.mean(dim=dims, keepdim=True)
        count = math.prod(stats.shape[d] for d in dims)
        std = torch.linalg.vector_norm(stats - mean, dim=dims, keepdim=True) / math.sqrt(count)
        step = gaussian_optimal_step(bits) * std
        if clip_ratio is not None:
            step = step * clip_ratio
        scale = step.clamp_min(SCALE_EPS)
        return scale, mean - scale * (top / 2)
    raise rule_error(rule, ("minmax", "gaussian"), "robuq.quant.activation")


def quantize_activation(
    x: torch.Tensor, bits: int, granularity: str = "token", rule: str = "minmax", clip_ratio: torch.Tensor | None = None
) -> tuple[torch.Tensor, QuantizedTensor]:
    """(fake-quantized x, its levels/scale/offset). Gradients pass straight through inside the range."""
    scale, offset = activation_scale_offset(x, bits, granularity, rule, clip_ratio)
    fake, levels = affine_fake_quantize(x.float(), scale, offset, *level_range(bits))
    return fake.to(x.dtype), QuantizedTensor(levels.detach(), scale.detach(), offset.detach(), bits=bits)


def activation_levels(
    x: torch.Tensor, bits: int, granularity: str = "token", rule: str = "minmax", clip_ratio: torch.Tensor | None = None
) -> QuantizedTensor:
    """x's levels (float-valued, 0 … 2^b − 1), scale and offset, without the fake-quantized copy (inference)."""
    scale, offset = activation_scale_offset(x, bits, granularity, rule, clip_ratio)
    return QuantizedTensor(affine_levels(x.float(), scale, offset, *level_range(bits)), scale, offset, bits=bits)


class ActivationQuantizer(nn.Module):
    """A layer's activation quantizer; ``bits=None`` passes activations through unchanged."""

    def __init__(
        self, bits: int | None = 4, granularity: str = "token", rule: str = "minmax", learn_clip: bool = False
    ):
        super().__init__()
        check_rule(rule)
        if granularity not in GRANULARITIES:
            raise RobuqError(f"unknown granularity {granularity!r}; use one of {GRANULARITIES}")
        self.bits = None if bits is None else check_bits(bits)
        self.granularity, self.rule = granularity, rule
        self.clip_ratio = nn.Parameter(torch.ones(())) if learn_clip else None

    def effective_clip_ratio(self) -> torch.Tensor | None:
        """The clip ratio the quantizer applies: the learned one, clamped to CLIP_RATIO_RANGE (None if not learned)."""
        return None if self.clip_ratio is None else self.clip_ratio.clamp(*CLIP_RATIO_RANGE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits is None:
            return x
        return quantize_activation(x, self.bits, self.granularity, self.rule, self.effective_clip_ratio())[0]

    def quantize(self, x: torch.Tensor) -> QuantizedTensor:
        """Levels and scales of x, for packing and integer kernels."""
        if self.bits is None:
            raise RobuqError("this quantizer is full precision (bits=None); there are no levels to export")
        return quantize_activation(x, self.bits, self.granularity, self.rule, self.effective_clip_ratio())[1]

    def extra_repr(self) -> str:
        learned = ", learned clip" if self.clip_ratio is not None else ""
        return f"bits={self.bits}, {self.granularity}, {self.rule}{learned}"
