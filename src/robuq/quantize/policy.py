"""Model surgery: ``quantize_(model, config)`` swaps modules by name according to a precision policy.

A policy is an ordered list of rules (name pattern → ``LinearQuantConfig``) plus the attention setting;
the first rule whose pattern matches a linear layer's qualified name decides how it is quantized, and
layers no rule matches stay as they are. Presets are policies — the paper's baselines are
configurations of this one code path, not separate implementations.
"""
from __future__ import annotations

import fnmatch
import json
import zlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import torch.nn as nn

from robuq.core.quantizer_spec import check_bits
from robuq.models.dit import AttentionCore
from robuq.quant.attention import QuantAttentionCore
from robuq.quant.linear import LinearQuantConfig, QuantLinear
from robuq.quantize.plan import BitPlan, PlanError, as_bits

# The four block linears, the adaLN linear and the attention core of each supported model family.
LAYOUTS: dict[str, dict[str, tuple[str, ...]]] = {
    "dit": {
        "qkv": ("blocks.*.attn.qkv",),
        "proj": ("blocks.*.attn.proj",),
        "fc1": ("blocks.*.mlp.fc1",),
        "fc2": ("blocks.*.mlp.fc2",),
        "adaln": ("blocks.*.adaLN_modulation.1",),
        "attention": ("blocks.*.attn.core",),
    },
    # diffusers' DiTTransformer2DModel: attention matmuls live in its processor and are not swapped.
    "diffusers": {
        "qkv": ("transformer_blocks.*.attn1.to_q", "transformer_blocks.*.attn1.to_k", "transformer_blocks.*.attn1.to_v"),
        "proj": ("transformer_blocks.*.attn1.to_out.0",),
        "fc1": ("transformer_blocks.*.ff.net.0.proj",),
        "fc2": ("transformer_blocks.*.ff.net.2",),
        "adaln": ("transformer_blocks.*.norm1.linear",),
        "attention": (),
    },
}
BLOCK_ROLES = ("qkv", "proj", "fc1", "fc2")


def _yaml():
    try:
        import yaml
    except ImportError:
        raise ValueError("YAML policy files need PyYAML: pip install 'robuq[yaml]', or use a .json file") from None
    return yaml


@dataclass
class QuantRule:
    pattern: str  # fnmatch pattern on the module's qualified name, e.g. "blocks.*.mlp.fc2"
    linear: LinearQuantConfig
    role: str = ""  # what the rule is for ("qkv", "adaln", …); informational


@dataclass
class QuantConfig:
    """A precision policy: which modules get which quantizer, and an optional per-layer activation-bit plan."""

    name: str = "custom"
    rules: list[QuantRule] = field(default_factory=list)
    attention_bits: int | None = 8  # None leaves attention matmuls in full precision
    attention_patterns: tuple[str, ...] = ()
    plan: dict[str, int] | None = None  # module name → activation bits, applied after the rules

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["attention_patterns"] = list(self.attention_patterns)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "QuantConfig":
        data = dict(data)
        unknown = sorted(set(data) - {"name", "rules", "attention_bits", "attention_patterns", "plan"})
        if unknown:
            raise ValueError(f"unknown quantization config fields: {', '.join(unknown)}")
        rules = [
            QuantRule(r["pattern"], LinearQuantConfig.from_dict(r["linear"]), r.get("role", "")) for r in data.pop("rules", [])
        ]
        patterns = tuple(data.pop("attention_patterns", ()))
        return cls(rules=rules, attention_patterns=patterns, **data)

    def save(self, path: str | Path) -> Path:
        """Write as JSON (``.json``) or YAML (anything else; needs PyYAML: ``pip install 'robuq[yaml]'``)."""
        path = Path(path)
        text = json.dumps(self.to_dict(), indent=2) if path.suffix == ".json" else _yaml().safe_dump(self.to_dict(), sort_keys=False)
        path.write_text(text)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "QuantConfig":
        """Read a policy file written by ``save`` (JSON, or YAML with PyYAML installed)."""
        text = Path(path).read_text()
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = _yaml().safe_load(text)
        return cls.from_dict(data)

    def rule_for(self, name: str) -> QuantRule | None:
        return next((r for r in self.rules if fnmatch.fnmatchcase(name, r.pattern)), None)


def validate_plan(plan: Mapping[str, object], quantized_names: list[str]) -> dict[str, int | None]:
    """Check every entry names a quantized linear and gives integer bits 1–8 (or None: full-precision
    inputs); return a clean copy."""
    if not isinstance(plan, Mapping):
        raise PlanError(f"a bit plan must map module names to bits, got {type(plan).__name__}")
    known = set(quantized_names)
    problems = []
    for name, bits in plan.items():
        if name not in known:
            close = [n for n in quantized_names if n.split(".")[-1] == str(name).split(".")[-1]][:3]
            hint = f" (quantized layers look like {', '.join(close or quantized_names[:3])})"
            problems.append(f"{name!r} is not a quantized linear layer of this model{hint}")
        elif bits is None:
            continue
        elif isinstance(bits, bool) or not isinstance(bits, int):
            problems.append(f"{name!r}: bits must be an integer, got {bits!r} ({type(bits).__name__})")
        elif not 1 <= bits <= 8:
            problems.append(f"{name!r}: bits must be from 1 to 8, got {bits}")
    if problems:
        raise PlanError("invalid bit plan:\n  " + "\n  ".join(problems))
    return {name: None if bits is None else int(bits) for name, bits in plan.items()}


def quantize_(
    model: nn.Module, config: QuantConfig, plan: BitPlan | Mapping[str, object] | None = None, initialize: bool = True
) -> nn.Module:
    """Replace, in place, the linears and attention cores ``config`` names; returns ``model``.

    ``plan`` (or ``config.plan``) then sets per-layer activation bits. ``initialize=False`` skips the
    SVD of the low-rank branches, for when a saved state_dict is loaded right after.
    """
    targets: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and config.rule_for(name):
            # Seeded by name, so a layer's sign flips do not depend on which other modules a policy swaps.
            seed = zlib.crc32(name.encode())
            targets.append((name, QuantLinear.from_linear(module, config.rule_for(name).linear, seed=seed, initialize=initialize)))
        elif (
            isinstance(module, AttentionCore)
            and config.attention_bits is not None
            and any(fnmatch.fnmatchcase(name, p) for p in config.attention_patterns)
        ):
            targets.append((name, QuantAttentionCore(check_bits(config.attention_bits, "attention bits"))))
    for name, module in targets:
        model.set_submodule(name, module)
    plan = plan if plan is not None else config.plan
    if plan is not None:
        apply_plan(model, plan)
    return model


def quantized_linears(model: nn.Module) -> dict[str, QuantLinear]:
    """The QuantLinear modules of ``model`` by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def apply_plan(model: nn.Module, plan: BitPlan | Mapping[str, object]) -> dict[str, int | None]:
    """Set the activation bits of the named QuantLinears (validated first: nothing changes on error)."""
    layers = quantized_linears(model)
    clean = validate_plan(as_bits(plan), list(layers))
    for name, bits in clean.items():
        layers[name].set_act_bits(bits)
    return clean


def current_plan(model: nn.Module) -> dict[str, int | None]:
    """Activation bits of every QuantLinear (None: full-precision inputs), as a plan."""
    return {name: m.act_bits for name, m in quantized_linears(model).items()}
