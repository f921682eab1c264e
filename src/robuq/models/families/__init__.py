"""The model families robuq quantizes, each declared in one module of this package (see ``base.Family``),
and the few calls that differ between them: how to run one, how to describe it in a file header, how to
rebuild it from that description."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from robuq.models.families.base import BLOCK_KINDS, Family, class_name, diffusers_module, role_kind
from robuq.models.families.dit import DIFFUSERS_DIT, DIT
from robuq.models.families.flux import FLUX
from robuq.models.families.flux2 import FLUX2
from robuq.models.families.pixart import PIXART
from robuq.models.families.sana import SANA
from robuq.models.families.sd3 import SD3
from robuq.core.errors import RobuqError

FAMILIES: dict[str, Family] = {f.name: f for f in (DIT, DIFFUSERS_DIT, PIXART, SD3, FLUX, FLUX2, SANA)}


class UnknownFamilyError(RobuqError):
    """A model of a class no family declares."""


def supported_families() -> str:
    return "; ".join(f"{f.name}: {f.summary}" for f in FAMILIES.values())


def family_of(model: nn.Module) -> Family:
    """The family ``model`` belongs to; UnknownFamilyError (listing the supported ones) for any other."""
    for family in FAMILIES.values():
        if family.matches(model):
            return family
    raise UnknownFamilyError(f"robuq has no precision map for {class_name(model)}; it supports {supported_families()}")


def model_family(model: nn.Module) -> str:
    """The name of ``model``'s family ("dit", "diffusers", "pixart", "sd3", "flux", "flux2", "sana")."""
    return family_of(model).name


def model_record(model: nn.Module) -> dict[str, Any]:
    """The header entries that rebuild ``model``'s structure: its family, class and config."""
    return family_of(model).record(model)


def model_from_record(meta: dict[str, Any]) -> nn.Module:
    """A model with random weights of the structure ``model_record`` described (files without a family are DiTs)."""
    name = meta.get("model_family", DIT.name)
    if name not in FAMILIES:
        raise RobuqError(f"unknown model family {name!r} in the file's header; robuq knows {', '.join(FAMILIES)}")
    return FAMILIES[name].build(meta)


def folder_class(path: str | os.PathLike) -> str | None:
    """The model class a diffusers ``save_pretrained`` folder holds (its config.json's ``_class_name``), or None."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return None
    try:
        name = json.loads(config.read_text()).get("_class_name")
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
        return None
    return name if isinstance(name, str) else None


def load_family_folder(path: str | os.PathLike) -> nn.Module:
    """The full-precision diffusers model in a local ``save_pretrained`` folder (config.json + safetensors), of
    any family robuq supports; nothing is downloaded."""
    name = folder_class(path)
    cls = getattr(diffusers_module(), str(name), None)
    if cls is None:
        raise UnknownFamilyError(
            f"{path} holds a {name!r}, which is no diffusers model class robuq supports ({supported_families()})"
        )
    model = cls.from_pretrained(str(path), local_files_only=True)
    family_of(model)  # refuses a class without a precision map
    return model.eval()


def example_inputs(model: nn.Module, batch: int = 1) -> dict[str, Any]:
    """Forward keyword arguments of one batch at the model's own sizes (for costs, calibration and tests)."""
    return family_of(model).example_inputs(model, batch)


def run_model(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """The model's prediction for forward arguments such as ``example_inputs`` gives."""
    return family_of(model).run(model, inputs)


def predict_latents(
    model: nn.Module, latents: torch.Tensor, t: torch.Tensor, text: dict[str, torch.Tensor]
) -> torch.Tensor:
    """A text-to-image family's prediction for latents (B, C, H, W) at its forward timesteps ``t`` with text
    conditioning (forward argument name → tensor), in the latents' layout."""
    inner = unwrapped(model)
    family = family_of(inner)
    if family.latent_arguments is None:
        raise RobuqError(f"robuq does not run {family.name} models on latents with text conditioning")
    # The forward runs through ``model`` (DDP's or torch.compile's wrapper where there is one).
    return family.latent_output(family.run(model, family.latent_arguments(inner, latents, t, text)), latents.shape)


def unwrapped(model: nn.Module) -> nn.Module:
    """The model inside DDP's (``module``) and torch.compile's (``_orig_mod``) wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def model_output(model: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """The prediction of a class-conditional DiT (either layout) for noisy ``x`` at timesteps ``t`` with labels ``y``."""
    family = family_of(model)
    if family is DIFFUSERS_DIT:
        return model(x, timestep=t, class_labels=y, return_dict=False)[0]
    if family is not DIT:
        raise RobuqError(f"{family.name} models take text conditioning, not class labels; run them with run_model")
    return model(x, t, y)


__all__ = [
    "BLOCK_KINDS",
    "DIFFUSERS_DIT",
    "DIT",
    "FAMILIES",
    "Family",
    "UnknownFamilyError",
    "example_inputs",
    "family_of",
    "folder_class",
    "load_family_folder",
    "model_family",
    "model_from_record",
    "model_output",
    "model_record",
    "predict_latents",
    "role_kind",
    "run_model",
    "supported_families",
    "unwrapped",
]
