"""Bit plans as files people read: the per-layer bits, both averages, a per-layer-type table, a figure."""

from __future__ import annotations

from pathlib import Path

from robuq.ampn.allocate import Allocation, allocate_bits
from robuq.ampn.sensitivity import Sensitivity, block_index, layer_role
from robuq.precision.plan import BitPlan
from robuq.precision.policy import BLOCK_ROLES
from robuq.core.errors import RobuqError

# docs/method.md §7: average bits per layer type of the paper's DiT-XL/2 allocation, for comparison.
PAPER_ROLE_AVERAGES = {
    2: {"proj": 2.75, "qkv": 2.21, "fc1": 2.00, "fc2": 1.64},
    3: {"proj": 3.89, "qkv": 2.96, "fc1": 3.04, "fc2": 2.31},
}


def role_averages(bits: dict[str, int]) -> dict[str, float]:
    """Average bits per layer type (qkv, proj, fc1, fc2), each stream of a text-to-image family on its own
    ("txt.qkv": the text stream's; "single.fc1": FLUX's single-stream blocks')."""
    groups: dict[str, list[int]] = {}
    for name, b in bits.items():
        groups.setdefault(layer_role(name), []).append(b)

    def place(role: str) -> tuple[str, int]:  # the image stream first, then each stream; qkv, proj, fc1, fc2 in each
        stream, _, kind = role.rpartition(".")
        return stream, BLOCK_ROLES.index(kind)

    order = sorted(groups, key=place)
    return {role: sum(groups[role]) / len(groups[role]) for role in order}


def plan_from_sensitivity(sensitivity: Sensitivity, budget: float, weighting: str = "plain") -> BitPlan:
    """Allocate, and return the plan with everything needed to judge it."""
    if weighting not in ("plain", "macs"):
        raise RobuqError(f"weighting must be 'plain' or 'macs', not {weighting!r}")
    if weighting == "macs" and set(sensitivity.macs) != set(sensitivity.table):
        raise RobuqError("MAC-weighted allocation needs the MACs of every layer in the sensitivity file")
    weights = sensitivity.macs if weighting == "macs" else None
    choices = sorted(set.intersection(*(set(row) for row in sensitivity.table.values())))
    allocation: Allocation = allocate_bits(sensitivity.table, budget, weights, choices)
    macs = sensitivity.macs or {n: 1 for n in allocation.bits}
    mac_average = sum(allocation.bits[n] * macs[n] for n in allocation.bits) / sum(macs[n] for n in allocation.bits)
    paper = PAPER_ROLE_AVERAGES.get(int(budget)) if float(budget).is_integer() else None
    return BitPlan(
        bits=allocation.bits,
        budget=budget,
        weighting=weighting,
        objective=allocation.objective,
        average_plain=allocation.average_plain,
        average_macs=mac_average,
        role_averages=role_averages(allocation.bits),
        paper_role_averages_dit_xl2=paper,
    )


def write_plan(plan: BitPlan, path: str | Path, figure: bool = True) -> Path:
    """Write the plan JSON (and its figure beside it as .png)."""
    path = plan.save(path)
    if figure:
        plot_plan(plan, path.with_suffix(".png"))
    return path


def format_plan(plan: BitPlan) -> str:
    """A few lines a person reads: budget, achieved averages, bits per layer type beside the paper's."""
    paper = plan.paper_role_averages_dit_xl2
    lines = [
        f"budget {plan.budget} bits ({plan.weighting} average): achieved {plan.average_plain:.3f} plain, "
        f"{plan.average_macs:.3f} MAC-weighted; summed sensitivity {plan.objective:.5f}",
        f"{'layer type':<12} {'bits':>6}" + (f" {'paper (DiT-XL/2)':>17}" if paper else ""),
    ]
    for role, avg in plan.role_averages.items():
        lines.append(f"{role:<12} {avg:>6.2f}" + (f" {paper[role]:>17.2f}" if paper and role in paper else ""))
    return "\n".join(lines)


def plot_plan(plan: BitPlan, path: str | Path) -> Path:
    # A Figure of its own, drawn by the Agg canvas: pyplot's global backend and figure list stay untouched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3.2))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    markers = {"qkv": "o", "proj": "s", "fc1": "^", "fc2": "v"}
    roles = list(role_averages(plan.bits))  # every stream's roles ("txt.qkv", "single.fc1", …) as well
    for i, role in enumerate(roles):
        points = sorted((block_index(n), b) for n, b in plan.bits.items() if layer_role(n) == role)
        depth, bits = zip(*points)
        offset = (i - (len(roles) - 1) / 2) * 0.06
        marker = markers[role.rsplit(".", 1)[-1]]
        ax.plot([d + offset for d in depth], bits, marker=marker, linestyle="-", alpha=0.8, label=role)
    ax.set(
        xlabel="block",
        ylabel="activation bits",
        yticks=[1, 2, 3, 4],
        title=f"AMPN plan: budget {plan.budget} ({plan.weighting}), achieved {plan.average_plain:.2f} plain / {plan.average_macs:.2f} MAC-weighted",
    )
    ax.set_ylim(0.5, 4.9)
    ax.legend(ncol=4, fontsize=8, loc="upper center")  # the top band stays free: bits never exceed 4
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return Path(path)
