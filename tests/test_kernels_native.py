"""robuq's C kernels (robuq/kernels/cpu_kernels.c) against the PyTorch code they replace."""
import os
import shutil
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from robuq.kernels import native
from robuq.quant.activation import activation_scale_offset
from robuq.quant.attention import QuantAttentionCore
from robuq.quant.hadamard import hadamard_matrix, hadamard_transform, random_signs, small_hadamard_orders

# Skipped only without a compiler: with one, a build that fails must fail these tests, not hide them.
pytestmark = pytest.mark.skipif(not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")),
                                reason="no C compiler to build the kernels with")


def test_kernels_build_where_there_is_a_compiler():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed build warns and falls back; here that is a failure
        native._library.cache_clear()
        assert native.enabled()

SIZES = [20, 24, 192, 384, 768, 1152, 1536, 4096, 4608]


def transform_matrix(n: int, signs: torch.Tensor, inverse: bool) -> torch.Tensor:
    """T = H·D/√n, or Tᵀ = D·H/√n, in float64."""
    # diag(signs) scales H's rows (D·H) or columns (H·D): a product with the dense diagonal took seconds at 4608.
    H, s = hadamard_matrix(n, torch.float64), signs.double()
    return s[:, None] * H if inverse else H * s[None, :]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("inverse", [False, True])
def test_hadamard_equals_the_dense_matrix(n, inverse):
    torch.manual_seed(n)
    x = torch.randn(37, n)  # 37 rows: two full tiles of 16 and a ragged one
    signs = random_signs(n, seed=4)
    expected = x.double() @ transform_matrix(n, signs, inverse).t()
    assert torch.allclose(native.hadamard(x, signs, inverse).double(), expected, atol=1e-5)
    assert torch.allclose(native.hadamard(x, None, inverse).double(), x.double() @ hadamard_matrix(n, torch.float64), atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(m=st.sampled_from([1] + list(small_hadamard_orders())[:6]), k=st.integers(0, 7), rows=st.integers(1, 40))
def test_hadamard_any_supported_size(m, k, rows):
    n = m * 2**k
    x = torch.randn(rows, n)
    assert torch.allclose(native.hadamard(x, None, False).double(), x.double() @ hadamard_matrix(n, torch.float64), atol=1e-5)


def test_hadamard_transform_takes_the_kernel_for_float32_and_keeps_its_gradient(monkeypatch):
    n = 384
    x = torch.randn(4, 5, n, requires_grad=True)
    signs = random_signs(n, 2)
    y = hadamard_transform(x, signs)
    g = torch.randn_like(y)
    y.backward(g)
    monkeypatch.setenv("ROBUQ_NATIVE", "0")  # the PyTorch path, for reference
    assert not native.enabled()
    assert torch.allclose(y.detach(), hadamard_transform(x.detach(), signs), atol=1e-5)
    assert torch.allclose(x.grad, hadamard_transform(g, signs, inverse=True), atol=1e-5)


@pytest.mark.parametrize("rule", ["minmax", "gaussian"])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("rotate", [True, False])
def test_hadamard_quantize_matches_the_pytorch_quantizer(rule, bits, rotate):
    torch.manual_seed(bits)
    n = 1152
    x = torch.randn(21, n) * torch.rand(21, 1) * 3 + torch.randn(21, 1)
    signs = random_signs(n, 5)
    shift = 128 if bits == 8 else 0
    ratio = torch.tensor(0.8)
    rotated, levels, scale, offset, _ = native.hadamard_quantize(x, signs, rotate, bits, rule, ratio, True, shift)
    reference = x.double() @ transform_matrix(n, signs, False).t() if rotate else x.double()
    assert torch.allclose(rotated.double(), reference, atol=1e-5)
    # Given the same rotated rows, statistics and levels are PyTorch's to the last bit (or rounding).
    ref_scale, ref_offset = activation_scale_offset(rotated, bits, "token", rule, ratio)
    assert torch.allclose(scale, ref_scale, rtol=1e-6) and torch.allclose(offset, ref_offset, rtol=1e-5, atol=1e-6)
    ref_levels = ((rotated - offset) / scale).round().clamp(0, 2**bits - 1) - shift
    assert levels.dtype == torch.int8 and torch.equal(levels.float(), ref_levels)
    down = torch.randn(20, n)  # a low-rank branch's first matmul in the same pass: 16 outputs, then 4
    _, without_copy, _, _, branch = native.hadamard_quantize(x, signs, rotate, bits, rule, ratio, False, shift, down)
    assert torch.equal(without_copy, levels)
    assert torch.allclose(branch, rotated @ down.t(), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("cols", [33, 48])  # a ragged tail, and whole vectors only
@pytest.mark.parametrize("rank, gelu", [(0, False), (5, False), (16, True)])
def test_rescale_is_the_integer_linear_epilogue(cols, rank, gelu):
    import torch.nn.functional as F

    rows = 19  # not a multiple of the kernel's row block
    acc = torch.randint(-1000, 1000, (rows, cols), dtype=torch.int32)
    s, o = torch.rand(rows, 1), torch.randn(rows, 1)
    alpha, w, b = torch.rand(cols), torch.randn(cols), torch.randn(cols)
    branch, up = torch.randn(rows, rank), torch.randn(cols, rank)
    expected = acc.float() * s * alpha + o * w + b + branch @ up.t()
    if gelu:
        expected = F.gelu(expected, approximate="tanh")
    out = native.rescale(acc, torch.empty(rows, cols), s, o, alpha, w, b, branch if rank else None,
                         up.t().contiguous() if rank else None, gelu)
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-4)


def test_layer_norm_modulate_and_gated_residual_match_the_block_code():
    import torch.nn.functional as F

    from robuq.models.dit import modulate

    x, y = torch.randn(3, 10, 40) * 3 + 1, torch.randn(3, 10, 40)
    shift, scale, gate = torch.randn(3, 40), torch.randn(3, 40), torch.randn(3, 40)
    expected = modulate(F.layer_norm(x, (40,), eps=1e-6), shift, scale)
    assert torch.allclose(native.layer_norm_modulate(x, shift, scale, 1e-6), expected, rtol=1e-5, atol=1e-5)
    assert torch.allclose(native.gated_residual(x, gate, y), x + gate.unsqueeze(1) * y, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="do not fit"):
        native.layer_norm_modulate(x, shift[:2], scale[:2], 1e-6)
    with pytest.raises(ValueError, match="do not fit"):
        native.layer_norm_modulate(x, shift, scale[:, :20], 1e-6)


@pytest.mark.parametrize("bits, probs_bits", [(8, 8), (4, 8), (8, 4), (3, 2)])
@pytest.mark.parametrize("shape", [(2, 40, 3, 4, 16), (1, 7, 3, 2, 8)])
def test_integer_attention_equals_the_fake_quantized_core(bits, probs_bits, shape):
    torch.manual_seed(bits * 10 + probs_bits)
    core = QuantAttentionCore(bits=bits, probs_bits=probs_bits)
    qkv = torch.randn(*shape).permute(2, 0, 3, 1, 4) * 2  # the strided views Attention passes in
    with torch.no_grad():
        fast = core(qkv[0], qkv[1], qkv[2])
    assert fast.transpose(1, 2).is_contiguous()  # Attention's transpose back to tokens costs no copy
    leaf = qkv.clone().requires_grad_(True)
    slow = core(leaf[0], leaf[1], leaf[2]).detach()  # gradients wanted: PyTorch's float fake-quantizers
    assert fast.shape == slow.shape
    # Equal up to float rounding: integer sums are exact, so differences come from the order of float
    # operations, and at most a rare probability level lands one step over (≤ one grid step of p times |v|).
    step = qkv[2].abs().max().item() / (2**probs_bits - 1)
    diff = (fast - slow).abs()
    assert diff.max().item() <= 2 * step
    assert diff.mean().item() <= 1e-3 * step + 1e-6


def test_portable_build_gives_the_same_attention(monkeypatch, tmp_path):
    """The u8×s8 dot products without AVX-512 VNNI (plain C) sum the same integers: same output, bit for bit."""
    qkv = torch.randn(2, 37, 3, 3, 20).permute(2, 0, 3, 1, 4)
    with torch.no_grad():
        fast = native.attention(qkv[0], qkv[1], qkv[2], 8, 8)
    monkeypatch.setattr(native, "FLAGS", [*native.FLAGS, "-DROBUQ_PORTABLE"])
    monkeypatch.setenv("ROBUQ_CACHE", str(tmp_path))
    native._library.cache_clear()
    try:
        portable = native.attention(qkv[0], qkv[1], qkv[2], 8, 8)
        assert list((tmp_path / "kernels").glob("cpu_kernels-*.so"))  # really a second build
    finally:
        native._library.cache_clear()
    assert torch.equal(portable, fast)


def test_missing_compiler_falls_back_with_a_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("ROBUQ_CACHE", str(tmp_path))
    native._library.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert not native.enabled()
        assert any("falling back to PyTorch" in str(w.message) for w in caught)
        x = torch.randn(3, 192)
        assert torch.allclose(hadamard_transform(hadamard_transform(x), inverse=True), x, atol=1e-5)
    finally:
        native._library.cache_clear()


def test_build_is_cached_per_source_and_flags(monkeypatch, tmp_path):
    monkeypatch.setenv("ROBUQ_CACHE", str(tmp_path))
    native._library.cache_clear()
    try:
        assert native.enabled()
        built = list((tmp_path / "kernels").glob("cpu_kernels-*.so"))
        assert len(built) == 1
        native._library.cache_clear()
        assert native.enabled() and list((tmp_path / "kernels").glob("cpu_kernels-*.so")) == built
    finally:
        native._library.cache_clear()


def test_gelu_matches_pytorch(tiny_dit):
    import torch.nn.functional as F

    from robuq.deploy.elementwise import NativeGELU

    x = torch.cat([torch.linspace(-12, 12, 4001), torch.tensor([0.0, -0.0, 1e-30, 88.0, -88.0])])
    assert torch.allclose(native.gelu_tanh(x), F.gelu(x, approximate="tanh"), atol=1e-6, rtol=1e-5)
    assert torch.allclose(native.gelu_tanh(x[:7]), F.gelu(x[:7], approximate="tanh"), atol=1e-6)  # a ragged tail only
    leaf = torch.randn(3, 5, requires_grad=True)  # training keeps PyTorch's op, and its gradient
    out = NativeGELU()(leaf)
    assert torch.equal(out, F.gelu(leaf, approximate="tanh")) and out.requires_grad


def test_native_kernels_swap_into_a_float_dit_and_keep_its_outputs(tiny_dit):
    import copy

    from robuq.deploy.elementwise import NativeDiTBlock, NativeFinalLayer, NativeGELU, use_native_kernels

    native_dit = use_native_kernels(copy.deepcopy(tiny_dit))
    assert all(type(b) is NativeDiTBlock for b in native_dit.blocks) and type(native_dit.final_layer) is NativeFinalLayer
    assert sum(isinstance(m, NativeGELU) for m in native_dit.modules()) == len(tiny_dit.blocks)  # float fc1: no fusion
    assert native_dit.state_dict().keys() == tiny_dit.state_dict().keys()
    x, t, y = torch.randn(2, tiny_dit.in_channels, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 2])
    with torch.no_grad():
        expected, got = tiny_dit(x, t, y), native_dit(x, t, y)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5)
    # With gradients wanted, every swapped module takes the model's own PyTorch code.
    loss = native_dit(x, t, y).square().mean()
    loss.backward()
    assert native_dit.blocks[0].attn.qkv.weight.grad is not None
