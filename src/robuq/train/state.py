"""Training checkpoints: model, EMA and optimizer in one safetensors file, replaced atomically.

No pickle anywhere: optimizer tensors are flattened into the tensor table and everything else
(step, configs, param-group hyper-parameters) goes into the JSON header.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from robuq.core.files import load_tensors, save_tensors
from robuq.core.errors import RobuqError

CHECKPOINT_PATTERN = re.compile(r"step-(\d+)\.safetensors$")


def checkpoint_path(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"step-{step:07d}.safetensors"


def list_checkpoints(out_dir: str | Path) -> list[tuple[int, Path]]:
    folder = Path(out_dir) / "checkpoints"
    found = []
    for path in folder.glob("step-*.safetensors") if folder.is_dir() else []:
        match = CHECKPOINT_PATTERN.search(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    for name, value in meta["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_training_state(
    path: str | Path,
    model: torch.nn.Module,
    ema: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    meta: dict[str, Any],
) -> Path:
    """One file holding everything ``load_training_state`` needs to continue exactly at ``step``."""
    optim_tensors, optim_meta = _flatten_optimizer(optimizer.state_dict())
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    tensors.update(optim_tensors)
    return save_tensors(path, tensors, {**meta, "kind": "training-state", "step": step, "optimizer": optim_meta})


def load_training_state(
    path: str | Path, model: torch.nn.Module, ema: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Restore model, EMA and optimizer in place; returns the checkpoint's JSON header."""
    tensors, meta = load_tensors(path)
    if meta.get("kind") != "training-state":
        raise RobuqError(f"{path} is not a robuq training checkpoint")
    groups: dict[str, dict[str, torch.Tensor]] = {"model": {}, "ema": {}, "optim": {}}
    for name, value in tensors.items():
        head, rest = name.split(".", 1)
        groups[head][rest if head != "optim" else name] = value
    model.load_state_dict(groups["model"])
    ema.load_state_dict(groups["ema"])
    optimizer.load_state_dict(_unflatten_optimizer(groups["optim"], meta["optimizer"]))
    return meta
