"""The Triton kernels give PyTorch's numbers: on a GPU when there is one, else on the CPU through
Triton's interpreter. Triton reads TRITON_INTERPRET at import, so on a machine without CUDA this file
runs only inside the subprocess that tests/test_kernels_interpreter.py starts with it set.

On the CPU they prove the kernels' arithmetic and the dispatch around them, not GPU compilation or speed.
"""

import os

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA: run through tests/test_kernels_interpreter.py", allow_module_level=True)

from robuq.core import quantizer_spec as spec  # noqa: E402
from robuq.deploy.integer_linear import IntegerLinear  # noqa: E402

from robuq.kernels import triton_ops  # noqa: E402
from robuq.core.hadamard_matrices import hadamard_matrix  # noqa: E402
from robuq.quant.activation import activation_levels  # noqa: E402
from robuq.quant.hadamard import hadamard_transform, random_signs  # noqa: E402
from robuq.quant.linear import LinearQuantConfig, QuantLinear  # noqa: E402
from robuq.quant.primitives import affine_levels  # noqa: E402


SIZES = [192, 256, 384, 768, 1152, 1536]
DEVICE = "cpu" if triton_ops.interpreting() else "cuda"


@pytest.fixture
def pytorch_path(monkeypatch):
    """Call it to send CPU tensors back to PyTorch's own path for the rest of the test."""
    return lambda: monkeypatch.setenv("TRITON_INTERPRET", "0")


def test_kernels_are_off_for_cpu_tensors_without_the_interpreter(pytorch_path):
    pytorch_path()
    assert not triton_ops.enabled_for(torch.zeros(1))


def test_split_covers_the_dit_sizes_and_rejects_what_the_kernel_cannot_take():
    for n in SIZES + [3072, 4096, 4608]:
        a, b = triton_ops.hadamard_split(n)
        assert a * b == n and b >= 16 and b & (b - 1) == 0
    assert triton_ops.hadamard_split(8) is None  # too small for tl.dot
    assert triton_ops.hadamard_split(7) is None  # no Hadamard matrix at all
    assert triton_ops.hadamard_split(9216) is None  # 72 padded rows: beyond the shared memory budget


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("inverse", [False, True])
def test_hadamard_kernel_equals_the_dense_matrix(n, inverse):
    torch.manual_seed(n)
    x = torch.randn(5, n)
    signs = random_signs(n, seed=3)
    dense = hadamard_matrix(n, torch.float64)
    d = torch.diag(signs.double())
    expected = x.double() @ (d @ dense if inverse else dense @ d).t()  # T = H·D/√n, Tᵀ = D·H/√n
    got = triton_ops.hadamard(x.to(DEVICE), signs.to(DEVICE), inverse).cpu()
    assert torch.allclose(got.double(), expected, atol=2e-5)


def test_hadamard_transform_dispatches_to_the_kernel_with_gradients(pytorch_path):
    from robuq.quant.backends import Backend, backends, register_backend

    n = 384
    x = torch.randn(2, 3, n, device=DEVICE, requires_grad=True)
    signs = random_signs(n, seed=1)
    calls = []
    original = next(b for b in backends("hadamard") if b.name == "triton")
    assert original.run is triton_ops.hadamard
    register_backend("hadamard", Backend("triton", original.accepts, lambda *a: calls.append(a[2]) or original.run(*a)))
    try:
        y = hadamard_transform(x, signs)
        weight = torch.randn_like(y)
        (y * weight).sum().backward()
    finally:
        register_backend("hadamard", original)
    assert calls == [False, True]  # forward T, backward Tᵀ, both through the kernel
    pytorch_path()
    assert torch.allclose(y.detach().cpu(), hadamard_transform(x.detach().cpu(), signs), atol=1e-5)
    assert torch.allclose(x.grad.cpu(), hadamard_transform(weight.cpu(), signs, inverse=True), atol=1e-5)


def test_unsupported_sizes_and_dtypes_fall_back_to_pytorch():
    for x in (torch.randn(3, 8, device=DEVICE), torch.randn(3, 192, dtype=torch.float64, device=DEVICE)):
        assert not triton_ops.can_hadamard(x)
        assert torch.allclose(hadamard_transform(hadamard_transform(x), inverse=True), x, atol=1e-5)


@pytest.mark.parametrize("rule", spec.RULES)
@pytest.mark.parametrize("bits", range(spec.MIN_BITS, spec.MAX_BITS + 1))
@pytest.mark.parametrize("ratio", [None, 0.7])
def test_fused_hadamard_quantize_matches_the_pytorch_quantizer(rule, bits, ratio):
    torch.manual_seed(bits)
    n = 1152
    x = torch.randn(9, n) * torch.rand(9, 1) * 3 + torch.randn(9, 1)
    signs = random_signs(n, seed=2)
    clip = None if ratio is None else torch.tensor(ratio)
    rotated, levels, scale, offset = (
        t.cpu()
        for t in triton_ops.hadamard_quantize(
            x.to(DEVICE), signs.to(DEVICE), bits, rule, None if clip is None else clip.to(DEVICE), store_rotated=True
        )
    )
    assert torch.allclose(rotated, x @ (hadamard_matrix(n) @ torch.diag(signs)).t(), atol=2e-5)
    ref = activation_levels(rotated, bits, "token", rule, clip)
    assert torch.allclose(scale, ref.scale.squeeze(1), rtol=1e-6)
    assert torch.allclose(offset, ref.offset.squeeze(1), rtol=1e-5, atol=1e-6)
    assert levels.dtype == torch.int8
    # Given the kernel's own statistics (their float sums may differ in the last bit), its levels are the
    # definition's, to the last bit.
    own = affine_levels(rotated, scale[:, None], offset[:, None], *spec.level_range(bits))
    assert torch.equal(levels.float(), own - spec.int8_level_shift(bits))
    assert max(row.unique().numel() for row in levels) <= 2**bits


@pytest.mark.parametrize("rule", spec.RULES)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_fused_hadamard_quantize_gives_a_non_finite_row_a_nan_scale(rule, value):
    torch.manual_seed(0)
    x = torch.randn(5, 256)
    clean = [t.cpu() for t in triton_ops.hadamard_quantize(x.to(DEVICE), None, 3, rule, None)[1:]]
    x[2, 17] = value
    levels, scale, offset = (t.cpu() for t in triton_ops.hadamard_quantize(x.to(DEVICE), None, 3, rule, None)[1:])
    assert scale[2].isnan() and offset[2].isnan()
    others = torch.tensor([0, 1, 3, 4])
    assert torch.equal(scale[others], clean[1][others]) and torch.equal(levels[others], clean[0][others])


def test_fused_quantizer_refuses_rules_and_bit_widths_it_does_not_implement(monkeypatch):
    x = torch.randn(3, 192, device=DEVICE)
    with pytest.raises(ValueError, match=r"unknown activation scale rule 'max'.*minmax.*gaussian"):
        triton_ops.hadamard_quantize(x, None, 4, "max", None)
    # A rule added to the definition but not to the kernel is refused, not computed as another rule.
    monkeypatch.setitem(spec.SCALE_RULES, "percentile", 2)
    with pytest.raises(ValueError, match=r"Triton kernels.*no activation scale rule 'percentile'.*minmax.*gaussian"):
        triton_ops.hadamard_quantize(x, None, 4, "percentile", None)
    for bits in (0, 9):
        with pytest.raises(ValueError, match="1 to 8"):
            triton_ops.hadamard_quantize(x, None, bits, "minmax", None)


def test_ternary_packing_keeps_each_quarter_of_k_in_one_bit_field():
    levels = torch.randint(-1, 2, (12, 5), dtype=torch.int8)
    packed = triton_ops.pack_ternary_columns(levels)
    assert packed.shape == (3, 5) and packed.dtype == torch.uint8
    unpacked = torch.cat([((packed >> (2 * p)) & 3).to(torch.int8) - 1 for p in range(4)])
    assert torch.equal(unpacked, levels)
    with pytest.raises(ValueError, match="divisible by 4"):
        triton_ops.pack_ternary_columns(levels[:10])


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("shape", [(37, 192, 80), (130, 264, 70), (1, 4, 1)])
def test_lowbit_matmul_is_exact_integer_arithmetic_plus_the_rescale(packed, shape):
    torch.manual_seed(0)
    m, k, n = shape
    q = torch.randint(-128, 128, (m, k), dtype=torch.int8)
    weights = (
        torch.randint(-1, 2, (k, n), dtype=torch.int8) if packed else torch.randint(-8, 8, (k, n), dtype=torch.int8)
    )
    s, o, alpha, sums, bias = torch.rand(m), torch.randn(m), torch.rand(n), torch.randn(n), torch.randn(n)
    w = triton_ops.pack_ternary_columns(weights) if packed else weights
    acc = (q.double() @ weights.double()).float()  # exact: every partial sum is an integer below 2^53
    for b in (bias, None):
        args = [t.to(DEVICE) for t in (q, w)] + [packed] + [t.to(DEVICE) for t in (s, o, alpha, sums)]
        got = triton_ops.lowbit_matmul(*args, None if b is None else b.to(DEVICE)).cpu()
        expected = acc * s[:, None] * alpha + o[:, None] * sums + (0 if b is None else b)
        assert torch.allclose(got, expected, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize(
    "options",
    [
        dict(act_bits=2, act_rule="gaussian", hadamard=True, hadamard_signs=True, lowrank_rank=4),
        dict(act_bits=8, act_rule="minmax", hadamard=True, lowrank_rank=2, lowrank_input="quantized"),
        dict(act_bits=3, act_rule="minmax", lowrank_rank=0),  # no Hadamard: PyTorch quantizes, the kernel multiplies
        dict(act_bits=4, weight="int4", hadamard=True, learn_clip=True, lowrank_rank=3),
    ],
)
def test_integer_linear_on_the_kernels_matches_its_pytorch_path(monkeypatch, pytorch_path, options):
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(torch.nn.Linear(192, 72), LinearQuantConfig(**options)).eval()
    if layer.act_quant.clip_ratio is not None:
        layer.act_quant.clip_ratio.data.fill_(0.8)
    integer = IntegerLinear(layer).to(DEVICE)
    x = torch.randn(3, 11, 192) * 2 + 0.5
    launched = []
    original = triton_ops.lowbit_matmul
    monkeypatch.setattr(triton_ops, "lowbit_matmul", lambda *a: launched.append(a[2]) or original(*a))
    with torch.no_grad():
        on_kernels = integer(x.to(DEVICE)).cpu()
        pytorch_path()
        on_pytorch, fake_quant = integer.cpu()(x), layer(x)
    assert launched == [options.get("weight", "ternary") == "ternary"]  # ternary weights go packed
    scale = fake_quant.abs().max().item()
    assert torch.allclose(on_kernels, on_pytorch, rtol=1e-5, atol=1e-5 * scale)
    assert torch.allclose(on_kernels, fake_quant, rtol=1e-5, atol=1e-5 * scale)
