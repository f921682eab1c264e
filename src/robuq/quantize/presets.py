"""Named precision policies: the paper's method and its baselines as configurations of one code path."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Mapping

from robuq.quant.activation import check_bits
from robuq.quant.linear import LinearQuantConfig
from robuq.quantize.policy import BLOCK_ROLES, LAYOUTS, QuantConfig, QuantRule, load_plan


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
