"""Exact, normalised Hadamard transforms for every DiT width, applied in O(n log n).

The matrices come from ``robuq.core.hadamard_matrices`` (n = m · 2^k, a Paley matrix of order m times
Sylvester blocks). The transform is applied as a chain of small matrix products along the axes of x viewed as (…, m, 2^a, 2^b, …) — the
Kronecker structure — so it costs about (m + Σ 2^a) operations per element instead of n.

Every matrix built here is symmetric, so the normalised transform is its own inverse; with sign flips
D the transform is T = H D / √n and its inverse (and transpose) is D H / √n.
"""

from __future__ import annotations

import math

import torch

from robuq.core.hadamard_matrices import factor_matrices, hadamard_factors
from robuq.quant.backends import backend_for
from robuq.core.errors import RobuqError

_device_cache: dict[tuple[int, torch.dtype, torch.device], tuple[torch.Tensor, ...]] = {}


def _factor_matrices(n: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
    key = (n, dtype, device)
    if key not in _device_cache:
        # Each factor carries its own 1/√r, so the product is normalised without a pass over x.
        _device_cache[key] = tuple(
            (h / math.sqrt(h.shape[0])).to(dtype=dtype, device=device) for h in factor_matrices(n)
        )
    return _device_cache[key]


def _normalised_transform(x: torch.Tensor) -> torch.Tensor:
    """x @ H/√n (H symmetric, entries ±1) along the last axis, one small matmul per Kronecker factor."""
    n = x.shape[-1]
    factors = _factor_matrices(n, x.dtype, x.device)
    lead = x.shape[:-1]
    y = x.reshape(-1, n)
    outer = 1
    for h in factors:
        r = h.shape[0]
        inner = n // (outer * r)
        if inner == 1:
            y = (y.reshape(-1, r) @ h).reshape(-1, n)
        else:
            # (rows·outer, r, inner): contract the middle axis with h (symmetric, so hᵀ = h).
            y = torch.matmul(h, y.reshape(-1, r, inner)).reshape(-1, n)
        outer *= r
    return y.reshape(*lead, n)


def _apply(x: torch.Tensor, signs: torch.Tensor | None, inverse: bool) -> torch.Tensor:
    backend = backend_for("hadamard", x)  # a fused pass (C on the CPU, Triton on the GPU) where one is registered
    if backend is not None:
        return backend.run(x, signs, inverse)
    if signs is not None and not inverse:
        x = x * signs
    y = _normalised_transform(x)
    if signs is not None and inverse:
        y = y * signs
    return y


class _HadamardFunction(torch.autograd.Function):
    """Saves nothing for backward: the gradient of an orthogonal map is its transpose (the inverse)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, signs: torch.Tensor | None, inverse: bool) -> torch.Tensor:
        ctx.save_for_backward(signs) if signs is not None else None
        ctx.has_signs, ctx.inverse = signs is not None, inverse
        return _apply(x, signs, inverse)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        signs = ctx.saved_tensors[0] if ctx.has_signs else None
        return _apply(grad, signs, not ctx.inverse), None, None


def hadamard_transform(x: torch.Tensor, signs: torch.Tensor | None = None, inverse: bool = False) -> torch.Tensor:
    """Normalised Hadamard transform of the last axis: T x with T = H·diag(signs)/√n (or Tᵀ if ``inverse``).

    ``signs`` (a ±1 vector of length n) gives QuaRot-style random sign flips. Differentiable; exact in
    exact arithmetic for every supported n (see ``hadamard_factors``).
    """
    hadamard_factors(x.shape[-1])  # fail early, naming the size
    if signs is not None and signs.shape != (x.shape[-1],):
        raise RobuqError(f"signs must have shape ({x.shape[-1]},), got {tuple(signs.shape)}")
    if signs is not None:
        signs = signs.to(dtype=x.dtype, device=x.device)
    return _HadamardFunction.apply(x, signs, inverse)


def random_signs(n: int, seed: int = 0) -> torch.Tensor:
    """A reproducible ±1 vector for sign flips."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=g).float().mul_(2).sub_(1)
