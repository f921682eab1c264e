"""The integer linear's C path on the CPU: the PyTorch path's frame with its passes over the rows in C.

Per-token activations under a rule the C kernels implement take one fused pass (Hadamard, statistics and
levels, and the low-rank branch while the rotated rows are in cache, with no float copy of them); the
integer product is the layer's CPU GEMM path; the rescale, branch and GELU are one C epilogue. The kernels
compute in float32 whatever the input's dtype.
"""

from __future__ import annotations

import torch

from robuq.deploy.linear_pytorch import PyTorchLinear
from robuq.kernels import native


class CLinear(PyTorchLinear):
    """The layer on robuq's C kernels (float32 CPU tensors, kernels built and enabled when it is chosen)."""

    name = "c"

    @staticmethod
    def accepts(layer) -> bool:
        return native.takes(layer.weight_scale)

    def __init__(self, layer) -> None:
        super().__init__(layer)
        if layer.act_granularity == "token" and layer.act_rule in native.RULES:
            self.input_pass = self.fused_input_pass
        # the branch's down-projection the input pass applies (V folded with the rotation: see IntegerLinear)
        self.down = layer.lowrank_down if layer.rank and layer.lowrank_input == "fp" else None
        self.up_rows = layer._lowrank_up_rows if layer.rank else None

    def fused_input_pass(self, x: torch.Tensor, with_branch: bool = True):
        layer = self.layer
        _, levels, scale, offset, branch = native.hadamard_quantize(
            x,
            layer.hadamard_signs,
            layer.hadamard,
            layer.act_bits,
            layer.act_rule,
            layer.clip_ratio,
            keep_rotated=False,
            down=self.down if with_branch else None,
        )
        return levels, scale, offset, branch

    def rescale(
        self, acc: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, branch: torch.Tensor | None
    ) -> None:
        layer = self.layer
        native.rescale(
            acc,
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
