"""Save and load quantized DiTs: one safetensors file holding the state, the policy and the bit plan."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any


from robuq.core.files import save_tensors
from robuq.models.checkpoint import CheckpointError, check_compatible, read_state_dict
from robuq.models.dit import DiT, DiTConfig
from robuq.quantize.policy import QuantConfig, current_plan, quantize_


def quantized_meta(model: DiT, config: QuantConfig) -> dict[str, Any]:
    """The JSON that rebuilds ``model``'s structure: DiT config, policy and the plan in force."""
    return {
        "kind": "quantized-model", "model_config": model.config.to_dict(), "quant_config": config.to_dict(),
        "plan": current_plan(model),
    }


def save_quantized(model: DiT, path: str | os.PathLike, config: QuantConfig, extra_meta: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (already ``quantize_``d with ``config``) atomically as safetensors + JSON header."""
    return save_tensors(path, model.state_dict(), {**quantized_meta(model, config), **(extra_meta or {})})


def load_quantized(path: str | os.PathLike, prefer: str = "ema", map_location: str = "cpu") -> tuple[DiT, QuantConfig]:
    """The quantized DiT stored in ``path`` (a ``save_quantized`` file or a QAT training checkpoint)."""
    state, meta = read_state_dict(path, prefer=prefer)
    if "quant_config" not in meta or "model_config" not in meta:
        raise CheckpointError(
            f"{path} is not a quantized robuq model (no quantization config in its header); "
            "load full-precision checkpoints with robuq.load_dit"
        )
    model = DiT(DiTConfig(**meta["model_config"]))
    config = QuantConfig.from_dict(meta["quant_config"])
    quantize_(model, config, plan=meta.get("plan") or None, initialize=False)
    check_compatible(model, state, str(path))
    model.load_state_dict(state)
    return model.to(map_location), config


def quantize_checkpoint(ckpt: str | os.PathLike, config: QuantConfig, out: str | os.PathLike) -> tuple[DiT, Path]:
    """Load a full-precision checkpoint, ``quantize_`` it (post-training initialisation), save it."""
    from robuq.models.checkpoint import load_dit

    model = quantize_(load_dit(ckpt), config)
    return model, save_quantized(model, out, config, {"source": str(ckpt)})


__all__ = ["load_quantized", "quantize_checkpoint", "quantized_meta", "save_quantized"]
