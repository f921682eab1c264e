"""The compact file: packed integer weights, half-precision everything else, config and plan in JSON.

Layout (safetensors, no pickle): for every block linear with quantized weights and activations,
``<name>.weight_packed`` (uint8), ``<name>.weight_scale``, and its bias / low-rank branch / sign flips /
clip ratio; every other tensor of the model as it is, in ``dtype``. The header's JSON holds the model
config, the quantization policy, the bit plan and, per packed layer, its format and shape.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from robuq.deploy.elementwise import use_native_kernels
from robuq.deploy.allocator import retain_freed_memory
from robuq.deploy.gemm import requested as requested_gemm
from robuq.deploy.integer_linear import IntegerLinear, convert_to_integer
from robuq.deploy.packing import PACKERS
from robuq.core.files import load_tensors, save_tensors
from robuq.models.checkpoint import CheckpointError
from robuq.models.families import DIT, model_from_record, model_record
from robuq.models.skeleton import meta_skeleton
from robuq.quant.primitives import QuantizedTensor
from robuq.quant.linear import QuantLinear
from robuq.precision.policy import QuantConfig, current_plan, quantize_
from robuq.core.errors import RobuqError

FORMAT_VERSION = 1
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_LAYER_EXTRAS = ("bias", "hadamard_signs", "lowrank_down", "lowrank_up", "act_quant.clip_ratio")


def _weight_format(layer: QuantLinear, ternary_packing: str) -> str:
    if layer.config.weight == "ternary":
        return ternary_packing
    if layer.config.weight in ("int2", "int3", "int4"):
        return "int4"
    raise RobuqError(f"no packing for weight format {layer.config.weight!r} yet; export supports ternary and int2–int4")


def export_model(
    model: nn.Module,
    config: QuantConfig,
    path: str | os.PathLike,
    ternary_packing: str = "ternary-2bit",
    dtype: str = "fp16",
) -> Path:
    """Write ``model`` (robuq's DiT or a diffusers DiTTransformer2DModel, quantized with ``config``) as a
    compact file; returns its path."""
    ternary_packings = [name for name in PACKERS if name.startswith("ternary")]
    if ternary_packing not in ternary_packings:
        raise RobuqError(f"ternary_packing must be one of {', '.join(ternary_packings)}, not {ternary_packing!r}")
    if dtype not in DTYPES:
        raise RobuqError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    half = DTYPES[dtype]
    tensors: dict[str, torch.Tensor] = {}
    packed: dict[str, dict[str, Any]] = {}
    covered: set[str] = set()
    for name, layer in model.named_modules():
        if not isinstance(layer, QuantLinear) or layer.act_bits is None:
            continue
        q = layer.quantized_weight()  # once per layer: the levels and scales the file keeps
        if q is None:  # full-precision weights: stored as they are, below
            continue
        fmt = _weight_format(layer, ternary_packing)
        tensors[f"{name}.weight_packed"] = PACKERS[fmt].pack(q.levels.to(torch.int8))
        # In the file's dtype (fp16 by default, as the paper's layout counts it); dtype="fp32" exports
        # reproduce the training model bit for bit.
        tensors[f"{name}.weight_scale"] = q.scale.reshape(-1).to(half)
        packed[name] = {"format": fmt, "shape": list(q.levels.shape)}
        covered.add(f"{name}.weight")
    for key, value in model.state_dict().items():
        if key in covered:
            continue
        if key.endswith("hadamard_signs"):
            tensors[key] = value.to(torch.int8)
        elif key.endswith("clip_ratio") or not value.is_floating_point():
            tensors[key] = value  # a learned clip ratio rounded to bf16 would move every scale of its layer
        else:
            tensors[key] = value.to(half)
    meta = {
        "kind": "robuq-export",
        "format_version": FORMAT_VERSION,
        "dtype": dtype,
        **model_record(model),
        "quant_config": config.to_dict(),
        "plan": current_plan(model),
        "packed": packed,
    }
    return save_tensors(path, tensors, meta)


def _corrupt(path: Any, why: str) -> CheckpointError:
    return CheckpointError(f"{path} is not a usable robuq export: {why}. Re-export it with `robuq export`.")


def load_exported(
    path: str | os.PathLike, integer: bool = True, retain_memory: bool = False, gemm: str | None = None
) -> nn.Module:
    """An inference model from an exported file: block linears run on integer levels (``integer=True``)
    or as the fake-quantized float layers they were trained as.

    ``retain_memory=True`` also raises glibc's allocator thresholds for the whole process
    (``robuq.deploy.allocator.retain_freed_memory``, which says why), so that inference temporaries
    reuse memory instead of fresh pages. It is off unless asked for: it changes how every later
    allocation of the process behaves (``robuq sample`` asks for it; ``--no-retain-memory`` declines).
    ``gemm`` picks the integer linears' CPU GEMM (``robuq.deploy.gemm``: ``auto``, ``int_mm``, ``avx2`` or
    ``fp32``); None reads ``$ROBUQ_GEMM`` now, and ``auto`` where that is unset (each layer then takes the
    path measured or known fastest for its kind on this CPU).
    """
    gemm = requested_gemm(gemm)
    if retain_memory:
        retain_freed_memory()
    tensors, meta = _read_export(path)
    model = _skeleton(meta)
    weights = _unpack_weights(path, tensors, meta, model)
    return _assemble(path, model, tensors, weights, integer, gemm)


def _read_export(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The file's tensors and header, once the header says it is an export of this format."""
    tensors, meta = load_tensors(path)
    if meta.get("kind") != "robuq-export":
        raise _corrupt(
            path, "its header does not describe a robuq export (is it a training checkpoint? use load_quantized)"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise _corrupt(path, f"format version {meta.get('format_version')} is not {FORMAT_VERSION}")
    return tensors, meta


def _skeleton(meta: dict[str, Any]) -> nn.Module:
    """The quantized model the header describes, without values. On the meta device for robuq's DiT: the
    file's tensors are assigned into it, so no random initialisation and (for integer inference) no float
    copy of the packed weights is ever allocated. Not for diffusers' model, whose positional table is a
    buffer computed at construction and not saved."""
    with meta_skeleton() if meta.get("model_family", DIT.name) == DIT.name else contextlib.nullcontext():
        model = model_from_record(meta)
        quantize_(model, QuantConfig.from_dict(meta["quant_config"]), plan=meta.get("plan") or None, initialize=False)
    return model


def _unpack_weights(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any], model: nn.Module
) -> dict[str, QuantizedTensor]:
    """Each packed layer's levels and scales (popped from ``tensors``), checked against the header and the
    model: format, byte count, scale count, and a quantized linear of that shape to receive them."""
    weights = {}
    modules = dict(model.named_modules())
    for name, info in meta["packed"].items():
        packer = PACKERS.get(info.get("format"))
        if packer is None:
            raise _corrupt(path, f"{name} uses an unknown packing {info.get('format')!r}")
        shape = info["shape"]
        count = math.prod(shape)
        data = tensors.pop(f"{name}.weight_packed", None)
        scale = tensors.pop(f"{name}.weight_scale", None)
        if data is None or scale is None:
            raise _corrupt(path, f"the packed weights of {name} are missing")
        if data.numel() != packer.packed_bytes(count):
            raise _corrupt(path, f"{name} holds {data.numel()} packed bytes, its shape {shape} needs another size")
        if scale.numel() != shape[0]:
            raise _corrupt(path, f"{name} has {scale.numel()} scales for {shape[0]} output channels")
        if not isinstance(modules.get(name), QuantLinear):
            raise _corrupt(path, f"packed weights for {name!r}, which the config does not quantize")
        if tuple(shape) != tuple(modules[name].weight.shape):
            raise _corrupt(
                path, f"{name}.weight has shape {tuple(shape)}, the config needs {tuple(modules[name].weight.shape)}"
            )
        weights[name] = QuantizedTensor(packer.unpack(data, count).reshape(shape), scale.float().unsqueeze(1), 0.0)
    return weights


def _assemble(
    path: str | os.PathLike,
    model: nn.Module,
    tensors: dict[str, torch.Tensor],
    weights: dict[str, QuantizedTensor],
    integer: bool,
    gemm: str,
) -> nn.Module:
    """``model`` with the file's values: layers that run on integers become IntegerLinears built from their
    levels, the others (float mode, or full-precision inputs) get α·L as their weight."""
    modules = dict(model.named_modules())
    on_integers = {n for n in weights if integer and modules[n].act_bits is not None}
    state = {f"{name}.weight": weights[name].dequantize() for name in set(weights) - on_integers}
    expected = model.state_dict()
    for key, value in tensors.items():
        if key not in expected:
            raise _corrupt(path, f"unexpected tensor {key!r}")
        state[key] = value.to(expected[key].dtype)
    packed_weights = {f"{name}.weight" for name in on_integers}
    missing = sorted(set(expected) - set(state) - packed_weights)
    if missing:
        raise _corrupt(path, f"missing tensors: {', '.join(missing[:6])}")
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise _corrupt(path, f"{key} has shape {tuple(value.shape)}, the config needs {tuple(expected[key].shape)}")
    model.load_state_dict(state, strict=False, assign=True)
    model.eval().requires_grad_(False)
    for name in (
        set(weights) - on_integers
    ):  # the stored weights are already quantized: re-quantizing α·L would change α
        modules[name].stores_quantized_weight = True
        del weights[name]
    convert_to_integer(
        model, weights, only_given=True, gemm=gemm
    )  # empties ``weights``: each layer's levels go as it is built
    if integer:  # a float reload stays bit-exact with its training model
        use_native_kernels(model)
    unset = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if unset:
        raise _corrupt(path, f"no values for {', '.join(unset[:6])}")
    return model


def file_report(path: str | os.PathLike) -> dict[str, Any]:
    """Bytes per kind of tensor in an exported file, and the ratio to fp32/fp16 checkpoints of the same model."""
    tensors, meta = _read_export(path)  # the same header checks as load_exported, version included
    with meta_skeleton():
        model = model_from_record(meta)
    params = sum(p.numel() for p in model.parameters())
    groups: dict[str, int] = {}
    for key, value in tensors.items():
        kind = (
            "packed weights"
            if key.endswith("weight_packed")
            else "scales"
            if key.endswith("weight_scale")
            else ("low-rank branches" if "lowrank" in key else "full-precision parts")
        )
        groups[kind] = groups.get(kind, 0) + value.numel() * value.element_size()
    size = os.path.getsize(path)
    return {
        "file_bytes": size,
        "groups": groups,
        "fp32_bytes": params * 4,
        "fp16_bytes": params * 2,
        "ratio_fp32": params * 4 / size,
        "ratio_fp16": params * 2 / size,
        "params": params,
    }


__all__ = ["IntegerLinear", "export_model", "file_report", "load_exported"]
