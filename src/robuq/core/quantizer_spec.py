"""The definition of robuq's uniform quantizers, shared by every implementation of them.

The activation quantizer exists in PyTorch (``robuq.quant.activation``, the reference), in C
(``robuq/kernels/cpu_kernels.c``) and in Triton (``robuq/kernels/_triton_kernels.py``). None of them
keeps a constant of its own: the scale rules and their ids, the smallest scale, the Gaussian step
factors, the level range of b bits and the int8 storage shift are defined here, and the kernels
receive them as build definitions or arguments.

For a row x (a token, or a whole sample) and b bits, with levels 0 … 2^b − 1 and ``top`` = 2^b − 1:

- ``minmax``: scale = max(ρ·(max x − min x)/top, SCALE_EPS), offset = centre − ρ·half-range;
- ``gaussian``: scale = max(ρ·c_b·σ, SCALE_EPS), offset = mean − scale·top/2, where c_b is the
  MSE-optimal uniform step for a unit Gaussian with 2^b cells (``gaussian_optimal_step``);
- levels = clamp(round_half_even((x − offset)/scale), 0, top); value ≈ offset + scale·level.

ρ is the clip ratio (1 unless learned). This module imports nothing from robuq.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from robuq.core.errors import RobuqError

# Scale rules by name, and the integer id under which a kernel is told the rule.
SCALE_RULES: dict[str, int] = {"minmax": 0, "gaussian": 1}
RULES: tuple[str, ...] = tuple(SCALE_RULES)

# The smallest scale of any quantizer: a constant row (zero range, zero σ) must not divide by zero.
SCALE_EPS = 1e-8
# The smallest scale of the softmax probabilities' grid (0 … the row's maximum): a row's maximum is at
# least 1/tokens, so this clamp only guards against an all-zero row.
PROBABILITY_SCALE_EPS = 1e-12

MIN_BITS, MAX_BITS = 1, 8  # 8: the integer kernels store levels as int8


def check_bits(bits: object, what: str = "activation bits") -> int:
    """``bits`` if it is an integer from MIN_BITS to MAX_BITS, else a ValueError that says so."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise RobuqError(f"{what} must be an integer from {MIN_BITS} to {MAX_BITS}, got {bits!r}")
    return bits


def level_range(bits: int) -> tuple[int, int]:
    """The unsigned levels of b-bit activations: (0, 2^b − 1)."""
    return 0, 2 ** check_bits(bits) - 1


def int8_level_shift(bits: int) -> int:
    """What integer kernels subtract from unsigned activation levels to store them as int8: 8-bit levels
    0…255 become −128…127 (the shift is folded back into the offset); narrower ones fit as they are."""
    return 128 if check_bits(bits) == 8 else 0


def rule_error(rule: str, implemented: Iterable[str] = RULES, where: str = "") -> ValueError:
    """The error for a scale rule that is not defined here, or that ``where`` does not implement."""
    implemented = tuple(implemented)
    if rule not in SCALE_RULES:
        return ValueError(f"unknown activation scale rule {rule!r}; use one of {RULES}")
    return ValueError(
        f"{where or 'this implementation'} has no activation scale rule {rule!r}: it implements "
        f"{implemented}; use one of those, or add {rule!r} to it"
    )


def check_rule(rule: str, implemented: Iterable[str] = RULES, where: str = "") -> int:
    """The id of scale rule ``rule``, or ``rule_error``'s ValueError naming it and the rules that ``where``
    implements (by default every rule defined here)."""
    implemented = tuple(implemented)
    if rule not in SCALE_RULES or rule not in implemented:
        raise rule_error(rule, implemented, where)
    return SCALE_RULES[rule]


def gaussian_uniform_mse(step: float, levels: int) -> float:
    """Expected squared error of a mid-rise uniform quantizer with ``levels`` cells of width ``step`` on N(0, 1)."""
    cdf = lambda t: 0.5 * (1 + math.erf(t / math.sqrt(2)))  # noqa: E731
    pdf = lambda t: math.exp(-t * t / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    total = 0.0
    for i in range(levels):
        r = (i + 0.5 - levels / 2) * step
        a = -math.inf if i == 0 else (i - levels / 2) * step
        b = math.inf if i == levels - 1 else (i + 1 - levels / 2) * step
        # ∫_a^b (x − r)² φ(x) dx with ∫x²φ = Φ − xφ and ∫xφ = −φ.
        x_pdf = lambda t: 0.0 if math.isinf(t) else t * pdf(t)  # noqa: E731
        pa, pb = (0.0 if math.isinf(a) else pdf(a)), (0.0 if math.isinf(b) else pdf(b))
        ca, cb = (0.0 if a == -math.inf else cdf(a)), (1.0 if b == math.inf else cdf(b))
        total += (cb - ca) - (x_pdf(b) - x_pdf(a)) + 2 * r * (pb - pa) + r * r * (cb - ca)
    return total


@functools.lru_cache(maxsize=None)
def gaussian_optimal_step(bits: int) -> float:
    """MSE-optimal uniform step for a unit Gaussian with 2^bits levels (1.596, 0.9957, 0.5860, 0.3352, …)."""
    levels = 2**bits
    lo, hi = 1e-4, 4.0
    golden = (math.sqrt(5) - 1) / 2
    for _ in range(200):  # the MSE is unimodal in the step; golden-section search to float precision
        a, b = hi - golden * (hi - lo), lo + golden * (hi - lo)
        if gaussian_uniform_mse(a, levels) < gaussian_uniform_mse(b, levels):
            hi = b
        else:
            lo = a
    return (lo + hi) / 2
