"""Per-layer sensitivity to activation bit-width: how much the denoiser's output moves when only that
layer drops to b bits.

Two metrics, both relative to the teacher's output variance on a fixed calibration batch:

- ``perturbation`` (the default): mean ‖f(layer at b) − f(as is)‖². The model is measured at the bits it
  was trained at (AMPN's warm-up: 4), so this is the extra output noise each candidate adds. It is never
  negative and grows as bits fall, and two calibration draws rank layers alike.
- ``error-increase``: mean ‖f(layer at b) − teacher‖² − mean ‖f(as is) − teacher‖². Its expectation is the
  same quantity (the cross term vanishes when the new noise is independent of the existing error), but on a
  finite batch the cross term with the ternary weights' own error dominates: a layer can score better at 1
  bit than at 4, and the plan follows that noise.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from robuq.train.calibration import CalibrationBatch, FamilyBatch
from robuq.models.families import DIT, model_family, model_output, run_model
from robuq.quant.linear import QuantLinear
from robuq.precision.policy import AUTO, layer_role, layout_patterns
from robuq.core.errors import RobuqError

__all__ = ["METRICS", "Sensitivity", "block_index", "block_layers", "layer_role", "measure_sensitivity"]

METRICS = ("perturbation", "error-increase")


def block_layers(model: nn.Module, layout: str = AUTO) -> list[str]:
    """The QuantLinears AMPN allocates bits to: the block linears of every block (q, k and v apart in
    diffusers' layout), in depth order."""
    patterns = layout_patterns(layout)
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, QuantLinear) and any(fnmatch.fnmatchcase(n, p) for p in patterns)
    ]


def block_index(name: str) -> int:
    """The block a layer belongs to, from its name (``blocks.N.…`` or diffusers' ``transformer_blocks.N.…``)."""
    match = re.match(r"(?:single_)?(?:transformer_)?blocks\.(\d+)\.", name)
    if match is None:
        raise RobuqError(f"{name!r} is not inside a DiT block (blocks.N.… or transformer_blocks.N.…)")
    return int(match.group(1))


@dataclass
class Sensitivity:
    table: dict[str, dict[int, float]]  # layer → bits → relative output change (``metric``)
    baseline_error: float  # relative output error of the model as it stands
    macs: dict[str, int] = field(default_factory=dict)  # per layer, one forward of one calibration image
    metric: str = "error-increase"  # files written before the metric was recorded measured this

    def to_dict(self) -> dict:
        return {
            "metric": self.metric,
            "baseline_error": self.baseline_error,
            "macs": self.macs,
            "layers": {n: {str(b): v for b, v in row.items()} for n, row in self.table.items()},
        }

    @classmethod
    def merged(cls, parts: list["Sensitivity"]) -> "Sensitivity":
        """One measurement from the parts of ``share`` = (k, n), k = 0 … n − 1 in order, each having measured every
        n-th layer from the k-th: the layers back in their own order (the allocation reads them in it)."""
        rows = [list(part.table.items()) for part in parts]
        table = dict(rows[i % len(rows)][i // len(rows)] for i in range(sum(map(len, rows))))
        macs = {name: count for part in parts for name, count in part.macs.items()}
        return cls(table, parts[0].baseline_error, macs, parts[0].metric)

    @classmethod
    def from_dict(cls, data: dict) -> "Sensitivity":
        table = {n: {int(b): float(v) for b, v in row.items()} for n, row in data["layers"].items()}
        return cls(
            table,
            float(data["baseline_error"]),
            {k: int(v) for k, v in data.get("macs", {}).items()},
            data.get("metric", "error-increase"),
        )


@torch.no_grad()
def measure_sensitivity(
    model: nn.Module,
    batch: CalibrationBatch | FamilyBatch,
    choices: tuple[int, ...] = (1, 2, 3, 4),
    layers: list[str] | None = None,
    progress: bool = True,
    chunk: int = 64,
    metric: str = "perturbation",
) -> Sensitivity:
    """For every layer and every b in ``choices``, the relative output change (``metric``, see the module
    docstring) when that layer alone runs at b bits; a layer's own bits score 0 without a forward pass.

    ``model`` is robuq's DiT or a diffusers DiTTransformer2DModel. The batch is processed ``chunk`` rows at
    a time (memory stays that of one chunk's activations at any batch size) and the squared errors summed.
    For robuq's DiT, a chunk's block inputs are computed once and cached, so changing a layer in block i
    re-runs only blocks i…N; a diffusers model runs its own forward for each measurement (its blocks take
    the raw timestep and label, and its output head is part of that forward, not a module of its own).
    """
    if metric not in METRICS:
        raise RobuqError(f"unknown sensitivity metric {metric!r}; use one of {', '.join(METRICS)}")
    device = next(model.parameters()).device
    layers = layers if layers is not None else block_layers(model)
    was_training = model.training
    model.eval()
    targets = batch.targets if isinstance(batch, FamilyBatch) else [batch.target]
    scale = torch.cat([t.flatten() for t in targets]).var().item() * sum(t.numel() for t in targets)
    squared: dict[str, dict[int, float]] = {name: {bits: 0.0 for bits in choices} for name in layers}
    baseline = 0.0
    parts = list(_parts(model, batch, chunk, device))
    bar = tqdm(total=len(layers) * len(parts), desc="sensitivity", disable=not progress, dynamic_ncols=True)
    try:
        for output_from, depth, target in parts:
            as_is = output_from(depth)
            baseline += float((as_is - target).pow(2).sum())
            reference = as_is if metric == "perturbation" else target
            unchanged = float((as_is - reference).pow(2).sum())  # a layer at its own bits: the model as it is
            for name in layers:
                layer: QuantLinear = model.get_submodule(name)
                start, original = block_index(name) if depth else 0, layer.act_bits
                try:
                    for bits in choices:
                        if bits == original:
                            squared[name][bits] += unchanged
                            continue
                        layer.set_act_bits(bits)
                        squared[name][bits] += float((output_from(start) - reference).pow(2).sum())
                finally:
                    layer.set_act_bits(original)
                bar.update()
    finally:
        bar.close()
        model.train(was_training)
    offset = baseline if metric == "error-increase" else 0.0
    table = {name: {bits: (squared[name][bits] - offset) / scale for bits in choices} for name in layers}
    return Sensitivity(table, baseline / scale, _layer_macs(model, batch, layers), metric)


def _parts(model: nn.Module, batch, chunk: int, device):
    """(output_from(start), depth, target) per chunk of the batch; depth 0: the model reruns whole."""
    if isinstance(batch, FamilyBatch):
        for inputs, target in zip(batch.inputs, batch.targets):
            yield (lambda start, inputs=inputs: run_model(model, inputs)), 0, target.to(device)
        return
    for i in range(0, len(batch.t), chunk):
        part = CalibrationBatch(
            batch.x_t[i : i + chunk],
            batch.t[i : i + chunk],
            None if batch.y is None else batch.y[i : i + chunk],
            batch.target[i : i + chunk],
        ).to(device)
        output_from, depth = _partial_forward(model, part)
        yield output_from, depth, part.target


def _layer_macs(model: nn.Module, batch, layers: list[str]) -> dict[str, int]:
    """Each layer's MACs in one forward of one calibration input."""
    if isinstance(batch, FamilyBatch):
        tokens: dict[str, int] = {}

        def count(name: str):
            def hook(module, args, out) -> None:  # returns None: the output stays the layer's
                tokens.setdefault(name, args[0].numel() // module.in_features)

            return hook

        hooks = [model.get_submodule(n).register_forward_hook(count(n)) for n in layers]
        try:
            run_model(model, batch.inputs[0])
        finally:
            for h in hooks:
                h.remove()
        return {
            n: tokens.get(n, 0) * model.get_submodule(n).in_features * model.get_submodule(n).out_features
            for n in layers
        }
    count = _tokens(model, batch)
    return {n: count * model.get_submodule(n).in_features * model.get_submodule(n).out_features for n in layers}


def _tokens(model: nn.Module, batch: CalibrationBatch) -> int:
    if model_family(model) == DIT.name:
        return model.x_embedder.num_patches
    return (batch.x_t.shape[-1] // model.config.patch_size) ** 2


def _partial_forward(model: nn.Module, b: CalibrationBatch):
    """(output_from(start), depth): the model's output on ``b`` recomputed from block ``start`` on."""
    if model_family(model) != DIT.name:
        return (lambda start: model_output(model, b.x_t, b.t, b.y)), len(model.transformer_blocks)
    c = model.condition(b.t, b.y)
    hidden = [model.x_embedder(b.x_t) + model.pos_embed]
    for block in model.blocks:
        hidden.append(block(hidden[-1], c))

    def output_from(start: int) -> torch.Tensor:
        h = hidden[start]
        for block in model.blocks[start:]:
            h = block(h, c)
        return model.head(h, c)

    return output_from, len(model.blocks)
