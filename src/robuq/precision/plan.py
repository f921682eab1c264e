"""A per-layer activation-bit plan: the bits, and what a person needs to judge them.

AMPN writes plans, people read and edit them, QAT and ``quantize_`` apply them. On disk a plan is JSON:
``{"bits": {layer: bits, …}, "budget": …, …}``; a bare ``{layer: bits}`` object is read too.
"""

from __future__ import annotations

from robuq.core.errors import RobuqError

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from robuq.core.files import atomic_write_text


class PlanError(RobuqError):
    """A per-layer bit plan that does not fit the model, or a plan file that cannot be read."""


@dataclass
class BitPlan:
    """Activation bits per layer (None: full-precision inputs) and how they were chosen."""

    bits: dict[str, int | None]
    budget: float | None = None  # average-bit budget the allocation was made under
    weighting: str | None = None  # "plain" or "macs": how the average was weighted
    objective: float | None = None  # summed sensitivity of the chosen bits
    average_plain: float | None = None
    average_macs: float | None = None
    role_averages: dict[str, float] = field(default_factory=dict)  # average bits per layer type
    paper_role_averages_dit_xl2: dict[str, float] | None = None  # docs/method.md §7, for comparison

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "the plan") -> "BitPlan":
        """A plan document, or a bare {layer: bits} mapping."""
        if not isinstance(data, Mapping):
            raise PlanError(f"{source} must hold a JSON object mapping module names to bits, not {type(data).__name__}")
        if not isinstance(data.get("bits"), Mapping):
            return cls(bits=dict(data))
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, path: str | os.PathLike) -> Path:
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "BitPlan":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise PlanError(
                f"bit plan {path} is not text; a plan is a JSON file (as `robuq ampn allocate` writes)"
            ) from None
        except (OSError, json.JSONDecodeError) as exc:
            raise PlanError(f"cannot read the bit plan {path}: {exc}") from exc
        return cls.from_dict(data, str(path))


def as_bits(plan: "BitPlan | Mapping[str, object] | str | os.PathLike") -> dict[str, object]:
    """The {layer: bits} of a plan given as a BitPlan, a mapping, or the path of a plan file."""
    if isinstance(plan, (str, os.PathLike)):
        plan = BitPlan.load(plan)
    if isinstance(plan, BitPlan):
        return dict(plan.bits)
    if isinstance(plan, Mapping):
        return dict(plan)
    raise PlanError(f"a bit plan must map module names to bits, got {type(plan).__name__}")


def load_plan(path: str | os.PathLike) -> dict[str, object]:
    """The {layer: bits} of a plan file (AMPN's document or a bare object)."""
    return as_bits(path)
