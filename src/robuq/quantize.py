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
import yaml

from robuq.core.quantizer_spec import check_bits
from robuq.models.dit import AttentionCore
from robuq.quant.attention import QuantAttentionCore
from robuq.quant.linear import LinearQuantConfig, QuantLinear

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
        """Write as JSON (``.json``) or YAML (anything else)."""
        path = Path(path)
        text = json.dumps(self.to_dict(), indent=2) if path.suffix == ".json" else yaml.safe_dump(self.to_dict(), sort_keys=False)
        path.write_text(text)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "QuantConfig":
        return cls.from_dict(yaml.safe_load(Path(path).read_text()))  # YAML is a superset of JSON

    def rule_for(self, name: str) -> QuantRule | None:
        return next((r for r in self.rules if fnmatch.fnmatchcase(name, r.pattern)), None)


class PlanError(ValueError):
    """A per-layer bit plan that does not fit the model."""


def load_plan(path: str | Path) -> dict[str, int]:
    """Read a plan file: a JSON object {module name: bits}, or {"bits": {...}, ...} as AMPN writes it."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PlanError(f"cannot read the bit plan {path}: {exc}") from exc
    if isinstance(data, dict) and isinstance(data.get("bits"), dict):
        data = data["bits"]
    if not isinstance(data, dict):
        raise PlanError(f"{path} must hold a JSON object mapping module names to bits, not {type(data).__name__}")
    return data


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
    model: nn.Module, config: QuantConfig, plan: Mapping[str, object] | None = None, initialize: bool = True
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


def apply_plan(model: nn.Module, plan: Mapping[str, object]) -> dict[str, int | None]:
    """Set the activation bits of the named QuantLinears (validated first: nothing changes on error)."""
    layers = quantized_linears(model)
    clean = validate_plan(plan, list(layers))
    for name, bits in clean.items():
        layers[name].set_act_bits(bits)
    return clean


def current_plan(model: nn.Module) -> dict[str, int | None]:
    """Activation bits of every QuantLinear (None: full-precision inputs), as a plan."""
    return {name: m.act_bits for name, m in quantized_linears(model).items()}


# ---------------------------------------------------------------- presets

PRESETS = ("fp", "rtn", "bitnet-v2", "baseline", "robuq")


def _rules(layout: dict[str, tuple[str, ...]], per_role: dict[str, LinearQuantConfig]) -> list[QuantRule]:
    return [QuantRule(p, cfg, role) for role, cfg in per_role.items() for p in layout[role]]


def preset(
    name: str,
    act_bits: int = 4,
    plan: Mapping[str, int] | str | Path | None = None,
    layout: str = "dit",
    weight: str = "ternary",
    lowrank_rank: int = 16,
    attention_bits: int | None = 8,
    adaln: str = "int4",
    adaln_act_bits: int | None = 4,
    hadamard_signs: bool = True,
) -> QuantConfig:
    """The policy of a named method at ``act_bits`` (block linears), or with a per-layer ``plan``.

    - ``fp``: nothing quantized (the reference);
    - ``rtn``: round-to-nearest post-training quantization, ``weight`` weights, per-token min–max inputs;
    - ``bitnet-v2``: ternary weights, per-token min–max inputs, Hadamard only before proj and fc2;
    - ``baseline``: bitnet-v2 + rank-``lowrank_rank`` full-precision branch + Hadamard on all four linears;
    - ``robuq``: baseline + RobustQuantizer (Gaussian-optimal per-token scale).
    Every preset but ``fp`` puts attention matmuls at ``attention_bits`` and adaLN at W4A4 (``adaln``,
    ``adaln_act_bits``); embedders and the final layer stay full precision.

    ``hadamard_signs`` adds random sign flips before each Hadamard transform. They matter: fc2's input
    (GELU outputs) has a large per-token mean, which a plain Hadamard concentrates into one huge
    coordinate; with the flips the token becomes Gaussian (results/activation_stats.md).
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    check_bits(act_bits)
    roles = LAYOUTS[layout]
    if isinstance(plan, (str, Path)):
        plan = load_plan(plan)
    if name == "fp":
        return QuantConfig(name="fp", rules=[], attention_bits=None, attention_patterns=roles["attention"])
    base = LinearQuantConfig(weight=weight if name == "rtn" else "ternary", act_bits=act_bits)
    if name == "rtn":
        block = {role: base for role in BLOCK_ROLES}
    elif name == "bitnet-v2":
        rotated = replace(base, hadamard=True, hadamard_signs=hadamard_signs)
        block = {"qkv": base, "proj": rotated, "fc1": base, "fc2": rotated}
    else:
        strong = replace(base, hadamard=True, hadamard_signs=hadamard_signs, lowrank_rank=lowrank_rank)
        if name == "robuq":
            strong = replace(strong, act_rule="gaussian")
        block = {role: strong for role in BLOCK_ROLES}
    adaln_config = LinearQuantConfig(weight=adaln, act_bits=adaln_act_bits)
    rules = _rules(roles, {**block, "adaln": adaln_config})
    tag = f"{name}-a{act_bits}" if plan is None else f"{name}-plan"
    return QuantConfig(
        name=tag, rules=rules, attention_bits=attention_bits, attention_patterns=roles["attention"],
        plan=dict(plan) if plan is not None else None,
    )
