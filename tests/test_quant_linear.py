import pytest
import torch
import torch.nn as nn

from robuq.quant.attention import QuantAttentionCore
from robuq.quant.linear import PAPER_LOWRANK_SHARE, LinearQuantConfig, QuantLinear


def _relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture
def linear():
    torch.manual_seed(0)
    return nn.Linear(192, 384)


def test_hadamard_8bit_fp_weights_match_linear(linear):
    x = torch.randn(4, 49, 192) * torch.linspace(0.1, 5, 192)  # uneven channels, like real activations
    q = QuantLinear.from_linear(linear, LinearQuantConfig(weight="fp", act_bits=8, hadamard=True, hadamard_signs=True))
    assert _relative_error(q(x), linear(x)) < 0.01


@pytest.mark.parametrize("rank", [0, 16, 192])
def test_full_precision_quantlinear_is_exact(linear, rank):
    q = QuantLinear.from_linear(linear, LinearQuantConfig(weight="fp", act_bits=None, hadamard=True, lowrank_rank=rank))
    x = torch.randn(3, 192)
    assert torch.allclose(q(x), linear(x), atol=1e-4)


def test_full_rank_branch_reproduces_rotated_weight(linear):
    q = QuantLinear.from_linear(linear, LinearQuantConfig(weight="ternary", hadamard=True, lowrank_rank=192))
    rotated = q.rotate_weight(linear.weight)
    assert torch.allclose(q.lowrank_up @ q.lowrank_down, rotated, atol=1e-5)
    assert q.weight.abs().max() < 1e-5  # nothing left for the ternary residual


def test_lowrank_branch_reduces_ternary_error(linear):
    x = torch.randn(16, 192)
    errors = []
    for rank in (0, 32):
        q = QuantLinear.from_linear(
            linear, LinearQuantConfig(weight="ternary", act_bits=None, hadamard=True, lowrank_rank=rank)
        )
        errors.append(_relative_error(q(x), linear(x)))
    assert errors[1] < errors[0]


@pytest.mark.parametrize("lowrank_input", ["fp", "quantized"])
def test_gradients_reach_every_parameter(linear, lowrank_input):
    config = LinearQuantConfig(
        weight="ternary",
        act_bits=2,
        act_rule="gaussian",
        learn_clip=True,
        hadamard=True,
        lowrank_rank=8,
        lowrank_input=lowrank_input,
    )
    q = QuantLinear.from_linear(linear, config)
    x = torch.randn(2, 5, 192, requires_grad=True)
    q(x).pow(2).mean().backward()
    for name, p in q.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


def test_frozen_lowrank_branch(linear):
    q = QuantLinear.from_linear(linear, LinearQuantConfig(lowrank_rank=4, lowrank_trainable=False))
    assert not q.lowrank_up.requires_grad and not q.lowrank_down.requires_grad


def test_exported_levels_reproduce_the_forward(linear):
    config = LinearQuantConfig(weight="ternary", act_bits=3, act_rule="gaussian", hadamard=True)
    q = QuantLinear.from_linear(linear, config)
    x = torch.randn(6, 192)
    w, a = q.quantized_weight(), q.act_quant.quantize(q.rotate_input(x))
    # Integer matmul of the levels, then the scales: what a packed kernel computes.
    integer = a.levels @ w.levels.T
    y = integer * a.scale * w.scale.T + a.offset * (w.dequantize().sum(dim=1)) + q.bias
    assert torch.allclose(y, q(x), atol=1e-4)


@pytest.mark.parametrize("shape,rank", [((192, 576), 3), ((768, 192), 3), ((1152, 4608), 16), ((3072, 12288), 43)])
def test_lowrank_share_scales_the_rank_with_the_width(shape, rank):
    config = LinearQuantConfig(hadamard=True, lowrank_rank=16, lowrank_share=PAPER_LOWRANK_SHARE)
    assert QuantLinear(*shape, True, config).rank == rank


def test_rank_zero_and_share_zero_build_no_branch(linear):
    for config in (LinearQuantConfig(lowrank_rank=0), LinearQuantConfig(lowrank_rank=16, lowrank_share=0.0)):
        q = QuantLinear.from_linear(linear, config)
        assert q.rank == 0 and not hasattr(q, "lowrank_up")


def test_bad_linear_configs_fail_clearly():
    with pytest.raises(ValueError, match="share of the layer's width"):
        LinearQuantConfig(lowrank_share=1.5)
    with pytest.raises(ValueError, match="weight format"):
        LinearQuantConfig(weight="int9")
    with pytest.raises(ValueError, match="lowrank_input"):
        LinearQuantConfig(lowrank_input="bf16")
    with pytest.raises(ValueError, match="unknown linear quantization fields"):
        LinearQuantConfig.from_dict({"wieght": "fp"})


def test_quantized_attention_close_at_8_bits():
    q, k, v = (torch.randn(2, 3, 49, 64) for _ in range(3))
    exact = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert _relative_error(QuantAttentionCore(8)(q, k, v), exact) < 0.02
    assert _relative_error(QuantAttentionCore(4)(q, k, v), exact) > _relative_error(
        QuantAttentionCore(8)(q, k, v), exact
    )
