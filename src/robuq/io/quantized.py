"""Save and load quantized DiTs (robuq's or diffusers'): one safetensors file holding the state, the policy
and the bit plan."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.nn as nn

from robuq.core.files import save_tensors
from robuq.core.options import option
from robuq.core.runtime import default_teacher_path
from robuq.io.full_precision import load_full_precision
from robuq.models.checkpoint import CheckpointError, check_compatible, read_state_dict
from robuq.models.dit import DiT
from robuq.models.families import model_from_record, model_record
from robuq.precision.policy import QuantConfig, current_plan, quantize_
from robuq.precision.presets import resolve_policy


def quantized_meta(model: nn.Module, config: QuantConfig) -> dict[str, Any]:
    """The JSON that rebuilds ``model``'s structure: model family and config, policy and the plan in force."""
    return {
        "kind": "quantized-model",
        **model_record(model),
        "quant_config": config.to_dict(),
        "plan": current_plan(model),
    }


def save_quantized(
    model: nn.Module, path: str | os.PathLike, config: QuantConfig, extra_meta: dict[str, Any] | None = None
) -> Path:
    """Write ``model`` (already ``quantize_``d with ``config``) atomically as safetensors + JSON header."""
    return save_tensors(path, model.state_dict(), {**quantized_meta(model, config), **(extra_meta or {})})


def load_quantized(
    path: str | os.PathLike, prefer: str = "ema", map_location: str = "cpu"
) -> tuple[nn.Module, QuantConfig]:
    """The quantized model stored in ``path`` (a ``save_quantized`` file or a QAT training checkpoint):
    robuq's DiT, or a diffusers DiTTransformer2DModel if one was saved."""
    state, meta = read_state_dict(path, prefer=prefer)
    if "quant_config" not in meta or "model_config" not in meta:
        raise CheckpointError(
            f"{path} is not a quantized robuq model (no quantization config in its header); "
            "load full-precision checkpoints with robuq.load_dit"
        )
    model = model_from_record(meta)
    config = QuantConfig.from_dict(meta["quant_config"])
    quantize_(model, config, plan=meta.get("plan") or None, initialize=False)
    check_compatible(model, state, str(path))
    model.load_state_dict(state)
    return model.to(map_location), config


@dataclass
class QuantizeConfig:
    """``robuq quantize``: a full-precision checkpoint, quantized by a preset or policy file (no training)."""

    ckpt: str | None = option(None, "full-precision model (default: the shipped teacher)")
    preset: str = option("robuq", "quantization method (see the README's preset table)")
    act_bits: int = option(4, "activation bits of the four block linears")
    plan: str | None = option(None, "per-layer activation bits (a plan JSON, e.g. from `robuq ampn allocate`)")
    config: str | None = option(None, "a policy file (YAML/JSON) instead of --preset/--act-bits")
    lowrank_rank: int = option(16, "rank of the full-precision low-rank branch of the baseline and robuq presets")
    lowrank_share: float | None = option(
        None, "the branch's rank as a share of each layer's width instead (the paper's 16 of 1,152: 0.013889)"
    )
    allow_partial: bool = option(
        False,
        "quantize what the model's family map covers and keep the linears it does not "
        "name in full precision, with a warning naming them (otherwise: refused)",
    )
    out: str = option("quantized.safetensors", "where to write the quantized model")


def quantize_checkpoint(config: QuantizeConfig) -> tuple[DiT, Path]:
    """Load a full-precision checkpoint, ``quantize_`` it (post-training initialisation), save it."""
    policy = resolve_policy(
        config.preset, config.act_bits, config.config, config.plan, config.lowrank_rank, config.lowrank_share
    )
    source = config.ckpt or default_teacher_path()
    model = quantize_(load_full_precision(source), policy, allow_partial=config.allow_partial)
    return model, save_quantized(model, config.out, policy, {"source": str(source)})


__all__ = ["QuantizeConfig", "load_quantized", "quantize_checkpoint", "quantized_meta", "save_quantized"]
