"""Sampling a text-to-image family's transformer directly from cached prompt embeddings, with
classifier-free guidance: Euler steps on the rectified-flow schedule (SD3, FLUX, Sana) or DDIM on the DDPM
schedule (PixArt). What robuq's miniature measures its teachers and students with; a user with a real
model and a VAE samples through the family's diffusers pipeline instead (``robuq.sample.text_to_image``).

Each shard of ``shard_size`` samples draws its noise from (seed, shard), so the first n samples of a larger
set are the n samples of a smaller one.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from robuq.diffusion.flow import RectifiedFlow
from robuq.diffusion.gaussian import create_diffusion
from robuq.io.prompts import PromptTable
from robuq.models.families import family_of, predict_latents


def _guided(prediction: torch.Tensor, channels: int, scale: float) -> torch.Tensor:
    """The guided prediction of a batch holding conditional rows then unconditional ones: the first ``channels``
    (ε or velocity) extrapolated by ``scale``, a learned variance taken from the conditional half."""
    cond, uncond = prediction.chunk(2)
    guided = uncond[:, :channels] + scale * (cond[:, :channels] - uncond[:, :channels])
    return torch.cat([guided, cond[:, channels:]], dim=1)


@torch.no_grad()
def sample_latents(
    model: nn.Module,
    table: PromptTable,
    rows: torch.Tensor,
    latent_shape: tuple[int, int, int],
    steps: int = 20,
    guidance: float = 4.0,
    seed: int = 0,
    shard_size: int = 250,
    progress: bool = False,
    clip: bool = False,
) -> torch.Tensor:
    """Latents (N × C × H × W) for the prompts at ``rows`` of ``table``, guided against row 0 (the empty prompt);
    ``clip``: DDIM's x₀ estimates clipped to [-1, 1] (latents that are pixels; a VAE's latents reach beyond)."""
    family = family_of(model)
    device = next(model.parameters()).device
    takes = set(inspect.signature(model.forward).parameters)
    channels = latent_shape[0]
    out = []
    shards = range(0, len(rows), shard_size)
    for shard, start in enumerate(tqdm(shards, desc="sample", disable=not progress)):
        batch = rows[start : start + shard_size]
        text = table.forward_arguments(torch.cat([batch, torch.zeros_like(batch)]), takes, device)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + shard)
        noise = torch.randn(len(batch), *latent_shape, generator=generator).to(device)

        def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            both = predict_latents(model, torch.cat([x, x]), torch.cat([t, t]), text)
            return _guided(both, channels, guidance)

        if family.objective == "flow":
            flow = RectifiedFlow(family.flow_shift(latent_shape[1], latent_shape[2]))
            out.append(flow.sample(lambda x, s: predict(x, s * family.timestep_scale), noise, steps))
        else:
            learn_sigma = (model.config.out_channels or channels) == 2 * channels
            diffusion = create_diffusion(f"ddim{steps}", learn_sigma=learn_sigma)
            out.append(diffusion.ddim_sample(predict, noise, clip_denoised=clip))
    return torch.cat(out)
