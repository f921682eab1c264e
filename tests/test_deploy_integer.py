import pytest
import torch

from robuq.core import quantizer_spec as spec
from robuq.deploy.integer_linear import IntegerLinear
from robuq.kernels import native
from robuq.quant.activation import activation_levels
from robuq.quant.hadamard import hadamard_transform
from robuq.quant.linear import LinearQuantConfig, QuantLinear


@pytest.mark.parametrize(
    "options",
    [
        dict(act_bits=2, act_rule="gaussian", hadamard=True, hadamard_signs=True, lowrank_rank=4),
        dict(act_bits=8, act_rule="minmax", lowrank_rank=0),
        dict(act_bits=1, act_rule="minmax", hadamard=True, learn_clip=True),
        dict(act_bits=3, act_granularity="tensor", act_rule="gaussian", hadamard=True, lowrank_rank=2),
        dict(act_bits=4, weight="int4", lowrank_rank=3, lowrank_input="quantized"),
    ],
)
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


@pytest.mark.parametrize("rule", spec.RULES)
@pytest.mark.parametrize("bits", range(spec.MIN_BITS, spec.MAX_BITS + 1))
@pytest.mark.parametrize("kernels", ["native", "pytorch"])
def test_integer_linear_quantizes_its_input_by_the_definition(rule, bits, kernels, monkeypatch):
    monkeypatch.setenv("ROBUQ_NATIVE", "1" if kernels == "native" else "0")
    torch.manual_seed(bits)
    config = LinearQuantConfig(act_bits=bits, act_rule=rule, hadamard=True, hadamard_signs=True, learn_clip=True)
    layer = QuantLinear.from_linear(torch.nn.Linear(48, 16), config).eval()
    layer.act_quant.clip_ratio.data.fill_(0.9)
    integer = IntegerLinear(layer)
    x = torch.randn(2, 9, 48) * 2 + 0.5
    with torch.no_grad():
        levels, scale, offset = integer.input_levels(x)
        expected, got = layer(x), integer(x)
        ref = activation_levels(
            hadamard_transform(x, layer.hadamard_signs).reshape(-1, 48),
            bits,
            "token",
            rule,
            layer.act_quant.effective_clip_ratio(),
        )
    assert levels.dtype == torch.int8
    assert torch.allclose(scale, ref.scale, rtol=1e-5) and torch.allclose(offset, ref.offset, rtol=1e-5, atol=1e-5)
    # The rotation's float rounding may move a value across a rounding boundary: by one level, rarely.
    diff = (levels.float() + spec.int8_level_shift(bits) - ref.levels).abs()
    assert diff.max() <= 1 and diff.mean() < 1e-2
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_a_rule_the_kernels_lack_takes_the_pytorch_path(monkeypatch):
    from robuq.kernels import native

    layer = QuantLinear.from_linear(
        torch.nn.Linear(48, 16), LinearQuantConfig(act_bits=3, act_rule="gaussian", hadamard=True)
    ).eval()
    x = torch.randn(5, 48)
    with torch.no_grad():
        expected = layer(x)
        monkeypatch.setattr(native, "RULES", ("minmax",))  # as if cpu_kernels.c had no Gaussian branch
        monkeypatch.setattr(native, "hadamard_quantize", lambda *a, **k: pytest.fail("the kernel was called"))
        got = IntegerLinear(layer)(x)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def _ternary_layer(act_bits=3, **options):
    torch.manual_seed(0)
    config = LinearQuantConfig(
        act_bits=act_bits, act_rule="gaussian", hadamard=True, hadamard_signs=True, lowrank_rank=4, **options
    )
    return QuantLinear.from_linear(torch.nn.Linear(48, 40), config).eval()


def test_the_path_is_chosen_when_the_layer_is_built_and_again_when_its_tensors_move():
    from robuq.deploy.gemm import PATHS

    layer = _ternary_layer()
    with native.use(False):
        plain = IntegerLinear(layer, gemm="fp32")
    assert plain.path.name == "pytorch"
    x = torch.randn(2, 5, 48)
    with torch.no_grad():
        expected = plain(x)
        # the kernels' switch is read when the path is chosen, not per call
        assert IntegerLinear(layer, gemm="fp32").path.name == ("c" if native.enabled() else "pytorch")
        moved = plain.to("cpu")  # .to() builds the path again from what the layer holds and what is on now
        assert moved is plain and plain.path.name == ("c" if native.enabled() else "pytorch")
        assert torch.allclose(plain(x), expected, rtol=1e-5, atol=1e-5)
    assert "path=" in repr(plain)
    if "avx2" in PATHS:
        assert IntegerLinear(layer, gemm="avx2").path.name == "c-ternary"
        assert IntegerLinear(_ternary_layer(act_bits=5), gemm="avx2").path.name == "c"  # beyond the lookup GEMM


def test_a_copied_layer_runs_on_its_own_tensors():
    """A path may hold addresses of its layer's tensors: a deep copy must build its own, and outlive the original."""
    import copy
    import gc

    layer = IntegerLinear(_ternary_layer())
    layer.gelu = True
    x = torch.randn(7, 48)
    with torch.no_grad():
        expected = layer(x)
        twin = copy.deepcopy(layer)
        assert twin.path is not layer.path and twin.path.layer is twin
        del layer
        gc.collect()
        assert torch.equal(twin(x), expected)


def test_a_registered_path_is_taken_when_it_accepts_the_layer():
    from robuq.deploy import integer_linear
    from robuq.deploy.linear_pytorch import PyTorchLinear
    from robuq.quant import backends

    class Recorded(PyTorchLinear):
        name = "recorded"
        calls = 0

        def __call__(self, x):
            Recorded.calls += 1
            return super().__call__(x)

    before = backends.backends("integer_linear")
    try:
        backends._registry["integer_linear"].insert(
            0, backends.Backend("recorded", lambda m: m.act_bits == 3, Recorded)
        )
        taken, passed = IntegerLinear(_ternary_layer()), IntegerLinear(_ternary_layer(act_bits=4))
        assert taken.path.name == "recorded" and passed.path.name != "recorded"
        with torch.no_grad():
            taken(torch.randn(3, 48))
        assert Recorded.calls == 1
        assert integer_linear.choose_path(passed).name == passed.path.name
    finally:
        backends._registry["integer_linear"][:] = before
