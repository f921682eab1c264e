"""Model surgery: ``quantize_(model, config)`` swaps modules by name according to a precision policy.

A policy is an ordered list of rules (name pattern → ``LinearQuantConfig``) plus the attention setting;
the first rule whose pattern matches a linear layer's qualified name decides how it is quantized, and
layers no rule matches stay as they are. Presets are policies — the paper's baselines are
configurations of this one code path, not separate implementations.
"""

from __future__ import annotations

import fnmatch
import json
import warnings
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch.nn as nn

from robuq.core.files import atomic_write_text
from robuq.core.options import check_known_fields, option
from robuq.core.quantizer_spec import MAX_BITS, MIN_BITS, check_bits
from robuq.models.attention_routing import route_attention
from robuq.models.dit import AttentionCore
from robuq.models.families import BLOCK_KINDS, FAMILIES, Family, UnknownFamilyError, family_of
from robuq.models.reshape import JoinedInputLinear, PointwiseConv
from robuq.quant.attention import QuantAttentionCore
from robuq.quant.linear import LinearQuantConfig, QuantLinear
from robuq.precision.plan import BitPlan, PlanError, as_bits
from robuq.core.errors import RobuqError, RobuqFileNotFoundError

# Each family's roles (its block linears, "adaln" for modulation, "attention"), read off its declaration.
LAYOUTS: dict[str, dict[str, tuple[str, ...]]] = {name: family.roles() for name, family in FAMILIES.items()}
BLOCK_ROLES = BLOCK_KINDS
AUTO = "auto"  # a policy for every family: quantize_ finds out which one the model is


def layout_patterns(layout: str, roles: tuple[str, ...] = BLOCK_ROLES) -> list[str]:
    """The name patterns of the block linears whose kind is in ``roles`` ("qkv" also finds "txt.qkv"), in
    ``layout`` ("auto": in every layout)."""
    layouts = LAYOUTS.values() if layout == AUTO else [LAYOUTS[check_layout(layout)]]
    return [p for patterns in layouts for role, ps in patterns.items() if role.rsplit(".", 1)[-1] in roles for p in ps]


def check_layout(layout: str) -> str:
    """``layout`` if it is "auto" or a key of LAYOUTS, else a ValueError listing them."""
    if layout != AUTO and layout not in LAYOUTS:
        raise RobuqError(f"unknown layout {layout!r}; choose one of {AUTO}, {', '.join(LAYOUTS)}")
    return layout


def detect_layout(model: nn.Module) -> str | None:
    """The family ``model`` belongs to, or None."""
    try:
        return family_of(model).name
    except UnknownFamilyError:
        return None


def layer_role(name: str, family: str | None = None) -> str:
    """The role ("qkv", "txt.fc1", "adaln", …) of a quantized linear's qualified name, in ``family`` or the
    first family that declares it."""
    for layout in [family] if family else LAYOUTS:
        role = FAMILIES[layout].role_of(name)
        if role not in (None, "attention", "kept"):
            return role
    raise RobuqError(f"{name!r} is not a block linear or modulation of any known family ({', '.join(LAYOUTS)})")


def _yaml():
    try:
        import yaml
    except ImportError:
        raise RobuqError("YAML policy files need PyYAML: pip install 'robuq[yaml]', or use a .json file") from None
    return yaml


@dataclass
class QuantRule:
    pattern: str  # fnmatch pattern on the module's qualified name, e.g. "blocks.*.mlp.fc2"
    linear: LinearQuantConfig
    role: str = ""  # what the rule is for ("qkv", "adaln", …); informational
    family: str = ""  # the family whose map the rule comes from; empty: any model


@dataclass
class QuantConfig:
    """A precision policy: which modules get which quantizer, and an optional per-layer activation-bit plan."""

    name: str = "custom"
    rules: list[QuantRule] = field(default_factory=list)
    attention_bits: int | None = 8  # None leaves attention matmuls in full precision
    attention_patterns: tuple[str, ...] = ()
    plan: dict[str, int] | None = None  # module name → activation bits, applied after the rules
    layout: str = option(
        AUTO,
        "the model layout the rules are written for; auto: every layout, the model's found by quantize_",
        choices=(AUTO, *LAYOUTS),
    )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["attention_patterns"] = list(self.attention_patterns)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "QuantConfig":
        data = check_known_fields(data, cls, "quantization policy")
        if not isinstance(data.get("rules", []), list):
            raise RobuqError("a policy's rules must be a list of {pattern, linear, role} objects")
        rules = []
        for rule in data.pop("rules", []):
            rule = check_known_fields(rule, QuantRule, "policy rule")
            if not isinstance(rule.get("pattern"), str) or "linear" not in rule:
                raise RobuqError(f"a policy rule needs a name pattern and its linear settings, got {rule}")
            rules.append(
                QuantRule(
                    rule["pattern"],
                    LinearQuantConfig.from_dict(rule["linear"]),
                    rule.get("role", ""),
                    rule.get("family", ""),
                )
            )
        patterns = tuple(data.pop("attention_patterns", ()))
        return cls(rules=rules, attention_patterns=patterns, **data)

    def save(self, path: str | Path) -> Path:
        """Write as JSON (``.json``) or YAML (anything else; needs PyYAML: ``pip install 'robuq[yaml]'``)."""
        path = Path(path)
        text = (
            json.dumps(self.to_dict(), indent=2)
            if path.suffix == ".json"
            else _yaml().safe_dump(self.to_dict(), sort_keys=False)
        )
        return atomic_write_text(path, text)

    @classmethod
    def load(cls, path: str | Path) -> "QuantConfig":
        """Read a policy file written by ``save`` (JSON, or YAML with PyYAML installed)."""
        path = Path(path)
        if not path.is_file():
            raise RobuqFileNotFoundError(f"policy file {path} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise RobuqError(f"policy file {path} is not text; a policy is JSON or YAML") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            yaml = _yaml()
            try:
                data = yaml.safe_load(text)  # safe_load: a tag such as !!python/object is refused, never built
            except yaml.YAMLError as exc:
                reason = " ".join(str(exc).split())
                raise RobuqError(f"policy file {path} is neither JSON nor plain YAML ({reason})") from None
        try:
            return cls.from_dict(data)
        except ValueError as exc:
            raise RobuqError(f"policy file {path}: {exc}") from None

    def rule_for(self, name: str, family: str | None = None) -> QuantRule | None:
        """The first rule matching ``name`` among those written for ``family`` (or for any model)."""
        return next(
            (r for r in self.rules if r.family in ("", family or r.family) and fnmatch.fnmatchcase(name, r.pattern)),
            None,
        )


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


class CoverageError(RobuqError):
    """A model holds linears its family's precision map does not account for."""


def _is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (
        isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1
    )


def uncovered_linears(model: nn.Module, family: Family) -> list[str]:
    """Linears and 1×1 convolutions that ``family``'s map neither quantizes nor keeps in full precision."""
    reshaped = (*family.joined_inputs, *family.pointwise_convs)
    inside = [name for name, m in model.named_modules() if isinstance(m, (JoinedInputLinear, PointwiseConv))]
    missing = []
    for name, module in model.named_modules():
        if not _is_linear_like(module) or isinstance(module, QuantLinear):
            continue
        if (
            family.role_of(name) is None
            and not any(fnmatch.fnmatchcase(name, p) for p in reshaped)
            and not any(name.startswith(parent + ".") and family.role_of(name) for parent in inside)
        ):
            missing.append(name)
    return missing


def _refuse_uncovered(model: nn.Module, family: Family, allow_partial: bool) -> None:
    missing = uncovered_linears(model, family)
    if not missing:
        return
    listed = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
    hint = (
        " (fused projections: call unfuse_qkv_projections() first)"
        if any("to_qkv" in m and "mlp" not in m for m in missing)
        else ""
    )
    message = (
        f"the {family.name} precision map does not cover {len(missing)} linear layer(s) of "
        f"{type(model).__name__}: {listed}{hint}"
    )
    if not allow_partial:
        raise CoverageError(
            message + ". Nothing was quantized; pass allow_partial=True (--allow-partial) to quantize "
            "what the map covers and keep these in full precision"
        )
    warnings.warn(message + "; they stay in full precision (allow_partial)", stacklevel=3)


def _reshape(model: nn.Module, family: Family) -> None:
    """Split the family's joined-input linears and turn its 1×1 convolutions into linears (exact)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and any(fnmatch.fnmatchcase(name, p) for p in family.joined_inputs):
            parts = next(f for p, f in family.joined_inputs.items() if fnmatch.fnmatchcase(name, p))(model, name)
            model.set_submodule(name, JoinedInputLinear.from_linear(module, parts))
        elif isinstance(module, nn.Conv2d) and any(fnmatch.fnmatchcase(name, p) for p in family.pointwise_convs):
            model.set_submodule(name, PointwiseConv.from_conv(module))


def _refuse_fusing(*args, **kwargs):
    raise RobuqError(
        "this attention's projections are quantized (rotated, ternary, with a low-rank branch): fusing them "
        "into one plain linear would lose that. Fuse before quantizing, or leave them unfused"
    )


def _attention_patterns(config: QuantConfig, family: Family | None) -> tuple[str, ...]:
    if family is None or config.layout != AUTO:
        return config.attention_patterns
    return tuple(
        p for p in config.attention_patterns if p in family.attention
    )  # another family's patterns do not apply


def _family_for(model: nn.Module, config: QuantConfig, allow_partial: bool):
    """The model's family, checked against the policy's layout; None for an unknown class under allow_partial."""
    try:
        family = family_of(model)
    except UnknownFamilyError as exc:
        if not allow_partial:
            raise
        warnings.warn(f"{exc}; applying the policy's patterns without a family map (allow_partial)", stacklevel=3)
        return None
    if config.layout != AUTO and family.name != config.layout:
        raise RobuqError(
            f"policy {config.name!r} is written for layout {config.layout!r}, but this "
            f"{type(model).__name__} is a {family.name!r} model; use layout={family.name!r} or 'auto'"
        )
    return family


def _replacements(model: nn.Module, config: QuantConfig, family, initialize: bool):
    """(name, quantized module) for every linear and attention core the policy names, and the names of the
    attention modules whose processor's matmuls are routed to a quantized core instead."""
    name_of_family = family.name if family is not None else None
    targets: list[tuple[str, nn.Module]] = []
    routed: list[str] = []
    attention = _attention_patterns(config, family)
    for name, module in model.named_modules():
        rule = config.rule_for(name, name_of_family) if isinstance(module, nn.Linear) else None
        if rule is not None:
            # Seeded by name, so a layer's sign flips do not depend on which other modules a policy swaps.
            seed = zlib.crc32(name.encode())
            targets.append((name, QuantLinear.from_linear(module, rule.linear, seed=seed, initialize=initialize)))
        elif config.attention_bits is not None and any(fnmatch.fnmatchcase(name, p) for p in attention):
            if isinstance(module, AttentionCore):
                targets.append((name, QuantAttentionCore(check_bits(config.attention_bits, "attention bits"))))
            elif hasattr(module, "processor"):
                routed.append(name)
    if config.rules and not targets:
        found = f"; it is a {family.name!r} model" if family else "; robuq knows the families " + ", ".join(LAYOUTS)
        raise RobuqError(
            f"policy {config.name!r} (layout {config.layout!r}) matches no linear layer of "
            f"{type(model).__name__}{found}: pass layout='auto' or the model's family to preset()"
        )
    return targets, routed


def _install(model: nn.Module, config: QuantConfig, targets, routed: list[str]) -> None:
    for name, module in targets:
        model.set_submodule(name, module)
    for name in routed:
        route_attention(
            model.get_submodule(name), QuantAttentionCore(check_bits(config.attention_bits, "attention bits"))
        )
    for module in model.modules():
        if hasattr(module, "fuse_projections") and any(isinstance(m, QuantLinear) for m in module.children()):
            module.fuse_projections = _refuse_fusing  # diffusers' fuse_qkv_projections would rebuild plain linears


def quantize_(
    model: nn.Module,
    config: QuantConfig,
    plan: BitPlan | Mapping[str, object] | None = None,
    initialize: bool = True,
    allow_partial: bool = False,
) -> nn.Module:
    """Replace, in place, the linears and attention cores ``config`` names; returns ``model``.

    The model's family (``robuq.models.families``) must account for every linear layer: one it does not
    is refused with a ``CoverageError`` naming it, unless ``allow_partial`` (then a warning names what
    stays in full precision). A model of no known family is refused unless ``allow_partial``, when the
    policy's patterns apply as they are. ``plan`` (or ``config.plan``) then sets per-layer activation bits.
    ``initialize=False`` skips the SVD of the low-rank branches, for when a saved state_dict is loaded
    right after.
    """
    family = _family_for(model, config, allow_partial)
    if config.rules and family is not None:
        _refuse_uncovered(model, family, allow_partial)
        _reshape(model, family)
    targets, routed = _replacements(model, config, family, initialize)
    _install(model, config, targets, routed)
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
