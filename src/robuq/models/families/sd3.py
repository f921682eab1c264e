"""SD3 / SD3.5 (diffusers' ``SD3Transformer2DModel``): MMDiT blocks with joint attention over an image
and a text stream, each with its own projections, modulation and MLP.

The text stream's ``add_{q,k,v}_proj``, ``to_add_out`` and ``ff_context`` are block linears of their own
("txt.*" roles). The last block is ``context_pre_only``: its text stream has no output projection and no
MLP, which the patterns simply do not find. SD3.5's dual attention (``attn2``, image-only self-attention)
is a second image-stream attention; its RMS qk-norm runs in full precision before the 8-bit matmuls.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from robuq.models.families.base import (
    Family,
    projections,
    joint_block_linears,
    device_of,
    diffusers_build,
    diffusers_record,
    grid_arguments,
    is_class,
    latent_grid,
    run_diffusers,
    text_tokens,
)


def _inputs(model: nn.Module, batch: int) -> dict[str, Any]:
    config = model.config
    return {
        "hidden_states": latent_grid(model, batch),
        "encoder_hidden_states": text_tokens(model, batch, config.joint_attention_dim),
        "pooled_projections": torch.randn(batch, config.pooled_projection_dim).to(device_of(model)),
        "timestep": torch.full((batch,), 500.0, device=device_of(model)),
    }


SD3 = Family(
    name="sd3",
    summary="SD3/SD3.5 (SD3Transformer2DModel): joint attention, context_pre_only last block, dual attention, qk-norm",
    matches=is_class("SD3Transformer2DModel"),
    block_linears={
        **(joint := joint_block_linears("net.0.proj", "net.2")),
        "qkv": joint["qkv"] + projections("transformer_blocks.*.attn2"),
        "proj": joint["proj"] + ("transformer_blocks.*.attn2.to_out.0",),
    },
    modulation=("transformer_blocks.*.norm1.linear", "transformer_blocks.*.norm1_context.linear"),
    kept={
        "pos_embed.proj": "patch embedding",
        "time_text_embed.*": "timestep and pooled-text embedders",
        "context_embedder": "context projection (an embedder of the text encoders' output)",
        "norm_out.linear": "final layer's modulation",
        "proj_out": "final layer",
    },
    attention=("transformer_blocks.*.attn", "transformer_blocks.*.attn2"),
    example_inputs=_inputs,
    run=run_diffusers,
    record=diffusers_record("sd3"),
    build=diffusers_build,
    pipeline="StableDiffusion3Pipeline",
    objective="flow",
    flow_shift=lambda height, width: 3.0,  # the shift of SD3's scheduler
    latent_arguments=grid_arguments(),
)
