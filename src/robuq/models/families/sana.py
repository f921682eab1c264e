"""Sana (diffusers' ``SanaTransformer2DModel``): linear (ReLU-kernel) self-attention, cross-attention
to the caption, and a GLUMBConv MLP (1×1 conv, depthwise 3×3 conv, gated 1×1 conv), adaLN-single.

The two 1×1 convolutions are linears over channels and are quantized as such ("fc1", "fc2"); the
depthwise 3×3 convolution is a per-channel spatial filter with nine weights per channel and stays in
full precision. The linear attention has no softmax: its two matmuls (KᵀV, then Q·KᵀV) stay in full
precision (the paper's 8-bit matmuls are QKᵀ and softmax·V); the cross-attention runs at 8 bits.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from robuq.models.families.base import (
    Family,
    cross_attention_block_linears,
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
    return {
        "hidden_states": latent_grid(model, batch),
        "encoder_hidden_states": text_tokens(model, batch, model.config.caption_channels),
        "timestep": torch.full((batch,), 500, device=device_of(model)),
    }


SANA = Family(
    name="sana",
    summary="Sana (SanaTransformer2DModel): linear attention, cross-attention, GLUMBConv, adaLN-single",
    matches=is_class("SanaTransformer2DModel"),
    block_linears=cross_attention_block_linears("conv_inverted.linear", "conv_point.linear"),
    modulation=("time_embed.linear",),
    kept={
        "patch_embed.proj": "patch embedding",
        "time_embed.emb.*": "timestep embedder",
        "caption_projection.*": "caption projection (an embedder of the text encoder's output)",
        "transformer_blocks.*.ff.conv_depth": "GLUMBConv's depthwise 3×3 convolution (nine weights per channel)",
        "proj_out": "final layer",
    },
    attention=("transformer_blocks.*.attn2",),
    example_inputs=_inputs,
    run=run_diffusers,
    record=diffusers_record("sana"),
    build=diffusers_build,
    pointwise_convs=("transformer_blocks.*.ff.conv_inverted", "transformer_blocks.*.ff.conv_point"),
    pipeline="SanaPipeline",
    objective="flow",
    flow_shift=lambda height, width: 3.0,  # the shift of Sana's scheduler at 1,024 px
    latent_arguments=grid_arguments(),
    notes=("linear self-attention matmuls (KᵀV, Q·KᵀV) in full precision: no softmax to quantize",),
)
