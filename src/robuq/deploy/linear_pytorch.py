"""The integer linear's PyTorch path: any device, any input dtype, every configuration.

It is what a layer runs where no faster path accepts it (``robuq.deploy.integer_linear`` chooses), the
path the others are checked against, and the frame the C path fills with its kernels: rows in blocks,
each block rotated and quantized, multiplied on integers, then rescaled.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from robuq.deploy import gemm as gemm_paths
from robuq.quant.activation import activation_levels
from robuq.quant.hadamard import hadamard_transform


def cuda_int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 (m, k) × int8 (k, n) → int32 on a GPU, through PyTorch's integer GEMM where it applies."""
    if a.shape[0] <= 16 or a.shape[1] % 8 or b.shape[1] % 8:
        # cuBLASLt's int8 GEMM wants m > 16 and k, n multiples of 8. In float64 the integer sums are
        # exact (|sum| ≤ 128·128·k < 2^53), which fp32 would not guarantee for 8-bit weights.
        return (a.double() @ b.double()).to(torch.int32)
    return torch._int_mm(a, b)


def in_row_blocks(layer, x: torch.Tensor, rows_into) -> torch.Tensor:
    """The layer's output for ``x``, ``rows_into(rows, out_rows)`` filling it a block of rows at a time (blocks
    keep the temporaries under glibc's mmap threshold, so their pages are reused rather than faulted in afresh
    on every call; a per-sample scale spans a sample's tokens, so that granularity is one block)."""
    flat = x.reshape(-1, layer.in_features)
    out = torch.empty(flat.shape[0], layer.out_features, dtype=torch.float32, device=x.device)
    if layer.act_granularity == "token":
        for start in range(0, flat.shape[0], layer.block_rows):
            rows_into(flat[start : start + layer.block_rows], out[start : start + layer.block_rows])
    else:
        rows_into(x, out)
    return out.reshape(*x.shape[:-1], layer.out_features)


def input_pass(layer, x: torch.Tensor):
    """(int8 levels, scale, offset, None) of the rotated input rows in PyTorch operations: what the integer
    GEMM multiplies (a fused pass may return the low-rank branch V·x' where None stands)."""
    rotated = hadamard_transform(x, layer.hadamard_signs) if layer.hadamard else x
    q = activation_levels(rotated, layer.act_bits, layer.act_granularity, layer.act_rule, layer.clip_ratio)
    u = q.levels.sub_(layer.level_shift) if layer.level_shift else q.levels
    levels = u.to(torch.int8).reshape(-1, layer.in_features)
    rows, lead = levels.shape[0], rotated.shape[:-1]
    return levels, q.scale.expand(*lead, 1).reshape(rows, 1), q.offset.expand(*lead, 1).reshape(rows, 1), None


def integer_product(layer, levels: torch.Tensor) -> torch.Tensor:
    """levels · the layer's weight levels, exact int32: by the layer's CPU GEMM path on the CPU, on a GPU by
    ``torch._int_mm``."""
    if layer.weight_scale.device.type != "cpu":
        return cuda_int8_matmul(levels, layer.levels_t())
    return gemm_paths.matmul(
        layer.gemm,
        levels,
        layer.weight_levels_t,
        layer._level_sums,
        layer._max_weight,
        packed=layer._avx2_weight,
        act_shift=layer.level_shift,
        act_top=layer.act_top,
    )


def rescale(
    layer, acc: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, branch: torch.Tensor | None
) -> None:
    """y = (s·acc + (o + shift·s)·ΣL)·α + b [+ U·branch] [then GELU]: two scalings and one rank-2 update, all
    in place."""
    torch.mul(acc, scale, out=y)
    y.mul_(layer.weight_scale)
    y.addmm_(torch.cat([offset + layer.level_shift * scale, torch.ones_like(offset)], dim=1), layer._offset_rows)
    finish(layer, y, branch)


class PyTorchLinear:
    """The integer linear ``layer`` (an IntegerLinear) in PyTorch operations; the integer product by the
    layer's CPU GEMM path on the CPU (every path gives the exact int32 sums), by ``torch._int_mm`` on a GPU."""

    name = "pytorch"

    def __init__(self, layer) -> None:
        self.layer = layer

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return in_row_blocks(self.layer, x, self.rows_into)

    def rows_into(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """y (rows × out) = the layer applied to x's rows."""
        layer = self.layer
        levels, scale, offset, _ = input_pass(layer, x)
        branch = low_rank_branch(layer, x.reshape(-1, layer.in_features), levels, scale, offset) if layer.rank else None
        rescale(layer, integer_product(layer, levels), y, scale, offset, branch)

    def input_levels(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(int8 levels, scale, offset) of the rotated input rows: what the integer GEMM multiplies."""
        return input_pass(self.layer, x)[:3]


def low_rank_branch(
    layer, x: torch.Tensor, levels: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor
) -> torch.Tensor:
    """V·x' (rows × rank) with x' the rotated input ("fp") or its fake-quantized levels ("quantized")."""
    if layer.lowrank_input == "fp":
        return F.linear(x, layer._lowrank_down_input)
    # what the training quantizer's fake-quantized output is: offset + level·scale
    return F.linear(torch.addcmul(offset, levels.float() + layer.level_shift, scale), layer.lowrank_down)


def finish(layer, y: torch.Tensor, branch: torch.Tensor | None) -> None:
    """y += U·branch, then the GELU if the layer runs it, in place: the PyTorch twin of the C epilogue's tail."""
    if branch is not None:
        y.addmm_(branch, layer.lowrank_up.t())
    if layer.gelu:
        y.copy_(F.gelu(y, approximate="tanh"))
