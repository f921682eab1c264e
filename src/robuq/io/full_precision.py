"""Open a full-precision model of any family robuq supports."""

from __future__ import annotations

import os
from pathlib import Path

import torch.nn as nn

from robuq.models.checkpoint import load_dit
from robuq.models.convert_diffusers import DIFFUSERS_CLASS
from robuq.models.families import folder_class, load_family_folder


def load_full_precision(path: str | os.PathLike, map_location: str = "cpu") -> nn.Module:
    """A full-precision model: a DiT checkpoint (robuq's, the reference's or a diffusers DiT folder, as robuq's
    DiT), or a diffusers folder of another family (PixArt, SD3, FLUX.1, FLUX.2, Sana) as its diffusers class."""
    name = folder_class(path) if Path(path).is_dir() else None
    if name is not None and name != DIFFUSERS_CLASS:
        return load_family_folder(path).to(map_location)
    return load_dit(path, map_location=map_location)
