"""Open any model file robuq reads: a full-precision checkpoint, a quantized model, or an export."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch.nn as nn
from safetensors import SafetensorError

from robuq.core.options import option
from robuq.deploy.export import export_model, load_exported
from robuq.core.files import read_meta
from robuq.models.dit import DiT
from robuq.io.full_precision import load_full_precision
from robuq.io.quantized import load_quantized
from robuq.core.errors import RobuqError


EXPORTED, QUANTIZED, FULL_PRECISION = "exported", "quantized", "full-precision"
KIND_TEXT = {
    EXPORTED: "an exported model (packed integer weights, for inference)",
    QUANTIZED: "a quantized model (fake-quantized: samples, trains further, exports)",
    FULL_PRECISION: "a full-precision checkpoint",
}


def file_kind(path: str | os.PathLike) -> str:
    """EXPORTED, QUANTIZED or FULL_PRECISION, from the file's header alone (a .pt file or a diffusers folder
    is full precision; whether it loads is ``load_any``'s to say)."""
    try:  # the header alone: loading every tensor just to learn the format doubled the peak memory
        meta = read_meta(path)
    except (
        SafetensorError,
        OSError,
        ValueError,
    ):  # not a safetensors file: load_dit reads .pt files and explains what is wrong
        meta = {}
    if meta.get("kind") == "robuq-export":
        return EXPORTED
    return QUANTIZED if "quant_config" in meta else FULL_PRECISION


def load_any(path: str | os.PathLike, map_location: str = "cpu", retain_memory: bool = False) -> nn.Module:
    """The model in ``path``, whichever of robuq's (or the reference's, or diffusers') formats it is in
    (``retain_memory``: see ``load_exported``)."""
    kind = file_kind(path)
    if kind == EXPORTED:
        return load_exported(path, retain_memory=retain_memory).to(map_location)
    if kind == QUANTIZED:
        return load_quantized(path, map_location=map_location)[0]
    return load_full_precision(path, map_location=map_location)


@dataclass
class ExportConfig:
    """``robuq export``: a quantized model as a compact file of packed integer weights."""

    model: str | None = option(None, "quantized model file (from qat, quantize or ampn run)", positional=True)
    out: str = option("model.robuq.safetensors", "where to write the exported file")
    packing: str = option(
        "ternary-2bit",
        "ternary weights at 2 bits each, or 5 trits per byte (1.6 bits)",
        choices=("ternary-2bit", "ternary-trits"),
    )
    dtype: str = option("fp16", "precision of the full-precision parts", choices=("fp16", "bf16", "fp32"))
    report: bool = option(False, "print the file's size by kind of tensor and against fp32/fp16")


def export_file(config: ExportConfig) -> tuple[Path, DiT]:
    """Export the quantized model file ``config.model``; returns the new file and the model it holds."""
    if config.model is None:
        raise RobuqError("give the quantized model to export, e.g. runs/quickstart/ampn/final/model.safetensors")
    model, policy = load_quantized(config.model)
    return export_model(model, policy, config.out, config.packing, config.dtype), model
