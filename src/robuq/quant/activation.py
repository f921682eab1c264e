"""Activation quantizers: uniform, 1–8 bits, per token or per tensor, with a choice of scale rule.

Scale rules (METHOD.md §6):
- ``minmax``: the range [min, max] of the token, as BitNet v2 does;
- ``gaussian``: RobustQuantizer's rule — after a Hadamard transform a token is close to N(μ, σ²), so
  the MSE-optimal uniform step for a Gaussian, Δ = c_L · σ, is used around μ;
- either rule with ``learn_clip``: a learnable ratio ρ (one per layer, initialised at 1) scales the
  range (min–max) or the step (Gaussian), trained through the LSQ-style gradient of the fake quantizer.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn

from robuq.quant.primitives import EPS, QuantizedTensor, affine_fake_quantize

RULES = ("minmax", "gaussian")
GRANULARITIES = ("token", "tensor")


def _gaussian_uniform_mse(step: float, levels: int) -> float:
    """Expected squared error of a mid-rise uniform quantizer with ``levels`` cells on N(0, 1)."""
    cdf = lambda t: 0.5 * (1 + math.erf(t / math.sqrt(2)))  # noqa: E731
    pdf = lambda t: math.exp(-t * t / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    total = 0.0
    for i in range(levels):
        r = (i + 0.5 - levels / 2) * step
        a = -math.inf if i == 0 else (i - levels / 2) * step
        b = math.inf if i == levels - 1 else (i + 1 - levels / 2) * step
        # ∫_a^b (x − r)² φ(x) dx with ∫x²φ = Φ − xφ and ∫xφ = −φ.
        x_pdf = lambda t: 0.0 if math.isinf(t) else t * pdf(t)  # noqa: E731
        pa, pb = (0.0 if math.isinf(a) else pdf(a)), (0.0 if math.isinf(b) else pdf(b))
        ca, cb = (0.0 if a == -math.inf else cdf(a)), (1.0 if b == math.inf else cdf(b))
        total += (cb - ca) - (x_pdf(b) - x_pdf(a)) + 2 * r * (pb - pa) + r * r * (cb - ca)
    return total


@functools.lru_cache(maxsize=None)
def gaussian_optimal_step(bits: int) -> float:
    """MSE-optimal uniform step for a unit Gaussian with 2^bits levels (1.596, 0.9957, 0.5860, 0.3352, …)."""
    levels = 2**bits
    lo, hi = 1e-4, 4.0
    golden = (math.sqrt(5) - 1) / 2
    for _ in range(200):  # the MSE is unimodal in the step; golden-section search to float precision
        a, b = hi - golden * (hi - lo), lo + golden * (hi - lo)
        if _gaussian_uniform_mse(a, levels) < _gaussian_uniform_mse(b, levels):
            hi = b
        else:
            lo = a
    return (lo + hi) / 2


def check_bits(bits: object, what: str = "activation bits") -> int:
    """``bits`` if it is an integer from 1 to 8, else a ValueError that says so."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"{what} must be an integer from 1 to 8, got {bits!r}")
    return bits


def _reduce_dims(x: torch.Tensor, granularity: str) -> tuple[int, ...]:
    if granularity == "token":
        return (-1,)
    if granularity == "tensor":
        # One scale per sample, not per batch: a sample's output must not depend on its batch-mates
        # (classifier-free guidance runs the conditional and unconditional halves in one batch).
        return tuple(range(1, x.dim())) if x.dim() > 1 else (0,)
    raise ValueError(f"unknown granularity {granularity!r}; use one of {GRANULARITIES}")


def activation_scale_offset(
    x: torch.Tensor, bits: int, granularity: str = "token", rule: str = "minmax", clip_ratio: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (or per-tensor) ``scale`` and ``offset`` so that x ≈ offset + scale · level, level ∈ [0, 2^b − 1].

    Statistics of x are treated as constants for autograd; only ``clip_ratio`` receives a gradient.
    """
    dims = _reduce_dims(x, granularity)
    stats = x.detach().float()  # fp16 cannot hold EPS, and its sums lose the small statistics we need
    top = 2**bits - 1
    if rule == "minmax":
        # amin + amax, not aminmax: on the CPU in torch 2.x the fused kernel is ~30× slower than the two.
        lo, hi = stats.amin(dim=dims, keepdim=True), stats.amax(dim=dims, keepdim=True)
        center, half = (lo + hi) / 2, (hi - lo) / 2
        if clip_ratio is not None:
            half = half * clip_ratio
        scale = (2 * half / top).clamp_min(EPS)
        return scale, center - half
    if rule == "gaussian":
        # Two-pass σ (centre, then norm) instead of torch.var_mean, which is ~10× slower on the CPU.
        mean = stats.mean(dim=dims, keepdim=True)
        count = math.prod(stats.shape[d] for d in dims)
        std = torch.linalg.vector_norm(stats - mean, dim=dims, keepdim=True) / math.sqrt(count)
        step = gaussian_optimal_step(bits) * std
        if clip_ratio is not None:
            step = step * clip_ratio
        scale = step.clamp_min(EPS)
        return scale, mean - scale * (top / 2)
    raise ValueError(f"unknown activation scale rule {rule!r}; use one of {RULES}")


def quantize_activation(
    x: torch.Tensor, bits: int, granularity: str = "token", rule: str = "minmax", clip_ratio: torch.Tensor | None = None
) -> tuple[torch.Tensor, QuantizedTensor]:
    """(fake-quantized x, its levels/scale/offset). Gradients pass straight through inside the range."""
    scale, offset = activation_scale_offset(x, bits, granularity, rule, clip_ratio)
    fake, levels = affine_fake_quantize(x.float(), scale, offset, 0, 2**bits - 1)
    return fake.to(x.dtype), QuantizedTensor(levels.detach(), scale.detach(), offset.detach(), bits=bits)


class ActivationQuantizer(nn.Module):
    """A layer's activation quantizer; ``bits=None`` passes activations through unchanged."""

    def __init__(self, bits: int | None = 4, granularity: str = "token", rule: str = "minmax", learn_clip: bool = False):
        super().__init__()
        if rule not in RULES:
            raise ValueError(f"unknown activation scale rule {rule!r}; use one of {RULES}")
        if granularity not in GRANULARITIES:
            raise ValueError(f"unknown granularity {granularity!r}; use one of {GRANULARITIES}")
        self.bits = None if bits is None else check_bits(bits)
        self.granularity, self.rule = granularity, rule
        self.clip_ratio = nn.Parameter(torch.ones(())) if learn_clip else None

    def _ratio(self) -> torch.Tensor | None:
        return None if self.clip_ratio is None else self.clip_ratio.clamp(0.05, 4.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits is None:
            return x
        return quantize_activation(x, self.bits, self.granularity, self.rule, self._ratio())[0]

    def quantize(self, x: torch.Tensor) -> QuantizedTensor:
        """Levels and scales of x, for packing and integer kernels."""
        if self.bits is None:
            raise ValueError("this quantizer is full precision (bits=None); there are no levels to export")
        return quantize_activation(x, self.bits, self.granularity, self.rule, self._ratio())[1]

    def extra_repr(self) -> str:
        learned = ", learned clip" if self.clip_ratio is not None else ""
        return f"bits={self.bits}, {self.granularity}, {self.rule}{learned}"
