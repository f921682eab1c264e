"""FLUX.2 (diffusers' ``Flux2Transformer2DModel``): double- and single-stream blocks whose modulation is
shared by all blocks of a kind (computed once, outside the blocks), SwiGLU MLPs without biases, and
single-stream blocks that fuse q, k, v and the MLP's input into one ``to_qkv_mlp_proj``.

``to_qkv_mlp_proj`` reads one normalised input, so one activation quantizer serves it (its outputs'
different statistics are the weights' per-channel scales' business). Its ``to_out`` reads
``[attention (d), MLP (3d)]`` and is split into ``to_out.attn`` and ``to_out.mlp``.
"""

from __future__ import annotations


import torch.nn as nn

from robuq.models.families.base import (
    Family,
    joint_block_linears,
    diffusers_build,
    diffusers_record,
    is_class,
    run_diffusers,
)
from robuq.models.families.flux import packed_arguments, packed_inputs, resolution_shift, unpacked


def _to_out_parts(model: nn.Module, name: str) -> tuple[tuple[str, int], ...]:
    attn = model.get_submodule(name.rsplit(".", 1)[0])
    return (("attn", attn.inner_dim), ("mlp", attn.mlp_hidden_dim))


FLUX2 = Family(
    name="flux2",
    summary="FLUX.2 (Flux2Transformer2DModel): shared modulation, SwiGLU, fused single-stream projections",
    matches=is_class("Flux2Transformer2DModel"),
    block_linears={
        **joint_block_linears("linear_in", "linear_out"),
        "single.qkv": ("single_transformer_blocks.*.attn.to_qkv_mlp_proj",),
        "single.proj": ("single_transformer_blocks.*.attn.to_out.attn",),
        "single.fc2": ("single_transformer_blocks.*.attn.to_out.mlp",),
    },
    modulation=(
        "double_stream_modulation_img.linear",
        "double_stream_modulation_txt.linear",
        "single_stream_modulation.linear",
    ),
    kept={
        "x_embedder": "patch embedding",
        "context_embedder": "context projection (an embedder of the text encoder's output)",
        "time_guidance_embed.*": "timestep and guidance embedders",
        "norm_out.linear": "final layer's modulation",
        "proj_out": "final layer",
    },
    attention=("transformer_blocks.*.attn", "single_transformer_blocks.*.attn"),
    example_inputs=packed_inputs,
    run=run_diffusers,
    record=diffusers_record("flux2"),
    build=diffusers_build,
    joined_inputs={"single_transformer_blocks.*.attn.to_out": _to_out_parts},
    timestep_scale=1.0,
    pipeline="Flux2Pipeline",
    objective="flow",
    flow_shift=resolution_shift,
    latent_arguments=packed_arguments,
    latent_output=unpacked,
    latent_channels=lambda model: model.config.in_channels // 4,  # packed 2 × 2
)
