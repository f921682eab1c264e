"""Open any model file robuq reads: a full-precision checkpoint, a quantized model, or an export."""
from __future__ import annotations

import os

from safetensors import SafetensorError

from robuq.deploy.export import load_exported
from robuq.core.files import read_meta
from robuq.models.checkpoint import load_dit
from robuq.models.dit import DiT
from robuq.io.quantized import load_quantized


def load_any(path: str | os.PathLike, map_location: str = "cpu", retain_memory: bool = False) -> DiT:
    """The model in ``path``, whichever of robuq's (or the reference's) formats it is in
    (``retain_memory``: see ``load_exported``)."""
    try:  # the header alone: loading every tensor just to learn the format doubled the peak memory
        meta = read_meta(path)
    except (SafetensorError, OSError, ValueError):  # not a safetensors file: load_dit reads .pt files and explains what is wrong
        meta = {}
    if meta.get("kind") == "robuq-export":
        return load_exported(path, retain_memory=retain_memory).to(map_location)
    if "quant_config" in meta:
        return load_quantized(path, map_location=map_location)[0]
    return load_dit(path, map_location=map_location)
