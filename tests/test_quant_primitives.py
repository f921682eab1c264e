import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from robuq.core import quantizer_spec as spec
from robuq.core.quantizer_spec import gaussian_optimal_step
from robuq.quant.activation import ActivationQuantizer, activation_levels, quantize_activation
from robuq.quant.weights import fake_quantize_weight, parse_weight_format, quantize_weight_int, ternarize_weight

seeds = st.integers(0, 2**16)


def _randn(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@settings(max_examples=30, deadline=None)
@given(seed=seeds, out=st.integers(1, 16), inp=st.integers(1, 64))
def test_ternary_values_are_alpha_times_sign(seed, out, inp):
    w = _randn(seed, out, inp)
    q = ternarize_weight(w)
    assert set(q.levels.unique().tolist()).issubset({-1.0, 0.0, 1.0})
    assert torch.allclose(q.scale.squeeze(1), w.abs().mean(dim=1))
    values = q.dequantize()
    for row, alpha in zip(values, q.scale.squeeze(1)):
        assert set((row / alpha).round().unique().tolist()).issubset({-1.0, 0.0, 1.0})


@settings(max_examples=30, deadline=None)
@given(seed=seeds, bits=st.integers(2, 8))
def test_int_weights_stay_in_range_and_reconstruct(seed, bits):
    w = _randn(seed, 8, 32)
    q = quantize_weight_int(w, bits)
    assert q.levels.abs().max() <= 2 ** (bits - 1) - 1
    assert (q.dequantize() - w).abs().max() <= q.scale.max() / 2 + 1e-6


def test_weight_ste_passes_gradient():
    w = torch.randn(4, 8, requires_grad=True)
    for weight_format in ("ternary", "int4"):
        w.grad = None
        (fake_quantize_weight(w, weight_format) * torch.arange(8.0)).sum().backward()
        assert torch.equal(w.grad, torch.arange(8.0).expand(4, 8))


def test_weight_format_errors_are_clear():
    with pytest.raises(ValueError, match="ternary"):
        parse_weight_format("int1")


@settings(max_examples=40, deadline=None)
@given(seed=seeds, bits=st.integers(1, 8), rule=st.sampled_from(["minmax", "gaussian"]), tokens=st.integers(1, 6))
def test_each_token_has_at_most_2_to_the_b_levels(seed, bits, rule, tokens):
    x = _randn(seed, tokens, 48) * 3 + 1
    fake, q = quantize_activation(x, bits, "token", rule)
    for row, levels in zip(fake, q.levels):
        assert len(row.unique()) <= 2**bits
        assert levels.min() >= 0 and levels.max() <= 2**bits - 1
    assert torch.allclose(q.dequantize(), fake, atol=1e-5)


@pytest.mark.parametrize("rule", ["minmax", "gaussian"])
def test_per_tensor_means_one_scale_per_sample(rule):
    x = torch.randn(3, 5, 40)
    fake, q = quantize_activation(x, 2, "tensor", rule)
    assert q.scale.shape == (3, 1, 1)
    assert all(len(sample.unique()) <= 4 for sample in fake)
    alone, _ = quantize_activation(x[1:2], 2, "tensor", rule)
    assert torch.equal(alone[0], fake[1])  # independent of the rest of the batch


def test_half_precision_does_not_divide_by_zero():
    zeros = torch.zeros(2, 16, dtype=torch.float16)
    assert torch.isfinite(quantize_activation(zeros, 2)[0]).all()
    assert torch.isfinite(fake_quantize_weight(zeros, "ternary")).all()
    assert fake_quantize_weight(zeros, "ternary").dtype == torch.float16


def test_one_bit_works_for_both_rules():
    x = torch.randn(3, 1000)
    for rule in ("minmax", "gaussian"):
        fake, _ = quantize_activation(x, 1, "token", rule)
        assert all(len(r.unique()) == 2 for r in fake)
    fake, _ = quantize_activation(x, 1, "token", "gaussian")
    # Optimal 1-bit levels for N(μ, σ²) are μ ± σ·√(2/π).
    expected = x.std(dim=1, unbiased=False) * math.sqrt(2 / math.pi)
    assert torch.allclose(fake.max(dim=1).values - x.mean(dim=1), expected, rtol=1e-3)


def test_gaussian_steps_match_the_published_table():
    for bits, step in ((1, 1.596), (2, 0.9957), (3, 0.5860), (4, 0.3352)):
        assert gaussian_optimal_step(bits) == pytest.approx(step, abs=6e-4)


def _by_definition(x: torch.Tensor, bits: int, rule: str, ratio: float):
    """(levels, scale, offset) per row in float64, written from quantizer_spec's docstring."""
    low, top = spec.level_range(bits)
    x = x.double()
    if rule == "minmax":
        lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
        half = ratio * (hi - lo) / 2
        scale, offset = (2 * half / top).clamp_min(spec.SCALE_EPS), (lo + hi) / 2 - half
    elif rule == "gaussian":
        sigma = x.std(-1, unbiased=False, keepdim=True)
        scale = (ratio * gaussian_optimal_step(bits) * sigma).clamp_min(spec.SCALE_EPS)
        offset = x.mean(-1, keepdim=True) - scale * top / 2
    else:
        pytest.fail(f"no reference for scale rule {rule!r}: write its formula here and in quantizer_spec's docstring")
    return ((x - offset) / scale).round().clamp(low, top), scale, offset


@pytest.mark.parametrize("rule", spec.RULES)
@pytest.mark.parametrize("bits", range(spec.MIN_BITS, spec.MAX_BITS + 1))
def test_activation_quantizer_is_the_definition(rule, bits):
    x = _randn(bits, 16, 384) * torch.rand(16, 1) * 3 + _randn(bits + 100, 16, 1)
    x[5] = -1.5  # a constant token: the smallest scale decides
    ratio = torch.tensor(0.7)
    levels, scale, offset = _by_definition(x, bits, rule, 0.7)
    fake, q = quantize_activation(x, bits, "token", rule, ratio)
    assert torch.allclose(q.scale.double(), scale, rtol=1e-5)
    assert torch.allclose(q.offset.double(), offset, rtol=1e-5, atol=1e-6)
    assert q.scale[5].item() == pytest.approx(spec.SCALE_EPS) and q.levels[5].unique().numel() == 1
    # float32 statistics may move a value across a rounding boundary, by one level, very rarely (the
    # constant token aside: there float32 cannot hold offset ± a few SCALE_EPS, float64 can)
    varied, reference = torch.cat([q.levels[:5], q.levels[6:]]).double(), torch.cat([levels[:5], levels[6:]])
    assert (varied - reference).abs().max() <= 1 and (varied != reference).double().mean() < 1e-3
    assert torch.allclose(fake, q.dequantize(), rtol=1e-6, atol=1e-6)
    inference = activation_levels(x, bits, "token", rule, ratio)  # the integer path's levels: the same numbers
    assert torch.equal(inference.levels, q.levels) and torch.equal(inference.scale, q.scale)


def test_unknown_rules_are_refused_naming_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown activation scale rule 'max'; use one of \('minmax', 'gaussian'\)"):
        ActivationQuantizer(4, rule="max")
    with pytest.raises(ValueError, match="unknown activation scale rule"):
        quantize_activation(torch.randn(2, 8), 4, "token", "max")
    assert spec.int8_level_shift(8) == 128 and spec.int8_level_shift(7) == 0 and spec.level_range(3) == (0, 7)


def test_gaussian_rule_beats_minmax_on_gaussian_tokens_at_low_bits():
    x = torch.randn(64, 1152, generator=torch.Generator().manual_seed(0))
    for bits in (2, 3):
        mse = {r: (quantize_activation(x, bits, "token", r)[0] - x).pow(2).mean() for r in ("minmax", "gaussian")}
        assert mse["gaussian"] < mse["minmax"]


@pytest.mark.parametrize("rule", ["minmax", "gaussian"])
@pytest.mark.parametrize("learn", [False, True])
def test_gradients_flow_through_activation_quantizers(rule, learn):
    quant = ActivationQuantizer(2, "token", rule, learn_clip=learn)
    x = torch.randn(4, 32, requires_grad=True)
    (quant(x) * torch.randn(4, 32)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    if learn:
        assert quant.clip_ratio.grad is not None and quant.clip_ratio.grad != 0


def test_bits_out_of_range_are_rejected():
    for bad in (0, 9, 2.5, True, "4"):
        with pytest.raises(ValueError, match="1 to 8"):
            ActivationQuantizer(bad)


def test_fused_fake_quantize_matches_the_autograd_definition():
    from robuq.quant.primitives import affine_fake_quantize, round_ste

    x = (torch.randn(6, 40) * 2).requires_grad_()
    scale, offset = torch.full((6, 1), 0.3), torch.full((6, 1), -0.9)
    fused, levels = affine_fake_quantize(x, scale, offset, 0, 7)
    g = torch.randn(6, 40)
    fused.backward(g)
    reference_x = x.detach().clone().requires_grad_()
    reference_levels = torch.clamp(round_ste((reference_x - offset) / scale), 0, 7)
    (reference_levels * scale + offset).backward(g)
    assert torch.equal(levels, reference_levels.detach())
    assert torch.allclose(fused, reference_levels * scale + offset)
    assert torch.allclose(x.grad, reference_x.grad)  # the reference divides and multiplies by scale
