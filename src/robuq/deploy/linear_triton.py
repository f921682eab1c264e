"""The integer linear on the GPU: robuq's Triton kernels for per-token activations.

One kernel rotates and quantizes the rows (where it splits the layer's width and implements its rule;
else PyTorch does), a second multiplies the levels by the weights with the rescale fused; ternary weights go
to it at 2 bits each, packed when the path is built (a quarter of int8's memory traffic).
"""

from __future__ import annotations

import torch

from robuq.deploy import linear_pytorch
from robuq.deploy.linear_pytorch import finish, low_rank_branch
from robuq.kernels import triton_ops


class TritonLinear:
    """The layer on robuq's Triton kernels (CUDA tensors, or CPU tensors under Triton's interpreter)."""

    name = "triton"

    @staticmethod
    def accepts(layer) -> bool:
        return layer.act_granularity == "token" and triton_ops.enabled_for(layer.weight_scale)

    def __init__(self, layer) -> None:
        self.layer = layer
        self.fused_quantize = layer.hadamard and layer.act_rule in triton_ops.RULES
        self.packed = layer.config.weight == "ternary" and layer.in_features % 4 == 0
        levels = layer.levels_t()
        self.weight = triton_ops.pack_ternary_columns(levels) if self.packed else levels

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        rows = x.reshape(-1, layer.in_features)
        levels, scale, offset = self.input_levels(rows)
        y = triton_ops.lowbit_matmul(
            levels,
            self.weight,
            self.packed,
            scale.reshape(-1).contiguous(),
            (offset + layer.level_shift * scale).reshape(-1).contiguous(),
            layer.weight_scale,
            layer._offset_rows[0].contiguous(),
            layer.bias,
        )
        finish(layer, y, low_rank_branch(layer, rows, levels, scale, offset) if layer.rank else None)
        return y.reshape(*x.shape[:-1], layer.out_features)

    def input_levels(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        layer = self.layer
        if self.fused_quantize and triton_ops.can_hadamard(x):  # the input's dtype and width: see can_hadamard
            _, levels, scale, offset = triton_ops.hadamard_quantize(
                x, layer.hadamard_signs, layer.act_bits, layer.act_rule, layer.clip_ratio, store_rotated=False
            )
            return levels, scale[:, None], offset[:, None]
        return linear_pytorch.input_pass(layer, x)[:3]
