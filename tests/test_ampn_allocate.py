import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from robuq.ampn.allocate import allocate_bits

CHOICES = (1, 2, 3, 4)


def brute_force(sens, budget, weights):
    names = list(sens)
    best = None
    for combo in itertools.product(CHOICES, repeat=len(names)):
        cost = sum(weights[n] * b for n, b in zip(names, combo))
        if cost > budget * sum(weights.values()) + 1e-9:
            continue
        value = sum(sens[n][b] for n, b in zip(names, combo))
        if best is None or value < best - 1e-12:
            best = value
    return best


instances = st.integers(1, 6).flatmap(
    lambda n: st.tuples(
        st.lists(st.lists(st.floats(0, 10, allow_nan=False), min_size=4, max_size=4), min_size=n, max_size=n),
        st.lists(st.integers(1, 50), min_size=n, max_size=n),
        st.sampled_from([1.0, 1.5, 2.0, 2.5, 3.0, 4.0]),
        st.booleans(),
    )
)


@settings(max_examples=150, deadline=None)
@given(instance=instances)
def test_dp_matches_brute_force(instance):
    table, raw_weights, budget, weighted = instance
    sens = {f"l{i}": {b: row[b - 1] for b in CHOICES} for i, row in enumerate(table)}
    weights = {f"l{i}": float(w) for i, w in enumerate(raw_weights)} if weighted else None
    result = allocate_bits(sens, budget, weights)
    used = weights or {n: 1.0 for n in sens}
    assert sum(used[n] * b for n, b in result.bits.items()) <= budget * sum(used.values()) + 1e-9
    assert result.objective == pytest.approx(sum(sens[n][b] for n, b in result.bits.items()))
    assert result.objective == pytest.approx(brute_force(sens, budget, used), abs=1e-9)


def test_real_valued_weights_are_exact_too():
    sens = {
        "a": {1: 5.0, 2: 1.0, 3: 0.5, 4: 0.0},
        "b": {1: 3.0, 2: 2.0, 3: 1.0, 4: 0.0},
        "c": {1: 1, 2: 0.5, 3: 0.2, 4: 0},
    }
    weights = {"a": 0.7, "b": 1.3, "c": 2.9}
    result = allocate_bits(sens, 2.0, weights)
    assert result.objective == pytest.approx(brute_force(sens, 2.0, weights))
    assert result.average_weighted <= 2.0 + 1e-9


def test_reports_both_averages():
    sens = {"a": {b: 4 - b for b in CHOICES}, "b": {b: 2 * (4 - b) for b in CHOICES}}
    result = allocate_bits(sens, 2.5, {"a": 1, "b": 3})
    assert result.average_plain == sum(result.bits.values()) / 2
    assert result.average_weighted == pytest.approx((result.bits["a"] + 3 * result.bits["b"]) / 4)


def test_impossible_budget_and_missing_bits_fail_clearly():
    sens = {"a": {b: 1.0 for b in CHOICES}}
    with pytest.raises(ValueError, match="below the smallest choice"):
        allocate_bits(sens, 0.5)
    with pytest.raises(ValueError, match="lacks bit-widths"):
        allocate_bits({"a": {1: 0.0, 2: 0.0}}, 2)


def test_dit_xl_sized_instance_uses_the_budget():
    import random

    rng = random.Random(0)
    sens = {
        f"blocks.{i}.{r}": {b: rng.random() * 2.0 ** (-2 * b) for b in CHOICES}
        for i in range(28)
        for r in ("qkv", "proj", "fc1", "fc2")
    }
    macs = {n: {"qkv": 3, "proj": 1, "fc1": 4, "fc2": 4}[n.split(".")[-1]] * 1152 * 1152 * 256 for n in sens}
    result = allocate_bits(sens, 2.0, macs)
    assert len(result.bits) == 112
    assert 1.9 <= result.average_weighted <= 2.0
