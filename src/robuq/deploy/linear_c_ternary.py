"""The integer linear as one C call: ternary weights on the AVX2 lookup GEMM with low-bit activations.

``native.linear_ternary`` rotates, quantizes, multiplies and rescales blocks of rows in one pass, keeping no
temporaries beyond a block per thread. Its arguments (pointers into the layer's tensors, the rule, the GELU)
are converted once, when the path is built; the layer builds a new path whenever those tensors are
replaced or the GELU changes.
"""

from __future__ import annotations

import torch

from robuq.deploy import gemm as gemm_paths
from robuq.deploy.linear_c import CLinear, branch_down, fused_input_pass
from robuq.kernels import native


class CTernaryLinear:
    """The layer in one ``native.linear_ternary`` call (``input_levels`` as the C path computes them)."""

    name = "c-ternary"

    @staticmethod
    def accepts(layer) -> bool:
        return (
            CLinear.accepts(layer)
            and layer._avx2_weight is not None
            and layer.act_granularity == "token"
            and layer.act_rule in native.RULES
            and (not layer.rank or layer.lowrank_input == "fp")
            and gemm_paths.uses_ternary_lookup(layer._max_weight, layer.level_shift, layer.act_top)
        )

    def __init__(self, layer) -> None:
        self.layer = layer
        self.arguments = native.ternary_linear_args(
            layer.in_features,
            layer.out_features,
            layer.hadamard_signs,
            layer.hadamard,
            layer.act_bits,
            layer.act_rule,
            layer.clip_ratio,
            branch_down(layer),
            layer._avx2_weight,
            layer._level_sums,
            layer.weight_scale,
            layer._offset_rows[0],
            layer._offset_rows[1],
            layer._lowrank_up_rows if layer.rank else None,
            layer.gelu,
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.layer.in_features)
        out = torch.empty(rows.shape[0], self.layer.out_features, dtype=torch.float32)
        return native.linear_ternary(rows, self.arguments, out).reshape(*x.shape[:-1], self.layer.out_features)

    def input_levels(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(int8 levels, scale, offset) as the fused call computes them inside."""
        return fused_input_pass(self.layer, x, None)[:3]
