"""Per-layer sensitivity to activation bit-width: how much the output error against the teacher grows
when only that layer drops to b bits (METHOD.md §7, the default metric)."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from robuq.train.calibration import CalibrationBatch
from robuq.models.dit import DiT
from robuq.quant.linear import QuantLinear
from robuq.quantize.policy import BLOCK_ROLES, LAYOUTS


def block_layers(model: DiT, layout: str = "dit") -> list[str]:
    """The QuantLinears AMPN allocates bits to: the four block linears of every block, in depth order."""
    patterns = [p for role in BLOCK_ROLES for p in LAYOUTS[layout][role]]
    return [n for n, m in model.named_modules() if isinstance(m, QuantLinear) and any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def layer_role(name: str) -> str:
    """"qkv", "proj", "fc1" or "fc2" for a DiT block linear's name."""
    for role in BLOCK_ROLES:
        if name.endswith(role):
            return role
    raise ValueError(f"{name!r} is not a DiT block linear (…attn.qkv, attn.proj, mlp.fc1 or mlp.fc2)")


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
    model: DiT, batch: CalibrationBatch, choices: tuple[int, ...] = (1, 2, 3, 4), layers: list[str] | None = None,
    progress: bool = True,
) -> Sensitivity:
    """For every layer and every b in ``choices``: error(layer at b bits, the rest as they are) − error(as is).

    Block inputs are computed once and cached, so changing a layer in block i re-runs only blocks i…N.
    """
    device = next(model.parameters()).device
    b = batch.to(device)
    layers = layers if layers is not None else block_layers(model)
    was_training = model.training
    model.eval()
    scale = b.target.var()
    c = model.condition(b.t, b.y)
    hidden = [model.x_embedder(b.x_t) + model.pos_embed]
    for block in model.blocks:
        hidden.append(block(hidden[-1], c))

    def error_from(start: int) -> float:
        h = hidden[start]
        for block in model.blocks[start:]:
            h = block(h, c)
        return float((model.head(h, c) - b.target).pow(2).mean() / scale)

    baseline = error_from(len(model.blocks))
    table: dict[str, dict[int, float]] = {}
    macs: dict[str, int] = {}
    tokens = hidden[0].shape[1]
    try:
        for name in tqdm(layers, desc="sensitivity", disable=not progress, dynamic_ncols=True):
            layer: QuantLinear = model.get_submodule(name)
            parts = name.split(".")
            if parts[0] != "blocks" or not parts[1].isdigit():
                raise ValueError(f"{name!r} is not inside robuq's DiT blocks (blocks.N.…); pass a robuq DiT")
            start = int(parts[1])
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
