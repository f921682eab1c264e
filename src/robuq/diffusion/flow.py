"""Rectified flow as SD3, FLUX and Sana train and sample it.

The noisy input at noise level σ ∈ [0, 1] is x_σ = (1 − σ) x₀ + σ ε, and the model predicts the velocity
ε − x₀ (``robuq.train.family_objective`` forms the loss). Training draws σ from a logit-normal and shifts it towards noise by the family's ``shift``
(σ' = s σ / (1 + (s − 1) σ)): larger images keep more of their structure at a given σ, so they need more
noise to be trained where it matters. Sampling integrates from σ = 1 to 0 with Euler steps on the shifted grid.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# (x_σ, σ) → velocity, σ one per sample in [0, 1]
Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def shifted(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * sigma / (1 + (shift - 1) * sigma)


class RectifiedFlow:
    def __init__(self, shift: float = 1.0):
        self.shift = shift

    def training_sigmas(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Noise levels for n samples: logit-normal(0, 1), shifted."""
        return shifted(torch.sigmoid(torch.randn(n, generator=generator)), self.shift)

    def sigmas(self, steps: int) -> torch.Tensor:
        """The sampler's ``steps`` + 1 noise levels, from 1 down to 0."""
        return shifted(torch.linspace(1.0, 0.0, steps + 1), self.shift)

    @torch.no_grad()
    def sample(self, velocity: Velocity, noise: torch.Tensor, steps: int) -> torch.Tensor:
        """Euler integration of the velocity from ``noise`` (σ = 1) to data (σ = 0)."""
        x, grid = noise, self.sigmas(steps).to(noise.device)
        for sigma, following in zip(grid[:-1], grid[1:]):
            x = x + (following - sigma) * velocity(x, sigma.expand(x.shape[0]))
        return x
