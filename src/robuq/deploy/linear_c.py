"""The integer linear's C path on the CPU: the PyTorch path's steps with its passes over the rows in C.

Per-token activations under a rule the C kernels implement take one fused pass (Hadamard, statistics and
levels, and the low-rank branch while the rotated rows are in cache, with no float copy of them); the
integer product is the layer's CPU GEMM path; the rescale, branch and GELU are one C epilogue. The kernels
compute in float32 whatever the input's dtype.
"""

from __future__ import annotations

import torch

from robuq.deploy import linear_pytorch
from robuq.deploy.linear_pytorch import in_row_blocks, integer_product, low_rank_branch
from robuq.kernels import native


def branch_down(layer) -> torch.Tensor | None:
    """The branch's down-projection a fused input pass applies (V folded with the rotation: see IntegerLinear)."""
    return layer.lowrank_down if layer.rank and layer.lowrank_input == "fp" else None


def fused_input_pass(layer, x: torch.Tensor, down: torch.Tensor | None):
    """(int8 levels, scale, offset, V·x' or None) of the rows in one C pass."""
    _, levels, scale, offset, branch = native.hadamard_quantize(
        x,
        layer.hadamard_signs,
        layer.hadamard,
        layer.act_bits,
        layer.act_rule,
        layer.clip_ratio,
        keep_rotated=False,
        down=down,
    )
    return levels, scale, offset, branch


def takes_fused_input_pass(layer) -> bool:
    return layer.act_granularity == "token" and layer.act_rule in native.RULES


class CLinear:
    """The layer on robuq's C kernels (float32 CPU tensors, kernels built and enabled when it is chosen)."""

    name = "c"

    @staticmethod
    def accepts(layer) -> bool:
        return native.takes(layer.weight_scale)

    def __init__(self, layer) -> None:
        self.layer = layer
        self.fused = takes_fused_input_pass(layer)
        self.down = branch_down(layer)
        self.up_rows = layer._lowrank_up_rows if layer.rank else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return in_row_blocks(self.layer, x, self.rows_into)

    def input_pass(self, x: torch.Tensor, with_branch: bool = True):
        if self.fused:
            return fused_input_pass(self.layer, x, self.down if with_branch else None)
        return linear_pytorch.input_pass(self.layer, x)

    def input_levels(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.input_pass(x, with_branch=False)[:3]

    def rows_into(self, x: torch.Tensor, y: torch.Tensor) -> None:
        layer = self.layer
        levels, scale, offset, branch = self.input_pass(x)
        if layer.rank and branch is None:
            branch = low_rank_branch(layer, x.reshape(-1, layer.in_features), levels, scale, offset)
        native.rescale(
            integer_product(layer, levels),
            y,
            scale.contiguous(),
            (offset + layer.level_shift * scale).contiguous(),
            layer.weight_scale,
            layer._offset_rows[0],
            layer._offset_rows[1],
            branch,
            self.up_rows,
            layer.gelu,
        )
