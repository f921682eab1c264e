"""FLUX.1 (diffusers' ``FluxTransformer2DModel``): double-stream blocks (image and text streams, joint
attention with RoPE and RMS qk-norm) followed by single-stream blocks over the joined sequence.

A single-stream block computes attention and a wide MLP side by side from one normalised input and
projects both back with one ``proj_out`` that reads ``[attention (d), MLP (4d)]``: two sources whose
statistics differ by orders of magnitude, so ``proj_out`` is split into ``proj_out.attn`` and
``proj_out.mlp`` with their own Hadamard transform and quantizer (the sum is the original layer).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from robuq.models.families.base import (
    Family,
    projections,
    joint_block_linears,
    device_of,
    diffusers_build,
    diffusers_record,
    is_class,
    run_diffusers,
    text_tokens,
)

IMAGE_TOKENS, TEXT_TOKENS = 16, 8


def position_ids(tokens: int, axes: int, device: torch.device) -> torch.Tensor:
    """RoPE position ids of ``tokens`` tokens laid out row by row on a square grid."""
    side = max(1, int(tokens**0.5))
    return grid_ids(-(-tokens // side), side, axes, device)[:tokens]


def packed_inputs(model: nn.Module, batch: int, image_tokens: int = IMAGE_TOKENS, caption_tokens: int = TEXT_TOKENS):
    """Forward arguments of the FLUX layout (FLUX.1 and FLUX.2): packed image tokens on a square grid with
    their RoPE ids, caption tokens, the timestep in [0, 1], the pooled text where the model takes it and the
    guidance where it embeds it."""
    config, device = model.config, device_of(model)
    axes = len(config.axes_dims_rope)
    inputs = {
        "hidden_states": torch.randn(
            batch, image_tokens, config.in_channels, generator=torch.Generator().manual_seed(0)
        ).to(device),
        "encoder_hidden_states": text_tokens(model, batch, config.joint_attention_dim, caption_tokens),
        "timestep": torch.full((batch,), 0.5, device=device),
        "img_ids": position_ids(image_tokens, axes, device),
        "txt_ids": text_ids(caption_tokens, axes, device),
    }
    if getattr(config, "pooled_projection_dim", None):
        inputs["pooled_projections"] = torch.randn(batch, config.pooled_projection_dim).to(device)
    if config.guidance_embeds:
        inputs["guidance"] = torch.full((batch,), 3.5, device=device)
    return inputs


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) latents → (B, H/2 · W/2, 4C) tokens: each 2 × 2 patch one token, as FLUX's pipelines pack them."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of ``pack`` for latents of ``height`` × ``width``."""
    b, _, d = tokens.shape
    x = tokens.reshape(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, height, width)


def grid_ids(height: int, width: int, axes: int, device: torch.device) -> torch.Tensor:
    """RoPE position ids of a ``height`` × ``width`` token grid: row and column in axes 1 and 2 (FLUX.1's
    (0, h, w); FLUX.2's (t = 0, h, w, l = 0))."""
    ids = torch.zeros(height * width, axes, device=device)
    ids[:, 1] = torch.arange(height * width, device=device) // width
    ids[:, 2] = torch.arange(height * width, device=device) % width
    return ids


def text_ids(tokens: int, axes: int, device: torch.device) -> torch.Tensor:
    """RoPE position ids of the caption tokens: all at 0 in FLUX.1; FLUX.2 numbers them along its fourth axis."""
    ids = torch.zeros(tokens, axes, device=device)
    if axes == 4:
        ids[:, 3] = torch.arange(tokens, device=device)
    return ids


def packed_arguments(model: nn.Module, latents: torch.Tensor, t: torch.Tensor, text: dict[str, torch.Tensor]) -> dict:
    """``Family.latent_arguments`` of the FLUX layout: latents packed 2 × 2 into tokens on their grid, caption
    tokens at position 0, the guidance (where the model embeds it) at 1 — distilled guidance is not trained here."""
    b, _, h, w = latents.shape
    axes = len(model.config.axes_dims_rope)
    text = {k: v for k, v in text.items() if k != "encoder_attention_mask"}  # FLUX attends to every caption token
    extra = (
        {"guidance": torch.ones(b, device=latents.device)} if getattr(model.config, "guidance_embeds", False) else {}
    )
    return {
        "hidden_states": pack(latents),
        "timestep": t,
        "img_ids": grid_ids(h // 2, w // 2, axes, latents.device),
        "txt_ids": text_ids(text["encoder_hidden_states"].shape[1], axes, latents.device),
        **text,
        **extra,
    }


def unpacked(out: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return unpack(out, shape[-2], shape[-1])


def resolution_shift(height: int, width: int) -> float:
    """FLUX's noise-level shift for latents of ``height`` × ``width`` (packed 2 × 2 into tokens): exp(μ), μ
    log-linear in the token count from 0.5 at 256 tokens to 1.15 at 4,096, as FLUX's pipelines set it."""
    tokens = (height // 2) * (width // 2)
    return math.exp(0.5 + (tokens - 256) * (1.15 - 0.5) / (4096 - 256))


def _single_proj_out_parts(model: nn.Module, name: str) -> tuple[tuple[str, int], ...]:
    block = model.get_submodule(name.rsplit(".", 1)[0])
    mlp = block.proj_mlp.out_features
    return (("attn", block.proj_out.in_features - mlp), ("mlp", mlp))


FLUX = Family(
    name="flux",
    summary="FLUX.1 (FluxTransformer2DModel): double- and single-stream blocks, RoPE, qk-norm, rectified flow",
    matches=is_class("FluxTransformer2DModel"),
    block_linears={
        **joint_block_linears("net.0.proj", "net.2"),
        "single.qkv": projections("single_transformer_blocks.*.attn"),
        "single.fc1": ("single_transformer_blocks.*.proj_mlp",),
        "single.proj": ("single_transformer_blocks.*.proj_out.attn",),
        "single.fc2": ("single_transformer_blocks.*.proj_out.mlp",),
    },
    modulation=(
        "transformer_blocks.*.norm1.linear",
        "transformer_blocks.*.norm1_context.linear",
        "single_transformer_blocks.*.norm.linear",
    ),
    kept={
        "x_embedder": "patch embedding",
        "context_embedder": "context projection (an embedder of T5's output)",
        "time_text_embed.*": "timestep, guidance and pooled-text embedders",
        "norm_out.linear": "final layer's modulation",
        "proj_out": "final layer",
    },
    attention=("transformer_blocks.*.attn", "single_transformer_blocks.*.attn"),
    example_inputs=packed_inputs,
    run=run_diffusers,
    record=diffusers_record("flux"),
    build=diffusers_build,
    joined_inputs={"single_transformer_blocks.*.proj_out": _single_proj_out_parts},
    timestep_scale=1.0,
    pipeline="FluxPipeline",
    objective="flow",
    flow_shift=resolution_shift,
    latent_arguments=packed_arguments,
    latent_output=unpacked,
    latent_channels=lambda model: model.config.in_channels // 4,  # packed 2 × 2
)
