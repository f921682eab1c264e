"""The two model families robuq works on — its DiT (the reference layout) and diffusers'
``DiTTransformer2DModel`` — behind the few calls that differ: how to run one, how to describe its
structure in a file header, how to rebuild it from that description."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from robuq.models.convert_diffusers import diffusers_model_from_config, is_diffusers_dit
from robuq.models.dit import DiT, DiTConfig

DIT, DIFFUSERS = "dit", "diffusers"


def model_family(model: nn.Module) -> str:
    """"dit" or "diffusers" (ValueError for anything else)."""
    if isinstance(model, DiT):
        return DIT
    if is_diffusers_dit(model):
        return DIFFUSERS
    raise ValueError(f"{type(model).__name__} is neither robuq's DiT nor diffusers' DiTTransformer2DModel")


def model_record(model: nn.Module) -> dict[str, Any]:
    """The header entries that rebuild ``model``'s structure: its family and config."""
    if model_family(model) == DIT:
        return {"model_family": DIT, "model_config": model.config.to_dict()}
    return {"model_family": DIFFUSERS, "model_config": {k: v for k, v in dict(model.config).items() if not k.startswith("_")}}


def model_from_record(meta: dict[str, Any]) -> nn.Module:
    """A model with random weights of the structure ``model_record`` described (files without a family are DiTs)."""
    family = meta.get("model_family", DIT)
    if family == DIT:
        return DiT(DiTConfig.from_dict(meta["model_config"]))
    if family == DIFFUSERS:
        return diffusers_model_from_config(meta["model_config"])
    raise ValueError(f"unknown model family {family!r} in the file's header; robuq knows {DIT} and {DIFFUSERS}")


def model_output(model: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """The model's prediction for noisy ``x`` at timesteps ``t`` with labels ``y``, in either family."""
    if is_diffusers_dit(model):
        return model(x, timestep=t, class_labels=y, return_dict=False)[0]
    return model(x, t, y)


def example_inputs(model: nn.Module, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(x, t, y) of ``batch`` zero images at the model's own size (y None when unconditional)."""
    device = next(model.parameters()).device
    if model_family(model) == DIT:
        size, channels, conditional = model.x_embedder.grid_size * model.patch_size, model.in_channels, model.num_classes > 0
    else:
        size, channels, conditional = model.config.sample_size, model.config.in_channels, True
    x = torch.zeros(batch, channels, size, size, device=device)
    t = torch.full((batch,), 500, device=device)
    y = torch.zeros(batch, dtype=torch.long, device=device)
    return (x, t, y) if conditional else (x, t, None)
