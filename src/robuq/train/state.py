"""Training checkpoints: model, EMA and optimizer in one safetensors file, replaced atomically.

No pickle anywhere: optimizer tensors are flattened into the tensor table and everything else
(step, configs, param-group hyper-parameters) goes into the JSON header.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

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


def is_sharded(module: torch.nn.Module) -> bool:
    """Whether FSDP2 (``fully_shard``) holds the module's parameters as shards over the processes."""
    return any(isinstance(p, DTensor) for p in module.parameters())


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered to the main process, on the CPU


def model_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's whole state dict; for a sharded module a collective every process calls, whose result only
    the main process receives (the others get an empty dict)."""
    return get_model_state_dict(module, options=_FULL) if is_sharded(module) else module.state_dict()


def _positions(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Parameter name → its position over the optimizer's groups, the key an unsharded optimizer's state uses."""
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    return {name: i for i, name in enumerate(order)}


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state dict keyed by parameter position, sharded or not (a collective when sharded), so
    that one checkpoint resumes a run with or without sharding."""
    if not is_sharded(model):
        return optimizer.state_dict()
    full = get_optimizer_state_dict(model, optimizer, options=_FULL)
    if not full:
        return {}
    at = _positions(model, optimizer)
    groups = [{**g, "params": [at[n] for n in g["params"]]} for g in full["param_groups"]]
    return {"state": {at[n]: v for n, v in full["state"].items()}, "param_groups": groups}


def save_training_state(
    path: str | Path,
    model: torch.nn.Module,
    ema: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    meta: dict[str, Any],
    write: bool = True,
) -> Path | None:
    """One file holding everything ``load_training_state`` needs to continue exactly at ``step``. A sharded
    model's state is gathered first: every process calls this, and only the one with ``write`` writes."""
    optim = optimizer_state(model, optimizer)
    model_tensors, ema_tensors = model_state(model), model_state(ema)
    if not write:
        return None
    optim_tensors, optim_meta = _flatten_optimizer(optim)
    tensors = {f"model.{k}": v for k, v in model_tensors.items()}
    tensors.update({f"ema.{k}": v for k, v in ema_tensors.items()})
    tensors.update(optim_tensors)
    return save_tensors(path, tensors, {**meta, "kind": "training-state", "step": step, "optimizer": optim_meta})


def load_training_state(
    path: str | Path,
    model: torch.nn.Module,
    ema: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Restore model, EMA and optimizer in place; returns the checkpoint's JSON header. The file is read onto
    ``device`` (each process's own GPU), not into host memory once per process."""
    tensors, meta = load_tensors(path, device)
    if meta.get("kind") != "training-state":
        raise RobuqError(f"{path} is not a robuq training checkpoint")
    groups: dict[str, dict[str, torch.Tensor]] = {"model": {}, "ema": {}, "optim": {}}
    for name, value in tensors.items():
        head, rest = name.split(".", 1)
        groups[head][rest if head != "optim" else name] = value
    optim = _unflatten_optimizer(groups["optim"], meta["optimizer"])
    if is_sharded(model):
        load = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, groups["model"], options=load)
        set_model_state_dict(ema, groups["ema"], options=load)
        name = {i: n for n, i in _positions(model, optimizer).items()}
        named = {
            "state": {name[i]: v for i, v in optim["state"].items()},
            "param_groups": [{**g, "params": [name[i] for i in g["params"]]} for g in optim["param_groups"]],
        }
        set_optimizer_state_dict(model, optimizer, named, options=load)
        return meta
    model.load_state_dict(groups["model"])
    ema.load_state_dict(groups["ema"])
    optimizer.load_state_dict(optim)
    return meta
