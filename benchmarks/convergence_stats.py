"""The convergence benchmark's statistics: FID intervals over the samples and the reading of each claim.

Sample noise: paired half-sampling of cached features (the same random halves for every row), giving an
interval on each FID, each ratio to the teacher and each difference between rows. Training noise: the gap
between two seeds of one pipeline, and, for AMPN against chance, a Welch t-interval over runs. Everything
here is a pure function of features or of the scores derived from them.
"""

from __future__ import annotations

import math

import numpy as np

# Largest ratio to the teacher's FID each activation width may reach at the end of the schedule.
TARGETS = {4: 1.2, 3: 1.5, 2: 2.0}


def fmt_interval(entry: dict, key: str = "fid", digits: int = 2) -> str:
    low, high = {
        "fid": ("low", "high"),
        "ratio": ("ratio_low", "ratio_high"),
        "difference": ("difference_low", "difference_high"),
    }[key]
    return f"{entry[key]:.{digits}f} [{entry[low]:.{digits}f}, {entry[high]:.{digits}f}]"


class FixedReferenceFID:
    """FID against one reference set, fast enough to resample: with R = Σ_ref^½ computed once,
    tr (Σ_ref Σ)^½ = tr (R Σ R)^½ = Σ √λ of the smaller of (X R)(X R)ᵀ and (X R)ᵀ(X R) (X centred, scaled)."""

    def __init__(self, reference: np.ndarray):
        ref = reference.astype(np.float64)
        self.mu = ref.mean(axis=0)
        sigma = np.cov(ref, rowvar=False)
        values, vectors = np.linalg.eigh(sigma)
        self.root = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
        self.trace = float(np.trace(sigma))

    def __call__(self, features: np.ndarray) -> float:
        x = features.astype(np.float64)
        mu = x.mean(axis=0)
        centred = (x - mu) / math.sqrt(len(x) - 1)
        y = centred @ self.root
        gram = y @ y.T if len(x) < x.shape[1] else y.T @ y
        roots = np.sqrt(np.clip(np.linalg.eigvalsh(gram), 0, None)).sum()
        diff = mu - self.mu
        return float(diff @ diff + self.trace + (centred * centred).sum() - 2 * roots)


def half_sample_indices(n: int, rounds: int) -> list[np.ndarray]:
    """``rounds`` random halves of ``range(n)``, drawn without replacement; the same for every row with ``n``
    samples, so that rows scored on the same labels and noise are compared on the same images."""
    rng = np.random.default_rng(n)
    return [np.sort(rng.permutation(n)[: n // 2]) for _ in range(rounds)]


def centred_replicates(score: dict) -> np.ndarray:
    """A point's half-sample FIDs moved to centre on its full-sample FID.

    Why halves and not a bootstrap with replacement: a resample with duplicates has fewer distinct images and
    so a larger FID; in Inception's 2,048 dimensions with 2,000 samples its spread is several times the spread
    of the FID itself over fresh sample sets, and its percentiles sit above the estimate. A half drawn without
    replacement from n samples varies about as much as a fresh n-sample FID does (for a mean, var of a
    half = (2σ²/n)(1 − ½) = σ²/n); its mean is shifted by the smaller set's bias, which centring removes.
    tests/test_benchmarks.py checks the coverage of the resulting intervals on Gaussian features."""
    replicates = np.asarray(score["replicates"], dtype=np.float64)
    return score["fid"] + replicates - replicates.mean()


def percentile_interval(values: np.ndarray) -> tuple[float, float]:
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def interval_summary(scores: dict, key: str, reference: str | None = None, ratio: bool = True) -> dict | None:
    """A point's FID with its interval; with ``reference``, also the ratio (or difference) to it with its
    interval, both from the paired centred replicates."""
    if key not in scores or (reference is not None and reference not in scores):
        return None
    a = centred_replicates(scores[key])
    low, high = percentile_interval(a)
    result = {"fid": scores[key]["fid"], "low": low, "high": high}
    if reference is not None:
        b = centred_replicates(scores[reference])
        if ratio:
            result["ratio"] = scores[key]["fid"] / scores[reference]["fid"]
            result["ratio_low"], result["ratio_high"] = percentile_interval(a / b)
        else:
            result["difference"] = scores[key]["fid"] - scores[reference]["fid"]
            result["difference_low"], result["difference_high"] = percentile_interval(a - b)
    return result


def training_noise(comparisons: list[dict]) -> dict[tuple[int, str], float]:
    """Per (step, feature space), the larger |FID difference| between two seeds of one pipeline: how far
    apart training alone puts two runs. A few seed pairs make it a coarse gauge, not an interval."""
    noise: dict[tuple[int, str], float] = {}
    for c in comparisons:
        if c["kind"] == "training noise":
            at = (c["step"], c["space"])
            noise[at] = max(noise.get(at, 0.0), abs(c["difference"]))
    return noise


def noise_for(c: dict, noise: dict[tuple[int, str], float]) -> float | None:
    """The training noise a difference is read against: at its own step, else at the nearest step measured
    (the baseline comparison's step has no seed pairs of its own)."""
    steps = [step for step, space in noise if space == c["space"]]
    if not steps:
        return None
    return noise[(min(steps, key=lambda step: (abs(step - c["step"]), -step)), c["space"])]


def read_difference(c: dict, noise: dict[tuple[int, str], float]) -> str:
    """ "a ahead" or "b ahead" only when the difference is outside the sample interval and larger than the
    training noise; otherwise a tie, saying which noise it is inside. Lower FID is better."""
    if c["difference_low"] <= 0 <= c["difference_high"]:
        return "tie (inside the sample noise)"
    if c["kind"] != "training noise":
        gauge = noise_for(c, noise)
        if gauge is None:
            return "tie until the training noise is measured"
        if abs(c["difference"]) <= gauge:
            return f"tie (inside the training noise, {gauge:.2f})"
    return "a ahead" if c["difference_high"] < 0 else "b ahead"


def chance_over_runs(final: list[dict], samples: int) -> list[dict]:
    """Per control step and feature space: the mean FID of AMPN's A2 runs (every seed) minus the mean of the
    uniform-plan runs, and minus the mean of the shuffled-plan runs, with a 95% Welch t-interval over runs
    (``means_over_runs``). Each run's FID carries its training noise and the part of its sample noise not
    shared with the others (all rows draw the same labels and noise), so the spread between runs is the noise
    the comparison is read against."""
    groups: dict[tuple[int, str], dict] = {}
    for e in final:
        if e["samples"] == samples and e["act_bits"] == 2:
            for space in ("classifier", "inception"):
                if space in e:
                    groups.setdefault((e["steps"], space), {}).setdefault(e["ampn"], []).append(e[space]["fid"])
    return means_over_runs(groups)


def means_over_runs(groups: dict[tuple[int, str], dict]) -> list[dict]:
    """For each (step, measure) with values per arm (True: AMPN's runs, "uniform", "random": the shuffles),
    AMPN's mean minus each control's, with a 95% Welch t-interval over runs. Needs two runs on each side;
    with two, the interval is wide by design. A training seed shared across the sides (uniform seed s and
    AMPN seed s) makes it conservative; one seed shared by more than two runs of one side would make it too
    narrow, so the benchmark spreads further shuffles over seeds."""
    from scipy import stats

    out = []
    for (step, space), arms in sorted(groups.items()):
        ampn = arms.get(True, [])
        for control, kind in (("uniform plan", "uniform"), ("shuffled AMPN plan", "random")):
            other = arms.get(kind, [])
            if len(ampn) < 2 or len(other) < 2:
                continue
            va, vb = np.var(ampn, ddof=1) / len(ampn), np.var(other, ddof=1) / len(other)
            if va + vb == 0:
                continue  # no spread between runs measured: nothing to read the gap against
            difference = float(np.mean(ampn) - np.mean(other))
            se = math.sqrt(va + vb)
            df = (va + vb) ** 2 / (va**2 / (len(ampn) - 1) + vb**2 / (len(other) - 1))
            half = float(stats.t.ppf(0.975, df)) * se
            out.append(
                {
                    "step": step,
                    "space": space,
                    "control": control,
                    "ampn_runs": len(ampn),
                    "control_runs": len(other),
                    "ampn_mean": float(np.mean(ampn)),
                    "control_mean": float(np.mean(other)),
                    "difference": difference,
                    "difference_low": difference - half,
                    "difference_high": difference + half,
                    "df": df,
                    "runs_to_resolve": runs_to_resolve(difference, ampn, other),
                }
            )
    return out


def runs_to_resolve(difference: float, a: list[float], b: list[float], most: int = 100) -> int | None:
    """Runs a side at which a 95% interval would exclude 0 if the gap and the pooled spread stayed as measured
    (a planning figure for the next runs, not a result; optimistic when the arms spread differently, which the
    Welch reading accounts for); None beyond ``most`` or with no gap."""
    from scipy import stats

    spread = math.sqrt(((len(a) - 1) * np.var(a, ddof=1) + (len(b) - 1) * np.var(b, ddof=1)) / (len(a) + len(b) - 2))
    if difference == 0:
        return None
    for n in range(2, most + 1):
        if stats.t.ppf(0.975, 2 * n - 2) * spread * math.sqrt(2 / n) < abs(difference):
            return n
    return None


def read_over_runs(entry: dict) -> str:
    if entry["difference_high"] < 0:
        return "AMPN ahead"
    if entry["difference_low"] > 0:
        return "AMPN behind"
    return "tie (inside the spread between runs)"


def read_claims(
    final: list[dict],
    comparisons: list[dict],
    teacher: dict,
    steps: int,
    targets: dict[str, float],
    over_runs: list[dict] | None = None,
) -> list[dict]:
    """The benchmark's criteria, each read from what was measured: "met", "missed", "tie" (the two are inside
    the noise) or "not measured yet", with the figures it rests on. ``targets``: row name → the largest ratio
    to the teacher's FID it may reach at ``steps``. AMPN against chance is read on the means over runs
    (``chance_over_runs``)."""
    spaces = sorted(s for s in teacher if s in ("classifier", "inception"))  # not its vs_teacher_samples
    rows: dict[str, dict] = {}
    for e in final:  # a row scored twice at the last step (its own samples and a control's) reads the larger
        if e["steps"] == steps and e["samples"] >= rows.get(e["name"], {"samples": 0})["samples"]:
            rows[e["name"]] = e
    claims = []
    for name, target in targets.items():
        claim = f"{name} within {target}× the teacher's FID in every feature space at {steps} steps"
        row = rows.get(name)
        if row is None or not spaces or any(s not in row for s in spaces):
            claims.append({"claim": claim, "verdict": "not measured yet", "evidence": ""})
            continue
        met = all(row[s]["ratio"] <= target for s in spaces)
        claims.append(
            {
                "claim": claim,
                "verdict": "met" if met else "missed",
                "evidence": "; ".join(f"{s} {fmt_interval(row[s], 'ratio')}×" for s in spaces),
            }
        )
    claims.append(read_baseline_claim(comparisons, spaces))
    claims.append(read_chance_claim(over_runs or [], spaces))
    return claims


def verdict_of(readings: list[str], ahead: str, behind: str) -> str:
    """A claim over several differences: "met" when every one reads ``ahead``, "missed" when any reads
    ``behind``, otherwise "tie"."""
    return "met" if all(r == ahead for r in readings) else "missed" if any(r == behind for r in readings) else "tie"


def read_baseline_claim(comparisons: list[dict], spaces: list[str]) -> dict:
    """AMPN A2 against the strong baseline A2, at the last step measured in every space, each difference read
    against the sample interval and the training noise (``read_difference``)."""
    claim = "RobuQ + AMPN ahead of the strong baseline at A2"
    ours = [c for c in comparisons if c["kind"] == "baseline"]
    complete = [
        step
        for step in sorted({c["step"] for c in ours}, reverse=True)
        if {c["space"] for c in ours if c["step"] == step} >= set(spaces)
    ]
    ours = [c for c in ours if complete and c["step"] == complete[0]]
    if not ours or not spaces:
        return {"claim": claim, "verdict": "not measured yet", "evidence": ""}
    noise = training_noise(comparisons)
    readings = [read_difference(c, noise) for c in ours]
    verdict = verdict_of(readings, ahead="a ahead", behind="b ahead")
    evidence = "; ".join(
        f"{c['comparison']}, {c['space']}: {c['difference']:+.2f} ({r})" for c, r in zip(ours, readings)
    )
    return {"claim": claim, "verdict": verdict, "evidence": evidence}


def read_chance_claim(over_runs: list[dict], spaces: list[str]) -> dict:
    """AMPN against the uniform plan and the shuffles of its plan, on the means over runs, at the step where
    both controls are measured in every space with the most runs on the thinner side (the later step on a
    tie): more runs at an earlier step say more than two at a later one."""
    claim = (
        "AMPN's plan ahead of the uniform plan and of shuffles of its own plan at A2: the mean FID of its runs "
        "lower, outside a 95% interval over runs"
    )
    wanted = {(control, space) for control in ("uniform plan", "shuffled AMPN plan") for space in spaces}
    complete = [
        step
        for step in {e["step"] for e in over_runs}
        if {(e["control"], e["space"]) for e in over_runs if e["step"] == step} >= wanted
    ]
    thinnest = {
        step: min(min(e["ampn_runs"], e["control_runs"]) for e in over_runs if e["step"] == step) for step in complete
    }
    chosen = max(complete, key=lambda step: (thinnest[step], step), default=None)
    ours = [e for e in over_runs if e["step"] == chosen]
    if not ours or not spaces:
        return {"claim": claim, "verdict": "not measured yet", "evidence": ""}
    readings = [read_over_runs(e) for e in ours]
    verdict = verdict_of(readings, ahead="AMPN ahead", behind="AMPN behind")
    evidence = "; ".join(
        f"step {e['step']}, {e['space']}: AMPN − {e['control']} {fmt_interval(e, 'difference')} "
        f"({e['ampn_runs']} vs {e['control_runs']} runs; {r})"
        for e, r in zip(ours, readings)
    )
    return {"claim": claim, "verdict": verdict, "evidence": evidence}


def wilson_interval(hits: int, n: int) -> tuple[float, float]:
    """95% Wilson interval of a proportion ``hits``/``n`` (a classifier's accuracy on n samples)."""
    if n == 0:
        return 0.0, 1.0
    z, p = 1.96, hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def paired_difference_interval(first: np.ndarray, second: np.ndarray) -> dict:
    """95% interval of p₁ − p₂ for two proportions measured on the same items (``first``/``second``: each
    item's success, e.g. whether the teacher's and a row's sample for one prompt and noise show the prompt's
    class): Newcombe's hybrid score interval for paired data (1998, method 10), which combines each
    proportion's Wilson interval with the correlation of the pairs, so that shared prompts and noise narrow
    it where an unpaired comparison would not."""
    first, second = np.asarray(first, dtype=bool), np.asarray(second, dtype=bool)
    if first.shape != second.shape or first.ndim != 1:
        raise ValueError("paired_difference_interval takes two equal-length 1-D arrays of successes")
    n = len(first)
    both, only_first = int((first & second).sum()), int((first & ~second).sum())
    only_second, neither = int((~first & second).sum()), n - int((first | second).sum())
    p1, p2 = (both + only_first) / max(n, 1), (both + only_second) / max(n, 1)
    (l1, u1), (l2, u2) = wilson_interval(both + only_first, n), wilson_interval(both + only_second, n)
    margins = (both + only_first) * (only_second + neither) * (both + only_second) * (only_first + neither)
    phi = (both * neither - only_first * only_second) / math.sqrt(margins) if margins else 0.0
    below = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    above = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return {"difference": p1 - p2, "low": p1 - p2 - below, "high": p1 - p2 + above, "pairs": n}
