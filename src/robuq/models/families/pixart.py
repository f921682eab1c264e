"""PixArt-α/Σ (diffusers' ``PixArtTransformer2DModel``): DiT blocks with one shared adaLN-single
modulation, self-attention over the image and cross-attention to the caption's T5 embeddings.

The cross-attention's query and output projection read the image stream ("qkv", "proj" of the
``cross`` stream); its key and value read caption tokens ("txt.qkv"), whose statistics differ, so they
get their own quantizers and AMPN bits. The caption projection is an embedder and stays in full precision.
"""

from __future__ import annotations

from typing import Any

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
    import torch

    x = latent_grid(model, batch)
    return {
        "hidden_states": x,
        "encoder_hidden_states": text_tokens(model, batch, model.config.caption_channels),
        "timestep": torch.full((batch,), 500, device=device_of(model)),
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
    }


PIXART = Family(
    name="pixart",
    summary="PixArt-α/Σ (PixArtTransformer2DModel): adaLN-single, self- and cross-attention, DDPM",
    matches=is_class("PixArtTransformer2DModel"),
    block_linears=cross_attention_block_linears("net.0.proj", "net.2"),
    modulation=("adaln_single.linear",),
    kept={
        "pos_embed.proj": "patch embedding",
        "adaln_single.emb.*": "timestep embedder (and PixArt-α's size embedders)",
        "caption_projection.*": "caption projection (an embedder of the text encoder's output)",
        "proj_out": "final layer",
    },
    attention=("transformer_blocks.*.attn1", "transformer_blocks.*.attn2"),
    example_inputs=_inputs,
    run=run_diffusers,
    record=diffusers_record("pixart"),
    build=diffusers_build,
    pipeline="PixArtSigmaPipeline",
    latent_arguments=grid_arguments(added_cond_kwargs={"resolution": None, "aspect_ratio": None}),
)
