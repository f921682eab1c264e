"""Named precision policies: the paper's method and its baselines as configurations of one code path."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping

from robuq.quant.activation import check_bits
from robuq.quant.linear import LinearQuantConfig
from robuq.precision.plan import BitPlan, as_bits
from robuq.models.families import FAMILIES, Family, role_kind
from robuq.precision.policy import AUTO, BLOCK_ROLES, QuantConfig, QuantRule, check_layout
from robuq.core.errors import RobuqError


@dataclass(frozen=True)
class PresetOptions:
    """What every preset is built from (``preset``'s keyword arguments)."""

    act_bits: int = 4
    weight: str = "ternary"  # rtn's weight format; the other presets are ternary by definition
    lowrank_rank: int = 16
    hadamard_signs: bool = True
    lowrank_share: float | None = None


# A recipe gives each block role ("qkv", "proj", "fc1", "fc2") its LinearQuantConfig; an empty dict means
# "quantize nothing" (no adaLN or attention quantization either).
Recipe = Callable[[PresetOptions], dict[str, LinearQuantConfig]]
PRESETS: dict[str, Recipe] = {}


def register_preset(name: str) -> Callable[[Recipe], Recipe]:
    """Decorator: make ``recipe`` available as ``preset(name)`` and ``--preset name``.

    >>> @register_preset("bitnet-v2-signless")
    ... def _(o): return {r: LinearQuantConfig(act_bits=o.act_bits) for r in BLOCK_ROLES}
    """

    def add(recipe: Recipe) -> Recipe:
        PRESETS[name] = recipe
        return recipe

    return add


@register_preset("fp")
def _full_precision(options: PresetOptions) -> dict[str, LinearQuantConfig]:
    """The reference: nothing quantized."""
    return {}


@register_preset("rtn")
def _round_to_nearest(options: PresetOptions) -> dict[str, LinearQuantConfig]:
    """Round-to-nearest post-training quantization: ``weight`` weights, per-token min–max inputs."""
    return {role: LinearQuantConfig(weight=options.weight, act_bits=options.act_bits) for role in BLOCK_ROLES}


@register_preset("bitnet-v2")
def _bitnet_v2(options: PresetOptions) -> dict[str, LinearQuantConfig]:
    """Ternary weights, per-token min–max inputs, Hadamard only before proj and fc2."""
    base = LinearQuantConfig(act_bits=options.act_bits)
    rotated = replace(base, hadamard=True, hadamard_signs=options.hadamard_signs)
    return {"qkv": base, "proj": rotated, "fc1": base, "fc2": rotated}


def _strong(options: PresetOptions) -> LinearQuantConfig:
    return LinearQuantConfig(
        act_bits=options.act_bits,
        hadamard=True,
        hadamard_signs=options.hadamard_signs,
        lowrank_rank=options.lowrank_rank,
        lowrank_share=options.lowrank_share,
    )


@register_preset("baseline")
def _baseline(options: PresetOptions) -> dict[str, LinearQuantConfig]:
    """bitnet-v2 + a full-precision low-rank branch + Hadamard on all four block linears."""
    return {role: _strong(options) for role in BLOCK_ROLES}


@register_preset("robuq")
def _robuq(options: PresetOptions) -> dict[str, LinearQuantConfig]:
    """baseline + RobustQuantizer (the Gaussian-optimal per-token step)."""
    return {role: replace(_strong(options), act_rule="gaussian") for role in BLOCK_ROLES}


def _rules(families: list[Family], per_kind: dict[str, LinearQuantConfig], adaln: LinearQuantConfig) -> list[QuantRule]:
    """Each family's block linears with the recipe's config for their kind, and its modulation with ``adaln``."""
    rules = [
        QuantRule(p, per_kind[role_kind(role)], role, f.name)
        for f in families
        for role, patterns in f.block_linears.items()
        for p in patterns
    ]
    return rules + [QuantRule(p, adaln, "adaln", f.name) for f in families for p in f.modulation]


def preset(
    name: str,
    act_bits: int = 4,
    plan: BitPlan | Mapping[str, int] | str | Path | None = None,
    layout: str = AUTO,
    weight: str = "ternary",
    lowrank_rank: int = 16,
    attention_bits: int | None = 8,
    adaln: str = "int4",
    adaln_act_bits: int | None = 4,
    hadamard_signs: bool = True,
    lowrank_share: float | None = None,
) -> QuantConfig:
    """The policy of a registered method (``PRESETS``) at ``act_bits`` (block linears), or with a per-layer ``plan``.

    Built in: ``fp`` (the reference), ``rtn``, ``bitnet-v2``, ``baseline`` and ``robuq`` (see their
    recipes above; ``register_preset`` adds more). Every preset but ``fp`` puts attention matmuls at
    ``attention_bits`` and adaLN at W4A4 (``adaln``, ``adaln_act_bits``); embedders and the final layer
    stay full precision.

    ``layout`` names the model family the rules are written for (``robuq.models.families.FAMILIES``: "dit",
    "diffusers", "pixart", "sd3", "flux", "flux2", "sana"); the default "auto" writes them for every family,
    and ``quantize_`` applies the model's own.

    ``lowrank_rank`` is the rank of the full-precision branch of ``baseline`` and ``robuq``; ``lowrank_share``
    gives it instead as a share of each layer's width (``PAPER_LOWRANK_SHARE``, 16/1152, is the paper's
    proportion: rank 16 at DiT-XL/2's width 1,152, 3 at DiT-T's 192).

    ``hadamard_signs`` adds random sign flips before each Hadamard transform. They matter: fc2's input
    (GELU outputs) has a large per-token mean, which a plain Hadamard concentrates into one huge
    coordinate; with the flips the token becomes Gaussian (results/activation_stats.md).
    """
    if name not in PRESETS:
        raise RobuqError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    check_layout(layout)
    check_bits(act_bits)
    families = list(FAMILIES.values()) if layout == AUTO else [FAMILIES[layout]]
    attention = tuple(dict.fromkeys(p for f in families for p in f.attention))
    block = PRESETS[name](PresetOptions(act_bits, weight, lowrank_rank, hadamard_signs, lowrank_share))
    if not block:
        return QuantConfig(name=name, rules=[], attention_bits=None, attention_patterns=attention, layout=layout)
    rules = _rules(families, block, LinearQuantConfig(weight=adaln, act_bits=adaln_act_bits))
    return QuantConfig(
        name=f"{name}-a{act_bits}" if plan is None else f"{name}-plan",
        rules=rules,
        attention_bits=attention_bits,
        attention_patterns=attention,
        plan=as_bits(plan) if plan is not None else None,
        layout=layout,
    )


def resolve_policy(
    preset_name: str = "robuq",
    act_bits: int = 4,
    config_file: str | os.PathLike | None = None,
    plan: BitPlan | Mapping[str, int] | str | os.PathLike | None = None,
    lowrank_rank: int = 16,
    lowrank_share: float | None = None,
) -> QuantConfig:
    """A job's policy: the policy file ``config_file`` if given, else the preset at ``act_bits`` (with its
    low-rank branch's ``lowrank_rank`` or ``lowrank_share``); a bit plan, if given, replaces the policy's own."""
    if config_file and (lowrank_rank != 16 or lowrank_share is not None):
        raise RobuqError(
            "a policy file sets its own low-rank ranks; drop --lowrank-rank/--lowrank-share or edit the file"
        )
    config = (
        QuantConfig.load(config_file)
        if config_file
        else preset(preset_name, act_bits, lowrank_rank=lowrank_rank, lowrank_share=lowrank_share)
    )
    if plan is not None:
        config.plan = as_bits(plan)
    return config
