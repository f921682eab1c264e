"""Model surgery: ``quantize_(model, config)`` swaps modules by name according to a precision policy;
presets name the paper's method and baselines; ``cost_summary`` tells what the result costs."""
from robuq.quantize.cost import CostSummary, cost_summary
from robuq.quantize.policy import (
    BLOCK_ROLES, LAYOUTS, PlanError, QuantConfig, QuantRule, apply_plan, current_plan, load_plan, quantize_,
    quantized_linears, validate_plan,
)
from robuq.quantize.presets import PRESETS, preset

__all__ = [
    "BLOCK_ROLES", "LAYOUTS", "PRESETS", "CostSummary", "PlanError", "QuantConfig", "QuantRule", "apply_plan",
    "cost_summary", "current_plan", "load_plan", "preset", "quantize_", "quantized_linears", "validate_plan",
]
