"""Per-layer sensitivity to activation bit-width: how much the output error against the teacher grows
when only that layer drops to b bits (METHOD.md §7, the default metric)."""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from robuq.train.calibration import CalibrationBatch
from robuq.models.families import DIT, model_family, model_output
from robuq.quant.linear import QuantLinear
from robuq.quantize.policy import AUTO, layer_role, layout_patterns

__all__ = ["Sensitivity", "block_index", "block_layers", "layer_role", "measure_sensitivity"]


def block_layers(model: nn.Module, layout: str = AUTO) -> list[str]:
    """The QuantLinears AMPN allocates bits to: the block linears of every block (q, k and v apart in
    diffusers' layout), in depth order."""
    patterns = layout_patterns(layout)
    return [n for n, m in model.named_modules() if isinstance(m, QuantLinear) and any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def block_index(name: str) -> int:
    """The block a layer belongs to, from its name (``blocks.N.…`` or diffusers' ``transformer_blocks.N.…``)."""
    match = re.match(r"(?:transformer_)?blocks\.(\d+)\.", name)
    if match is None:
        raise ValueError(f"{name!r} is not inside a DiT block (blocks.N.… or transformer_blocks.N.…)")
    return int(match.group(1))


@dataclass
class Sensitivity:
    table: dict[str, dict[int, float]]  # layer → bits → increase of the relative output error
    baseline_error: float  # relative output error of the model as it stands
    macs: dict[str, int] = field(default_factory=dict)  # per layer, one forward of one calibration image

    def to_dict(self) -> dict:
        return {"baseline_error": self.baseline_error, "macs": self.macs,
                "layers": {n: {str(b): v for b, v in row.items()} for n, row in self.table.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> "Sensitivity":
        table = {n: {int(b): float(v) for b, v in row.items()} for n, row in data["layers"].items()}
        return cls(table, float(data["baseline_error"]), {k: int(v) for k, v in data.get("macs", {}).items()})


@torch.no_grad()
def measure_sensitivity(
    model: nn.Module, batch: CalibrationBatch, choices: tuple[int, ...] = (1, 2, 3, 4), layers: list[str] | None = None,
    progress: bool = True,
) -> Sensitivity:
    """For every layer and every b in ``choices``: error(layer at b bits, the rest as they are) − error(as is).

    ``model`` is robuq's DiT or a diffusers DiTTransformer2DModel. For robuq's DiT, block inputs are
    computed once and cached, so changing a layer in block i re-runs only blocks i…N; a diffusers model
    runs its own forward for each measurement (its blocks take the raw timestep and label, and its
    output head is part of that forward, not a module of its own).
    """
    device = next(model.parameters()).device
    b = batch.to(device)
    layers = layers if layers is not None else block_layers(model)
    was_training = model.training
    model.eval()
    scale = b.target.var()
    if model_family(model) == DIT:
        c = model.condition(b.t, b.y)
        hidden = [model.x_embedder(b.x_t) + model.pos_embed]
        for block in model.blocks:
            hidden.append(block(hidden[-1], c))

        def output_from(start: int) -> torch.Tensor:
            h = hidden[start]
            for block in model.blocks[start:]:
                h = block(h, c)
            return model.head(h, c)

        depth, tokens = len(model.blocks), hidden[0].shape[1]
    else:
        def output_from(start: int) -> torch.Tensor:
            return model_output(model, b.x_t, b.t, b.y)

        depth, tokens = len(model.transformer_blocks), (b.x_t.shape[-1] // model.config.patch_size) ** 2

    def error_from(start: int) -> float:
        return float((output_from(start) - b.target).pow(2).mean() / scale)

    baseline = error_from(depth)
    table: dict[str, dict[int, float]] = {}
    macs: dict[str, int] = {}
    try:
        for name in tqdm(layers, desc="sensitivity", disable=not progress, dynamic_ncols=True):
            layer: QuantLinear = model.get_submodule(name)
            start = block_index(name)
            original = layer.act_bits
            try:
                table[name] = {}
                for bits in choices:
                    layer.set_act_bits(bits)
                    table[name][bits] = error_from(start) - baseline
            finally:
                layer.set_act_bits(original)
            macs[name] = tokens * layer.in_features * layer.out_features
    finally:
        model.train(was_training)
    return Sensitivity(table, baseline, macs)
