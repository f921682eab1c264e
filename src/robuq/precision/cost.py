"""What a (quantized) model costs: per-module weight/activation bits, MACs and bit-operations (BOPs).

BOPs of a matmul = MACs × weight bits × activation bits (full precision counts as 32 × 32), the measure
RobuQ and the binarisation literature use to compare W/A settings. Counts come from one real forward
pass with hooks, so they hold for any input size and any model whose layers are standard modules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from torch.overrides import TorchFunctionMode

from robuq.models.families import UnknownFamilyError, example_inputs, family_of, model_output, run_model
from robuq.quant.attention import QuantAttentionCore
from robuq.quant.linear import LinearQuantConfig, QuantLinear
from robuq.quant.weights import parse_weight_format

FP_BITS = 32
LOWRANK = "low-rank branch"


@dataclass
class ModuleCost:
    name: str
    kind: str
    weight: str  # "fp", "ternary", "int4", or "-" for weight-free matmuls
    weight_bits: float
    act_bits: float
    macs: int
    bops: float


@dataclass
class CostSummary:
    modules: list[ModuleCost] = field(default_factory=list)
    family: str = ""
    kept: dict[str, str] = field(default_factory=dict)  # full-precision parts of the family's map → why
    params: int = 0
    weight_storage_bits: float = 0.0
    fp_weight_storage_bits: float = 0.0

    @property
    def macs(self) -> int:
        return sum(m.macs for m in self.modules)

    @property
    def bops(self) -> float:
        return sum(m.bops for m in self.modules)

    @property
    def fp_bops(self) -> float:
        """BOPs of the same network unquantized (the low-rank branches exist only after quantization)."""
        return sum(m.macs for m in self.modules if m.kind != LOWRANK) * FP_BITS * FP_BITS

    def to_dict(self) -> dict:
        return {
            "family": self.family,
            "kept_full_precision": self.kept,
            "params": self.params,
            "macs": self.macs,
            "bops": self.bops,
            "fp_bops": self.fp_bops,
            "bops_reduction": self.fp_bops / self.bops if self.bops else 1.0,
            "weight_storage_bits": self.weight_storage_bits,
            "compression": self.fp_weight_storage_bits / self.weight_storage_bits if self.weight_storage_bits else 1.0,
            "modules": [m.__dict__ for m in self.modules],
        }

    def format(self, per_module: bool = True) -> str:
        lines = []
        if per_module:
            lines.append(
                f"{'module':<32} {'kind':<18} {'weights':<8} {'W bits':>6} {'A bits':>6} {'MMACs':>9} {'GBOPs':>9}"
            )
            for m in self.modules:
                lines.append(
                    f"{m.name:<32} {m.kind:<18} {m.weight:<8} {m.weight_bits:>6.2f} {m.act_bits:>6.2f} "
                    f"{m.macs / 1e6:>9.2f} {m.bops / 1e9:>9.2f}"
                )
        d = self.to_dict()
        if self.family:
            quantized = [m for m in self.modules if m.kind == "QuantLinear"]
            lines.append(
                f"family {self.family}: {len(quantized)} quantized linears; kept in full precision: "
                + "; ".join(f"{k} ({v})" for k, v in self.kept.items())
            )
        lines.append(
            f"total: {self.params:,} parameters, {self.weight_storage_bits / 8 / 2**20:.2f} MiB of weights "
            f"({d['compression']:.1f}× smaller than the fp32 model), {self.macs / 1e9:.3f} GMACs, {self.bops / 1e12:.3f} TBOPs "
            f"({d['bops_reduction']:.1f}× fewer than the fp32 model)"
        )
        return "\n".join(lines)


def _weight_storage(model: nn.Module) -> tuple[int, float, float]:
    """Parameters, bits to store them (quantized weights at their width plus an fp32 scale per channel, the
    rest at 32), and the bits of the unquantized network in fp32. A quantized linear is counted by its
    shapes, not its tensors: an exported model holds its weights packed in buffers, not as parameters."""
    params, bits, fp_bits = 0, 0.0, 0.0
    inside = set()
    for module in model.modules():
        if not _is_quantized_linear(module):
            continue
        inside.update(id(p) for p in module.parameters())
        weights = module.in_features * module.out_features
        bias = module.out_features if getattr(module, "bias", None) is not None else 0
        lowrank = module.rank * (module.in_features + module.out_features)  # exists only after quantization
        width = parse_weight_format(module.config.weight)
        params += weights + bias + lowrank
        bits += (weights * width + module.out_features * FP_BITS if width else weights * FP_BITS) + (
            bias + lowrank
        ) * FP_BITS
        fp_bits += (weights + bias) * FP_BITS
    for p in model.parameters():
        if id(p) not in inside:
            params += p.numel()
            bits += p.numel() * FP_BITS
            fp_bits += p.numel() * FP_BITS
    return params, bits, fp_bits


def _is_quantized_linear(module: nn.Module) -> bool:
    # QuantLinear, or any inference form of it (deploy's IntegerLinear) that carries its LinearQuantConfig.
    return isinstance(module, QuantLinear) or isinstance(getattr(module, "config", None), LinearQuantConfig)


class _CountAttention(TorchFunctionMode):
    """Counts the full-precision softmax attentions (SDPA calls) of a forward, wherever a family runs them."""

    def __init__(self, summary: CostSummary):
        super().__init__()
        self.summary = summary

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            q, k, v = (list(args) + [kwargs.get(n) for n in ("query", "key", "value")][len(args) :])[:3]
            heads_tokens = q.shape[:-2].numel() * q.shape[-2] * k.shape[-2]
            macs = heads_tokens * (q.shape[-1] + v.shape[-1])
            self.summary.modules.append(
                ModuleCost("attention", "Attention", "-", FP_BITS, FP_BITS, macs, macs * FP_BITS**2)
            )
        return func(*args, **kwargs)


def _run(model: nn.Module, inputs: tuple | dict | None):
    if isinstance(inputs, dict):
        return run_model(model, inputs)
    if inputs is None:
        return run_model(model, example_inputs(model))
    return model_output(model, *inputs)


@torch.no_grad()
def cost_summary(model: nn.Module, inputs: tuple | dict | None = None) -> CostSummary:
    """Cost of one forward pass on ``inputs`` (a class-conditional DiT's (x, t, y), or forward keyword
    arguments; default: one batch at the model's own size), with the family's full-precision parts named."""
    summary = CostSummary()
    try:
        family = family_of(model)
        summary.family, summary.kept = family.name, dict(family.kept)
        summary.kept.update({note: "by the family's map" for note in family.notes})
    except UnknownFamilyError:
        pass
    hooks = []

    def record(name: str, module: nn.Module):
        def hook(mod, args, out):
            x = args[0]
            if _is_quantized_linear(mod):
                tokens = x.numel() // mod.in_features
                w_bits = parse_weight_format(mod.config.weight) or FP_BITS
                a_bits = mod.act_bits or FP_BITS
                macs = tokens * mod.in_features * mod.out_features
                summary.modules.append(
                    ModuleCost(name, "QuantLinear", mod.config.weight, w_bits, a_bits, macs, macs * w_bits * a_bits)
                )
                if mod.rank:
                    lr_macs = tokens * mod.rank * (mod.in_features + mod.out_features)
                    lr_act = a_bits if mod.config.lowrank_input == "quantized" else FP_BITS
                    summary.modules.append(
                        ModuleCost(
                            name + ".lowrank", LOWRANK, "fp", FP_BITS, lr_act, lr_macs, lr_macs * FP_BITS * lr_act
                        )
                    )
            elif isinstance(mod, nn.Linear):
                macs = x.numel() // mod.in_features * mod.in_features * mod.out_features
                summary.modules.append(ModuleCost(name, "Linear", "fp", FP_BITS, FP_BITS, macs, macs * FP_BITS**2))
            elif isinstance(mod, nn.Conv2d):
                macs = out.numel() * mod.in_channels // mod.groups * math.prod(mod.kernel_size)
                summary.modules.append(ModuleCost(name, "Conv2d", "fp", FP_BITS, FP_BITS, macs, macs * FP_BITS**2))
            elif isinstance(mod, QuantAttentionCore):
                q, k, v = args[:3]
                heads_tokens = q.shape[:-2].numel() * q.shape[-2] * k.shape[-2]
                qk, pv = heads_tokens * q.shape[-1], heads_tokens * v.shape[-1]
                bops = qk * mod.bits * mod.bits + pv * mod.probs_bits * mod.bits  # QKᵀ: Q̂·K̂; softmax·V: P̂·V̂
                summary.modules.append(ModuleCost(name, type(mod).__name__, "-", mod.bits, mod.bits, qk + pv, bops))

        return hook

    for name, module in model.named_modules():
        if _is_quantized_linear(module) or isinstance(module, (nn.Linear, nn.Conv2d, QuantAttentionCore)):
            hooks.append(module.register_forward_hook(record(name, module)))
    was_training = model.training
    model.eval()
    try:
        with _CountAttention(summary):
            _run(model, inputs)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    summary.params, summary.weight_storage_bits, summary.fp_weight_storage_bits = _weight_storage(model)
    return summary
