"""One training batch of a text-to-image family under its own objective: the noisy inputs, the forward
timesteps, and the per-sample losses of a prediction — shared by teacher training and QAT, so that the
student is trained on exactly the inputs and targets its teacher was."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from robuq.diffusion.flow import RectifiedFlow
from robuq.diffusion.gaussian import create_diffusion
from robuq.models.families.base import Family


@dataclass
class NoisyBatch:
    inputs: torch.Tensor  # what the transformer reads (noised latents)
    timesteps: torch.Tensor  # as the transformer's forward takes them
    losses: Callable[[torch.Tensor], dict[str, torch.Tensor]]  # prediction → per-sample "loss", "mse" (, "vb")


def noisy_batch(family: Family, out_channels: int, x: torch.Tensor, generator: torch.Generator) -> NoisyBatch:
    """Noise the latents ``x`` at levels drawn from ``generator`` as ``family`` trains: rectified flow with the
    family's shift, or the DDPM schedule (learning the variance where the output has twice x's channels)."""
    noise = torch.randn(x.shape, generator=generator).to(x.device)
    if family.objective == "flow":
        flow = RectifiedFlow(family.flow_shift(x.shape[-2], x.shape[-1]))
        sigma = flow.training_sigmas(x.shape[0], generator).to(x.device)
        s = sigma.view(-1, *([1] * (x.ndim - 1)))
        target = noise - x

        def flow_losses(out: torch.Tensor) -> dict[str, torch.Tensor]:
            mse = (out - target).pow(2).flatten(1).mean(1)
            return {"loss": mse, "mse": mse}

        return NoisyBatch((1 - s) * x + s * noise, sigma * family.timestep_scale, flow_losses)
    diffusion = create_diffusion(learn_sigma=out_channels == 2 * x.shape[1])
    t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), generator=generator).to(x.device)
    x_t = diffusion.q_sample(x, t, noise)
    return NoisyBatch(x_t, t, lambda out: diffusion.losses_from_output(out, x, x_t, t, noise))
