"""Model surgery: ``quantize_(model, config)`` swaps modules by name according to a precision policy;
presets name the paper's method and baselines; bit plans set per-layer activation bits;
``cost_summary`` tells what the result costs."""

from robuq.precision.cost import CostSummary, cost_summary
from robuq.precision.plan import BitPlan, PlanError, load_plan
from robuq.precision.policy import (
    BLOCK_ROLES,
    LAYOUTS,
    QuantConfig,
    QuantRule,
    apply_plan,
    current_plan,
    quantize_,
    quantized_linears,
    validate_plan,
)
from robuq.precision.presets import PRESETS, PresetOptions, preset, register_preset, resolve_policy

__all__ = [
    "BLOCK_ROLES",
    "LAYOUTS",
    "PRESETS",
    "BitPlan",
    "CostSummary",
    "PlanError",
    "PresetOptions",
    "QuantConfig",
    "QuantRule",
    "apply_plan",
    "cost_summary",
    "current_plan",
    "load_plan",
    "preset",
    "quantize_",
    "quantized_linears",
    "register_preset",
    "resolve_policy",
    "validate_plan",
]
