"""The class-conditional DiT of the paper, in robuq's (the reference's) layout and as diffusers'
``DiTTransformer2DModel``: the paper's own precision layout."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from robuq.models.convert_diffusers import DIFFUSERS_CLASS
from robuq.models.dit import DiT, DiTConfig
from robuq.models.families.base import Family, device_of, diffusers_build, diffusers_record, is_class, run_diffusers

_DIT_KEPT = {
    "x_embedder.proj": "patch embedding (the paper keeps embedders in full precision)",
    "t_embedder.mlp.*": "timestep embedder",
    "final_layer.*": "final layer",
}


def _dit_inputs(model: nn.Module, batch: int) -> dict[str, Any]:
    size = model.x_embedder.grid_size * model.patch_size
    x = torch.zeros(batch, model.in_channels, size, size, device=device_of(model))
    t = torch.full((batch,), 500, device=x.device)
    y = torch.zeros(batch, dtype=torch.long, device=x.device) if model.num_classes > 0 else None
    return {"x": x, "t": t, "y": y}


DIT = Family(
    name="dit",
    summary="robuq's DiT (facebookresearch/DiT's layout and checkpoints)",
    matches=lambda model: isinstance(model, DiT),
    block_linears={
        "qkv": ("blocks.*.attn.qkv",),
        "proj": ("blocks.*.attn.proj",),
        "fc1": ("blocks.*.mlp.fc1",),
        "fc2": ("blocks.*.mlp.fc2",),
    },
    modulation=("blocks.*.adaLN_modulation.1",),
    kept=_DIT_KEPT,
    attention=("blocks.*.attn.core",),
    example_inputs=_dit_inputs,
    run=lambda model, inputs: model(inputs["x"], inputs["t"], inputs["y"]),
    record=lambda model: {"model_family": "dit", "model_config": model.config.to_dict()},
    build=lambda meta: DiT(DiTConfig.from_dict(meta["model_config"])),
)


def _diffusers_dit_inputs(model: nn.Module, batch: int) -> dict[str, Any]:
    size, channels = model.config.sample_size, model.config.in_channels
    x = torch.zeros(batch, channels, size, size, device=device_of(model))
    return {
        "hidden_states": x,
        "timestep": torch.full((batch,), 500, device=x.device),
        "class_labels": torch.zeros(batch, dtype=torch.long, device=x.device),
    }


DIFFUSERS_DIT = Family(
    name="diffusers",
    summary="diffusers' DiTTransformer2DModel (the same DiT, diffusers' names)",
    matches=is_class(DIFFUSERS_CLASS),
    block_linears={
        "qkv": (
            "transformer_blocks.*.attn1.to_q",
            "transformer_blocks.*.attn1.to_k",
            "transformer_blocks.*.attn1.to_v",
        ),
        "proj": ("transformer_blocks.*.attn1.to_out.0",),
        "fc1": ("transformer_blocks.*.ff.net.0.proj",),
        "fc2": ("transformer_blocks.*.ff.net.2",),
    },
    modulation=("transformer_blocks.*.norm1.linear",),
    kept={
        "pos_embed.proj": "patch embedding",
        "transformer_blocks.*.norm1.emb.*": "timestep and class embedders",
        "proj_out_1": "final layer's modulation",
        "proj_out_2": "final layer",
    },
    attention=("transformer_blocks.*.attn1",),
    example_inputs=_diffusers_dit_inputs,
    run=lambda model, inputs: run_diffusers(model, inputs),
    record=diffusers_record("diffusers"),
    build=lambda meta: diffusers_build({**meta, "model_class": meta.get("model_class", DIFFUSERS_CLASS)}),
    pipeline="DiTPipeline",
)
