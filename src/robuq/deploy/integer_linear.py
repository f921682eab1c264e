"""Inference-only block linear computed in the integer domain.

    x' = T x                                   (the layer's Hadamard transform)
    x' ≈ s·q + o                               (per-token levels q, scale s, offset o)
    W  = α·L                                   (int8 levels L ∈ {−1,0,1} or int4, scale α per output channel)
    y  = s·(q Lᵀ)·α + o·(1·Lᵀ)·α + b + U(V x')

q Lᵀ is an int8 × int8 product with int32 accumulation, by the GEMM path robuq.deploy.gemm chose for this
CPU (torch._int_mm with VNNI, robuq's AVX2 kernels below it); everything else is a per-row or per-column
rescale. It computes what the fake-quantized training layer computes, up to float rounding.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from robuq.core.quantizer_spec import int8_level_shift
from robuq.deploy import gemm as gemm_paths
from robuq.kernels import native, triton_ops
from robuq.quant.activation import activation_levels
from robuq.quant.hadamard import hadamard_transform
from robuq.quant.linear import QuantLinear
from robuq.quant.primitives import QuantizedTensor


def _int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 (m, k) × int8 (k, n) → int32, through PyTorch's integer GEMM where it applies."""
    if a.device.type == "cuda" and (a.shape[0] <= 16 or a.shape[1] % 8 or b.shape[1] % 8):
        # cuBLASLt's int8 GEMM wants m > 16 and k, n multiples of 8. In float64 the integer sums are
        # exact (|sum| ≤ 128·128·k < 2^53), which fp32 would not guarantee for 8-bit weights.
        return (a.double() @ b.double()).to(torch.int32)
    return torch._int_mm(a, b)


def _derive_after_load(module: "IntegerLinear", _incompatible_keys) -> None:
    module._derive()


# On the AVX2 path the levels live only in that kernel's packing (one int8 copy of the weights, not two);
# state dicts carry them as weight_levels_t, whichever path wrote or reads them.
def _levels_into_state_dict(module: "IntegerLinear", state: dict, prefix: str, _metadata) -> None:
    if module.weight_levels_t is None:
        state[prefix + "weight_levels_t"] = module.levels_t()


def _levels_from_state_dict(module: "IntegerLinear", state: dict, prefix: str, *_args) -> None:
    if module.weight_levels_t is None and prefix + "weight_levels_t" in state:
        module._avx2_weight = gemm_paths.pack_avx2(state.pop(prefix + "weight_levels_t").to(torch.int8), module._shift,
                                                   module._act_top)


class IntegerLinear(nn.Module):
    """Built from a trained QuantLinear, or from the levels and scales an export file stores
    (``weight``: a QuantizedTensor; re-quantizing α·L would not give back α). ``gemm`` names the CPU's
    integer GEMM path (``robuq.deploy.gemm``; default ``"auto"``, chosen by the CPU's capability)."""

    def __init__(self, layer: QuantLinear, weight: QuantizedTensor | None = None, gemm: str = "auto"):
        super().__init__()
        q = weight if weight is not None else layer.quantized_weight()
        if q is None or layer.act_bits is None:
            raise ValueError("IntegerLinear needs quantized weights and quantized activations")
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.config = layer.config  # what it was trained as: cost reports read it
        self.act_bits = layer.act_bits
        self.gemm = gemm_paths.resolve(gemm)
        self.act_granularity, self.act_rule = layer.config.act_granularity, layer.config.act_rule
        self.hadamard = layer.config.hadamard
        self.lowrank_input = layer.config.lowrank_input
        levels = q.levels.to(torch.int8).t().contiguous()  # (in, out): _int_mm's layout
        packs = (self.gemm == "avx2" and levels.device.type == "cpu"
                 and gemm_paths.largest_level(levels) <= gemm_paths.AVX2_MAX_WEIGHT)
        self.register_buffer("weight_levels_t", None if packs else levels)
        self.register_buffer("_avx2_weight", gemm_paths.pack_avx2(levels, self._shift, self._act_top) if packs else None,
                             persistent=False)
        self.register_buffer("weight_scale", q.scale.reshape(-1).float())
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().float())
        # Rows per block: ~16 MiB of fp32 temporaries, under glibc's 32 MiB mmap ceiling, few Python round trips.
        self.block_rows = max(64, 2**22 // max(self.in_features, self.out_features))
        self.register_buffer("hadamard_signs", layer.hadamard_signs)
        ratio = layer.act_quant.effective_clip_ratio()
        self.register_buffer("clip_ratio", None if ratio is None else ratio.detach().float())
        self.rank = layer.rank
        # tanh-GELU on the output, in the epilogue's pass (use_native_kernels sets it for an Mlp's fc1).
        self.gelu = False
        if self.rank:
            self.register_buffer("lowrank_down", layer.lowrank_down.detach().float())
            self.register_buffer("lowrank_up", layer.lowrank_up.detach().float())
        self._derive()
        # Derived tensors follow the stored ones when a state dict is loaded into this module.
        self.register_load_state_dict_post_hook(_derive_after_load)
        self.register_state_dict_post_hook(_levels_into_state_dict)
        self.register_load_state_dict_pre_hook(_levels_from_state_dict)

    def levels_t(self) -> torch.Tensor:
        """The weight levels as an int8 (in, out) tensor, unpacked from the AVX2 packing where that holds them."""
        if self.weight_levels_t is not None:
            return self.weight_levels_t
        return gemm_paths.unpack_avx2(self._avx2_weight, self.in_features, self.out_features)

    def _derive(self) -> None:
        """Tensors computed from the stored ones (not saved): the offset/bias rows and the folded branch."""
        # Rows of the rank-2 update that adds the offset term (o·ΣL·α) and the bias in one pass.
        levels = self.levels_t()
        level_sums = levels.sum(dim=0, dtype=torch.int32)
        self.register_buffer("_level_sums", level_sums, persistent=False)  # the AVX2 GEMM's correction
        self._max_weight = gemm_paths.largest_level(levels)
        level_sums = level_sums.float()
        bias = self.bias if self.bias is not None else torch.zeros_like(self.weight_scale)
        self.register_buffer("_offset_rows", torch.stack([level_sums * self.weight_scale, bias]), persistent=False)
        if self.rank and self.lowrank_input == "fp":
            # V·(T x) = (V T) x: with the rotation folded into the branch, it reads the layer's input and no
            # float copy of the rotated input has to be written.
            down = self.lowrank_down
            self.register_buffer("_lowrank_down_input", hadamard_transform(down, self.hadamard_signs, inverse=True)
                                 if self.hadamard else down, persistent=False)
        if self.rank:  # the epilogue kernel's layout of U: one row of output columns per rank
            self.register_buffer("_lowrank_up_rows", self.lowrank_up.t().contiguous(), persistent=False)
        self._packed_weight = None  # the GPU kernel's packing of the levels, rebuilt on next use
        self._fused = None  # (key, native.TernaryLinearArgs): see _fused_args

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.in_features)
        if self.act_granularity == "token" and triton_ops.enabled_for(x):
            return self._forward_triton(flat).reshape(*lead, self.out_features)
        out = torch.empty(flat.shape[0], self.out_features, dtype=torch.float32, device=x.device)
        fused = self._fused_args(flat, out)
        if fused is not None:  # all rows in one call: it keeps no temporaries beyond a block of rows per thread
            return native.linear_ternary(flat, fused, out).reshape(*lead, self.out_features)
        # Per-token work runs in blocks of rows: the temporaries stay under glibc's mmap threshold, so they
        # are not page-faulted in afresh on every call (measured 1.5–1.8× on DiT-XL/2's fc1/fc2). A
        # per-sample scale spans all of a sample's tokens, so it takes one block.
        if self.act_granularity == "token":
            for start in range(0, flat.shape[0], self.block_rows):
                self._forward_rows(flat[start : start + self.block_rows], out[start : start + self.block_rows])
        else:
            self._forward_rows(x, out)
        return out.reshape(*lead, self.out_features)

    def _fused_args(self, x: torch.Tensor, y: torch.Tensor) -> native.TernaryLinearArgs | None:
        """The arguments of native.linear_ternary, which runs the whole layer in one pass, where it takes the
        layer (per-token low-bit activations on the ternary lookup GEMM) and x; else None. Built once and
        rebuilt when a tensor it reads is replaced (a load, a move) or the GELU or clip ratio changes."""
        if (self._avx2_weight is None or self.act_granularity != "token" or self.act_rule not in native.RULES
                or (self.rank and self.lowrank_input != "fp") or not native.takes(x, y)
                or not gemm_paths.uses_ternary_lookup(self._max_weight, self._shift, self._act_top)):
            return None
        sources = (self._avx2_weight, self._level_sums, self.weight_scale, self._offset_rows, self.hadamard_signs,
                   self.lowrank_down if self.rank else None, self._lowrank_up_rows if self.rank else None)
        key = (self.gelu, None if self.clip_ratio is None else float(self.clip_ratio),
               *(None if t is None else t.data_ptr() for t in sources))
        if self._fused is None or self._fused[0] != key:
            args = native.ternary_linear_args(
                self.in_features, self.out_features, self.hadamard_signs, self.hadamard, self.act_bits, self.act_rule,
                self.clip_ratio, self.lowrank_down if self.rank else None, self._avx2_weight, self._level_sums,
                self.weight_scale, self._offset_rows[0], self._offset_rows[1],
                self._lowrank_up_rows if self.rank else None, self.gelu)
            self._fused = (key, args)
        return self._fused[1]

    @property
    def _shift(self) -> int:
        return int8_level_shift(self.act_bits)

    @property
    def _act_top(self) -> int:
        return 2**self.act_bits - 1

    def _quantize_rows(self, x_rot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(int8 levels, scale, offset) of the rotated input, rows × features and rows × 1."""
        q = activation_levels(x_rot, self.act_bits, self.act_granularity, self.act_rule, self.clip_ratio)
        u = q.levels.sub_(self._shift) if self._shift else q.levels
        levels = u.to(torch.int8).reshape(-1, self.in_features)
        rows, lead = levels.shape[0], x_rot.shape[:-1]
        return levels, q.scale.expand(*lead, 1).reshape(rows, 1), q.offset.expand(*lead, 1).reshape(rows, 1)

    def _lowrank_branch(self, x: torch.Tensor, levels: torch.Tensor, scale: torch.Tensor,
                        offset: torch.Tensor) -> torch.Tensor:
        """V·x' (rows × rank) with x' the rotated input ("fp") or its fake-quantized levels ("quantized")."""
        if self.lowrank_input == "fp":
            return F.linear(x, self._lowrank_down_input)
        # what the training quantizer's fake-quantized output is: offset + level·scale
        return F.linear(torch.addcmul(offset, levels.float() + self._shift, scale), self.lowrank_down)

    def _finish(self, y: torch.Tensor, branch: torch.Tensor | None) -> None:
        """y += U·branch, then the GELU if fused, in place: the PyTorch twin of the epilogue kernel's tail."""
        if branch is not None:
            y.addmm_(branch, self.lowrank_up.t())
        if self.gelu:
            y.copy_(F.gelu(y, approximate="tanh"))

    def input_levels(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(int8 levels, scale, offset) of the rotated input rows: what the integer GEMM multiplies.

        Per-token quantization takes one fused pass where a kernel can (Triton on the GPU, C on the CPU):
        Hadamard, statistics and levels, with no float copy of the rotated rows."""
        return self._input_pass(x, with_branch=False)[:3]

    def _input_pass(self, x: torch.Tensor, with_branch: bool):
        """input_levels, plus the low-rank branch V·x' (rows × rank) where the C pass computes it on the
        rotated rows while they are in cache (else None)."""
        if self.act_granularity == "token":
            if self.hadamard and triton_ops.can_hadamard(x) and self.act_rule in triton_ops.RULES:
                _, levels, scale, offset = triton_ops.hadamard_quantize(
                    x, self.hadamard_signs, self.act_bits, self.act_rule, self.clip_ratio, store_rotated=False)
                return levels, scale[:, None], offset[:, None], None
            if native.takes(x) and self.act_rule in native.RULES:
                down = self.lowrank_down if with_branch and self.rank and self.lowrank_input == "fp" else None
                _, levels, scale, offset, branch = native.hadamard_quantize(
                    x, self.hadamard_signs, self.hadamard, self.act_bits, self.act_rule, self.clip_ratio,
                    keep_rotated=False, down=down)
                return levels, scale, offset, branch
        return *self._quantize_rows(hadamard_transform(x, self.hadamard_signs) if self.hadamard else x), None

    def _forward_rows(self, x: torch.Tensor, y: torch.Tensor) -> None:
        levels, scale, offset, branch = self._input_pass(x, with_branch=True)
        acc = (_int8_matmul(levels, self.levels_t()) if levels.device.type != "cpu" else
               gemm_paths.matmul(self.gemm, levels, self.weight_levels_t, self._level_sums, self._max_weight,
                                 packed=self._avx2_weight, act_shift=self._shift, act_top=self._act_top))
        if self.rank and branch is None:
            branch = self._lowrank_branch(x.reshape(-1, self.in_features), levels, scale, offset)
        if native.takes(y) and y.is_contiguous():
            native.rescale(acc, y, scale.contiguous(), (offset + self._shift * scale).contiguous(), self.weight_scale,
                           self._offset_rows[0], self._offset_rows[1], branch,
                           self._lowrank_up_rows if self.rank else None, self.gelu)
            return
        # y = (s·acc + (o + shift·s)·ΣL)·α + b, as two scalings and one rank-2 update, all in place.
        torch.mul(acc, scale, out=y)
        y.mul_(self.weight_scale)
        y.addmm_(torch.cat([offset + self._shift * scale, torch.ones_like(offset)], dim=1), self._offset_rows)
        self._finish(y, branch)

    def _forward_triton(self, x: torch.Tensor) -> torch.Tensor:
        """The GPU path: the input's levels, then the low-bit matmul with its rescale fused."""
        levels, scale, offset = self.input_levels(x)
        weight, packed = self._kernel_weight()
        y = triton_ops.lowbit_matmul(levels, weight, packed, scale.reshape(-1).contiguous(),
                                     (offset + self._shift * scale).reshape(-1).contiguous(), self.weight_scale,
                                     self._offset_rows[0].contiguous(), self.bias)
        self._finish(y, self._lowrank_branch(x, levels, scale, offset) if self.rank else None)
        return y

    def _kernel_weight(self) -> tuple[torch.Tensor, bool]:
        """Ternary weights go to the kernel at 2 bits each (a quarter of int8's memory traffic), built once
        per device; other widths stay int8."""
        if self.config.weight != "ternary" or self.in_features % 4:
            return self.levels_t(), False
        cached = self._packed_weight
        if cached is None or cached.device != self._level_sums.device:
            cached = self._packed_weight = triton_ops.pack_ternary_columns(self.levels_t())
        return cached, True

    def extra_repr(self) -> str:
        gelu = ", then tanh-GELU" if self.gelu else ""
        return (f"{self.in_features}→{self.out_features}, int8 weights, a={self.act_bits}, lowrank={self.rank}{gelu}, "
                f"cpu gemm={self.gemm}")


def convert_to_integer(model: nn.Module, weights: dict[str, QuantizedTensor] | None = None,
                       only_given: bool = False, gemm: str = "auto") -> nn.Module:
    """Replace, in place, every QuantLinear with quantized weights and activations by an IntegerLinear
    (with the given levels and scales where ``weights`` has them, popped from it as they are used;
    ``only_given``: just those layers, whose float weights need not exist; ``gemm``: their CPU GEMM path)."""
    weights = weights or {}
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear) and m.act_bits is not None
               and (n in weights if only_given else m.quantized_weight() is not None)]
    for name, layer in targets:
        # pop: the caller's levels are freed layer by layer once the integer copy exists (peak memory).
        model.set_submodule(name, IntegerLinear(layer, weights.pop(name, None), gemm))
    return model
