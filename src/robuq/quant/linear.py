"""QuantLinear: optional online Hadamard, a full-precision low-rank branch, quantized weights and inputs.

    x' = T x                       (T = H·diag(signs)/√n, or the identity)
    y  = Q_w(W_res) Q_a(x') + b + U (V x'')      x'' = x' (default) or Q_a(x')

where W T ᵀ = W_res + U V and U V is the rank-r truncated SVD of the rotated weight W Tᵀ, so that at
full precision the layer computes exactly W x + b.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from robuq.core.options import check_field_types, check_known_fields
from robuq.core.quantizer_spec import check_bits
from robuq.quant.activation import ActivationQuantizer
from robuq.quant.hadamard import hadamard_transform, random_signs
from robuq.quant.primitives import in_fp32
from robuq.quant.weights import fake_quantize_weight, parse_weight_format, quantize_weight
from robuq.core.errors import RobuqError


# The paper's low-rank branch: rank 16 in DiT-XL/2, whose width is 1,152.
PAPER_LOWRANK_SHARE = 16 / 1152


@dataclass
class LinearQuantConfig:
    """How one linear layer is quantized. Serialises to plain JSON/YAML via ``to_dict``."""

    weight: str = "ternary"  # "fp", "ternary", "int2" … "int8"
    act_bits: int | None = 4  # None: full-precision inputs
    act_granularity: str = "token"  # "token" or "tensor"
    act_rule: str = "minmax"  # "minmax" or "gaussian"
    learn_clip: bool = False
    hadamard: bool = False
    hadamard_signs: bool = False  # random ±1 flips before H (QuaRot-style)
    lowrank_rank: int = 0
    lowrank_share: float | None = None  # rank as a share of the layer's width min(in, out); replaces lowrank_rank
    lowrank_trainable: bool = True
    lowrank_input: str = "fp"  # the branch sees the full-precision ("fp") or the quantized ("quantized") x'

    def __post_init__(self) -> None:
        check_field_types(self, "linear quantization")
        parse_weight_format(self.weight)
        if self.act_bits is not None:
            check_bits(self.act_bits)
        if self.lowrank_rank < 0:
            raise RobuqError(f"lowrank_rank must be ≥ 0, got {self.lowrank_rank}")
        if self.lowrank_share is not None and not 0 <= self.lowrank_share <= 1:
            raise RobuqError(
                f"lowrank_share must lie in [0, 1] (a share of the layer's width), got {self.lowrank_share}"
            )
        if self.lowrank_input not in ("fp", "quantized"):
            raise RobuqError(f"lowrank_input must be 'fp' or 'quantized', got {self.lowrank_input!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def rank_for(self, in_features: int, out_features: int) -> int:
        """The low-rank branch's rank in a layer of this shape: ``lowrank_rank``, or ``lowrank_share`` of the
        width min(in, out) rounded to the nearest integer — the model width for a DiT block's four linears,
        so that the paper's 16 of 1,152 (``PAPER_LOWRANK_SHARE``) gives 3 at width 192 and 43 at 3,072."""
        width = min(in_features, out_features)
        rank = self.lowrank_rank if self.lowrank_share is None else int(self.lowrank_share * width + 0.5)
        return min(rank, width)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LinearQuantConfig":
        return cls(**check_known_fields(data, cls, "linear quantization"))


class QuantLinear(nn.Module):
    """A drop-in replacement for ``nn.Linear``; build it with ``QuantLinear.from_linear``."""

    def __init__(self, in_features: int, out_features: int, bias: bool, config: LinearQuantConfig, seed: int = 0):
        super().__init__()
        self.in_features, self.out_features, self.config = in_features, out_features, config
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        if config.hadamard and config.hadamard_signs:
            self.register_buffer("hadamard_signs", random_signs(in_features, seed))
        else:
            self.hadamard_signs = None
        rank = config.rank_for(in_features, out_features)
        self.rank = rank
        if rank:
            self.lowrank_down = nn.Parameter(torch.zeros(rank, in_features), requires_grad=config.lowrank_trainable)
            self.lowrank_up = nn.Parameter(torch.zeros(out_features, rank), requires_grad=config.lowrank_trainable)
        self.act_quant = ActivationQuantizer(
            config.act_bits, config.act_granularity, config.act_rule, config.learn_clip
        )
        # True when ``weight`` already holds α·L (an exported file's levels): quantizing it again would
        # change α, so the forward uses it as it is. The config still says what the layer is (ternary).
        self.stores_quantized_weight = False

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, config: LinearQuantConfig, seed: int = 0, initialize: bool = True
    ) -> "QuantLinear":
        """Rotate ``linear``'s weight into the Hadamard basis, split off the SVD branch, keep the residual.

        ``initialize=False`` skips the (costly) SVD when a state_dict will be loaded over the result anyway.
        """
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, config, seed)
        module.to(linear.weight.device)
        with torch.no_grad():
            rotated = module.rotate_weight(linear.weight.float()) if initialize else linear.weight.float()
            if module.rank and initialize:
                U, S, Vh = torch.linalg.svd(rotated.double(), full_matrices=False)
                root = S[: module.rank].sqrt()
                module.lowrank_up.copy_(U[:, : module.rank] * root)
                module.lowrank_down.copy_(root[:, None] * Vh[: module.rank])
                rotated = rotated - (module.lowrank_up.double() @ module.lowrank_down.double()).float()
            module.weight.copy_(rotated)
            if linear.bias is not None:
                module.bias.copy_(linear.bias)
        return module.to(dtype=linear.weight.dtype)

    def rotate_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """W Tᵀ: each row w becomes T w, so that (W Tᵀ)(T x) = W x."""
        return hadamard_transform(weight, self.hadamard_signs) if self.config.hadamard else weight

    def rotate_input(self, x: torch.Tensor) -> torch.Tensor:
        return hadamard_transform(x, self.hadamard_signs) if self.config.hadamard else x

    @property
    def act_bits(self) -> int | None:
        return self.act_quant.bits

    def set_act_bits(self, bits: int | None) -> None:
        """Change the input bit-width (a bit plan does this); the layer's config follows, so it never
        describes bits the layer no longer uses."""
        self.act_quant.bits = None if bits is None else check_bits(bits)
        self.config = replace(self.config, act_bits=self.act_quant.bits)

    def quantized_weight(self):
        """Levels and per-channel scales of the residual weight (None when weights are full precision)."""
        if self.stores_quantized_weight:
            raise RobuqError(
                "this layer holds already-quantized weights (α·L from an export); its levels are in the file"
            )
        return quantize_weight(self.weight.detach(), self.config.weight)

    def _quantized_operands(self, x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x_rot = self.rotate_input(x)
        weight = weight if self.stores_quantized_weight else fake_quantize_weight(weight, self.config.weight)
        return x_rot, self.act_quant(x_rot), weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_rot, x_q, weight = in_fp32(self._quantized_operands, x, self.weight)
        y = F.linear(x_q, weight, self.bias)
        if self.rank:
            branch_in = x_rot if self.config.lowrank_input == "fp" else x_q
            y = y + F.linear(F.linear(branch_in, self.lowrank_down), self.lowrank_up)
        return y

    def extra_repr(self) -> str:
        c = self.config
        parts = [f"{self.in_features}→{self.out_features}", f"w={c.weight}", f"a={self.act_bits}"]
        if c.hadamard:
            parts.append("hadamard" + ("+signs" if c.hadamard_signs else ""))
        if self.rank:
            parts.append(f"lowrank={self.rank}")
        return ", ".join(parts)
