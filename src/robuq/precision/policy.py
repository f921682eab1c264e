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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch.nn as nn

from robuq.core.files import atomic_write_text
from robuq.core.options import check_known_fields, option
from robuq.core.quantizer_spec import MAX_BITS, MIN_BITS, check_bits
from robuq.models.diffusers_attention import install_attention_core, is_diffusers_attention
from robuq.models.dit import AttentionCore
from robuq.quant.attention import QuantAttentionCore
from robuq.quant.linear import LinearQuantConfig, QuantLinear
from robuq.precision.plan import BitPlan, PlanError, as_bits

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
    # diffusers' DiTTransformer2DModel: the attention matmuls run in robuq's attention processor
    # (robuq.models.diffusers_attention), whose core quantize_ swaps like a DiT block's.
    "diffusers": {
        "qkv": ("transformer_blocks.*.attn1.to_q", "transformer_blocks.*.attn1.to_k", "transformer_blocks.*.attn1.to_v"),
        "proj": ("transformer_blocks.*.attn1.to_out.0",),
        "fc1": ("transformer_blocks.*.ff.net.0.proj",),
        "fc2": ("transformer_blocks.*.ff.net.2",),
        "adaln": ("transformer_blocks.*.norm1.linear",),
        "attention": ("transformer_blocks.*.attn1",),
    },
}
BLOCK_ROLES = ("qkv", "proj", "fc1", "fc2")
AUTO = "auto"  # a policy for every layout: quantize_ finds out which one the model has


def layout_patterns(layout: str, roles: tuple[str, ...] = BLOCK_ROLES) -> list[str]:
    """The name patterns of ``roles`` in ``layout`` ("auto": in every layout)."""
    layouts = LAYOUTS.values() if layout == AUTO else [LAYOUTS[check_layout(layout)]]
    return [p for patterns in layouts for role in roles for p in patterns[role]]


def check_layout(layout: str) -> str:
    """``layout`` if it is "auto" or a key of LAYOUTS, else a ValueError listing them."""
    if layout != AUTO and layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {AUTO}, {', '.join(LAYOUTS)}")
    return layout


def detect_layout(model: nn.Module) -> str | None:
    """The layout whose block linears ``model`` has (by module names and types), or None."""
    names = [name for name, _ in model.named_modules()]
    for layout, roles in LAYOUTS.items():
        if any(fnmatch.fnmatchcase(n, p) for p in roles["qkv"] for n in names):
            return layout
    return None


def _role_of(name: str, layout: str) -> str | None:
    return next((role for role, patterns in LAYOUTS[layout].items() for p in patterns if fnmatch.fnmatchcase(name, p)), None)


def layer_role(name: str) -> str:
    """The role ("qkv", "proj", "fc1", "fc2", "adaln") of a block linear's qualified name, in any layout."""
    for layout in LAYOUTS:
        role = _role_of(name, layout)
        if role is not None and role != "attention":
            return role
    raise ValueError(f"{name!r} is not a block linear of any known layout ({', '.join(layout_patterns(AUTO))})")


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
    layout: str = option(AUTO, "the model layout the rules are written for; auto: every layout, the model's found by quantize_",
                         choices=(AUTO, *LAYOUTS))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["attention_patterns"] = list(self.attention_patterns)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "QuantConfig":
        data = check_known_fields(data, cls, "quantization policy")
        if not isinstance(data.get("rules", []), list):
            raise ValueError("a policy's rules must be a list of {pattern, linear, role} objects")
        rules = []
        for rule in data.pop("rules", []):
            rule = check_known_fields(rule, QuantRule, "policy rule")
            if not isinstance(rule.get("pattern"), str) or "linear" not in rule:
                raise ValueError(f"a policy rule needs a name pattern and its linear settings, got {rule}")
            rules.append(QuantRule(rule["pattern"], LinearQuantConfig.from_dict(rule["linear"]), rule.get("role", "")))
        patterns = tuple(data.pop("attention_patterns", ()))
        return cls(rules=rules, attention_patterns=patterns, **data)

    def save(self, path: str | Path) -> Path:
        """Write as JSON (``.json``) or YAML (anything else; needs PyYAML: ``pip install 'robuq[yaml]'``)."""
        path = Path(path)
        text = json.dumps(self.to_dict(), indent=2) if path.suffix == ".json" else _yaml().safe_dump(self.to_dict(), sort_keys=False)
        return atomic_write_text(path, text)

    @classmethod
    def load(cls, path: str | Path) -> "QuantConfig":
        """Read a policy file written by ``save`` (JSON, or YAML with PyYAML installed)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"policy file {path} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"policy file {path} is not text; a policy is JSON or YAML") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            yaml = _yaml()
            try:
                data = yaml.safe_load(text)  # safe_load: a tag such as !!python/object is refused, never built
            except yaml.YAMLError as exc:
                reason = " ".join(str(exc).split())
                raise ValueError(f"policy file {path} is neither JSON nor plain YAML ({reason})") from None
        try:
            return cls.from_dict(data)
        except ValueError as exc:
            raise ValueError(f"policy file {path}: {exc}") from None

    def rule_for(self, name: str) -> QuantRule | None:
        return next((r for r in self.rules if fnmatch.fnmatchcase(name, r.pattern)), None)


def validate_plan(plan: Mapping[str, object], quantized_names: list[str]) -> dict[str, int | None]:
    """Check every entry names a quantized linear and gives integer bits MIN_BITS–MAX_BITS (None:
    full-precision inputs); return a clean copy."""
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
        elif not MIN_BITS <= bits <= MAX_BITS:
            problems.append(f"{name!r}: bits must be from {MIN_BITS} to {MAX_BITS}, got {bits}")
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
    layout = detect_layout(model)
    if config.layout != AUTO and layout is not None and layout != config.layout:
        raise ValueError(f"policy {config.name!r} is written for layout {config.layout!r}, but this "
                         f"{type(model).__name__} has the {layout!r} layout; use layout={layout!r} or 'auto'")
    targets: list[tuple[str, nn.Module]] = []
    cores: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and config.rule_for(name):
            # Seeded by name, so a layer's sign flips do not depend on which other modules a policy swaps.
            seed = zlib.crc32(name.encode())
            targets.append((name, QuantLinear.from_linear(module, config.rule_for(name).linear, seed=seed, initialize=initialize)))
        elif config.attention_bits is not None and any(fnmatch.fnmatchcase(name, p) for p in config.attention_patterns):
            if isinstance(module, AttentionCore):
                targets.append((name, QuantAttentionCore(check_bits(config.attention_bits, "attention bits"))))
            elif is_diffusers_attention(module):
                cores.append(name)
    if config.rules and not targets:
        found = f"; it looks like the {layout!r} layout" if layout else "; robuq knows the layouts " + ", ".join(LAYOUTS)
        raise ValueError(f"policy {config.name!r} (layout {config.layout!r}) matches no linear layer of "
                         f"{type(model).__name__}{found}: pass layout='auto' or the model's layout to preset()")
    for name, module in targets:
        model.set_submodule(name, module)
    for name in cores:
        install_attention_core(model.get_submodule(name), QuantAttentionCore(check_bits(config.attention_bits, "attention bits")))
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
