import pytest
import torch

from robuq.deploy.integer_linear import IntegerLinear
from robuq.kernels import native
from robuq.quant.linear import LinearQuantConfig, QuantLinear


@pytest.mark.parametrize("options", [
    dict(act_bits=2, act_rule="gaussian", hadamard=True, hadamard_signs=True, lowrank_rank=4),
    dict(act_bits=8, act_rule="minmax", lowrank_rank=0),
    dict(act_bits=1, act_rule="minmax", hadamard=True, learn_clip=True),
    dict(act_bits=3, act_granularity="tensor", act_rule="gaussian", hadamard=True, lowrank_rank=2),
    dict(act_bits=4, weight="int4", lowrank_rank=3, lowrank_input="quantized"),
])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kernels", ["native", "pytorch"])
def test_integer_linear_matches_the_fake_quant_layer(options, bias, kernels):
    with native.use(kernels == "native"):
        _check_integer_linear_matches(options, bias)


def _check_integer_linear_matches(options, bias):
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(torch.nn.Linear(24, 20, bias=bias), LinearQuantConfig(**options)).eval()
    if layer.act_quant.clip_ratio is not None:
        layer.act_quant.clip_ratio.data.fill_(0.8)
    integer = IntegerLinear(layer)
    integer.block_rows = 4  # 3 × 7 tokens: several blocks and a short last one
    x = torch.randn(3, 7, 24) * 2 + 0.5
    with torch.no_grad():
        expected, got = layer(x), integer(x)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_loading_a_state_dict_refreshes_the_derived_tensors():
    config = LinearQuantConfig(act_bits=4, act_rule="gaussian", hadamard=True, hadamard_signs=True, lowrank_rank=3)
    torch.manual_seed(0)
    first = IntegerLinear(QuantLinear.from_linear(torch.nn.Linear(24, 20), config))
    second = IntegerLinear(QuantLinear.from_linear(torch.nn.Linear(24, 20), config))
    x = torch.randn(5, 24)
    with torch.no_grad():
        expected = second(x)
        first.load_state_dict(second.state_dict())
        assert torch.equal(first(x), expected)
