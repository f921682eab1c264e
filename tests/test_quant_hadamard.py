import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from robuq.core.hadamard_matrices import hadamard_factors, hadamard_matrix, is_supported_size, small_hadamard_orders
from robuq.quant.hadamard import hadamard_transform, random_signs

DIT_SIZES = [192, 384, 768, 1024, 1152, 1536, 3072, 4096, 4608]
SMALL_ORDERS = list(small_hadamard_orders())


@pytest.mark.parametrize("m", SMALL_ORDERS)
def test_small_constructions_are_symmetric_hadamard(m):
    scaled = hadamard_matrix(m, torch.float64) * math.sqrt(m)
    H = scaled.round()
    assert torch.allclose(scaled, H, atol=1e-12)
    assert set(H.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(H @ H.T, m * torch.eye(m, dtype=torch.float64))
    assert torch.equal(H, H.T)


def test_paper_orders_are_built_in():
    assert {12, 20, 28, 36, 44, 60}.issubset(SMALL_ORDERS)


@pytest.mark.parametrize("n", DIT_SIZES)
def test_dit_sizes_orthogonal_and_self_inverse(n):
    H = hadamard_matrix(n, torch.float64)
    assert torch.equal(H, H.T)  # symmetric, so orthogonal means its own inverse
    probe = torch.randn(n, 8, dtype=torch.float64)  # H·Hᵀ = I checked on random vectors: n³ is too slow at 4608
    assert torch.allclose(H @ (H.T @ probe), probe, atol=1e-10)
    if n <= 768:
        assert torch.allclose(H @ H.T, torch.eye(n, dtype=torch.float64), atol=1e-12)


supported = st.builds(lambda m, k: m * 2**k, st.sampled_from([1] + SMALL_ORDERS[:8]), st.integers(0, 6))


@settings(max_examples=25, deadline=None)
@given(n=supported, rows=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_fast_transform_equals_dense_matrix(n, rows, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=g, dtype=torch.float64)
    H = hadamard_matrix(n, torch.float64)
    assert torch.allclose(hadamard_transform(x), x @ H.T, atol=1e-10)
    signs = random_signs(n, seed).double()
    assert torch.allclose(hadamard_transform(x, signs), (x * signs) @ H.T, atol=1e-10)
    y = hadamard_transform(x, signs)
    assert torch.allclose(hadamard_transform(y, signs, inverse=True), x, atol=1e-10)
    assert torch.allclose(hadamard_transform(hadamard_transform(x)), x, atol=1e-10)


def test_gradient_is_the_transpose():
    small = torch.randn(2, 24, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: hadamard_transform(t, random_signs(24, 1).double()), (small,))
    n = 192
    x = torch.randn(3, 7, n, dtype=torch.float64, requires_grad=True)
    signs = random_signs(n, 1).double()
    g = torch.randn(3, 7, n, dtype=torch.float64)
    hadamard_transform(x, signs).backward(g)
    assert torch.allclose(x.grad, hadamard_transform(g, signs, inverse=True))


@pytest.mark.parametrize("n", [3, 6, 18, 100])
def test_unsupported_size_names_the_size(n):
    assert not is_supported_size(n)
    with pytest.raises(ValueError, match=f"size {n}"):
        hadamard_transform(torch.zeros(2, n))


def test_factors_keep_blocks_small():
    assert hadamard_factors(4608) == (36, 128)
    assert hadamard_factors(1152) == (36, 32)
    assert all(f <= 128 or f in SMALL_ORDERS for f in hadamard_factors(2**20))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    x = torch.randn(64, 1152)
    signs = random_signs(1152, 3)
    assert torch.allclose(hadamard_transform(x.cuda(), signs.cuda()).cpu(), hadamard_transform(x, signs), atol=1e-4)


# The block-linear input widths of today's DiT families (PixArt-Σ, SD3.5 medium/large, FLUX.1, FLUX.2 klein/dev,
# Sana 600M/1.6B), including joined widths that are split before quantization, and the tiny test configs'.
FAMILY_SIZES = [
    8,
    20,
    24,
    32,
    40,
    96,
    128,
    160,
    1152,
    1536,
    2240,
    2432,
    2880,
    3072,
    4608,
    5600,
    6144,
    9216,
    9728,
    12288,
    15360,
    18432,
    24576,
]


def _kronecker_rows(n: int, rows: list[int]) -> torch.Tensor:
    """Rows of the normalised H_n read off the definition of a Kronecker product (no dense n×n matrix):
    H[i, j] = Π_f h_f[i_f, j_f] over the mixed-radix digits of i and j."""
    factors = [hadamard_matrix(f, torch.float64) * math.sqrt(f) for f in hadamard_factors(n)]
    out = torch.ones(len(rows), n, dtype=torch.float64)
    stride = n
    for h in factors:
        r = h.shape[0]
        stride //= r
        i_digit = torch.tensor([(i // stride) % r for i in rows])
        j_digit = (torch.arange(n) // stride) % r
        out *= h[i_digit][:, j_digit]
    return out / math.sqrt(n)


@pytest.mark.parametrize("n", FAMILY_SIZES)
def test_family_widths_are_exact_hadamard_transforms(n):
    assert is_supported_size(n)
    rows = [0, 1, n // 3, n - 1]
    basis = torch.zeros(len(rows), n, dtype=torch.float64)
    basis[range(len(rows)), rows] = 1.0
    expected = _kronecker_rows(n, rows)  # H is symmetric: H e_i is row i
    torch.testing.assert_close(hadamard_transform(basis), expected, rtol=0, atol=1e-12)
    assert torch.all(expected.abs().sub(n**-0.5).abs() < 1e-12)  # ±1/√n entries: a Hadamard matrix
    x = torch.randn(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    y = hadamard_transform(x)
    torch.testing.assert_close(y.norm(dim=1), x.norm(dim=1))  # orthogonal
    torch.testing.assert_close(hadamard_transform(y), x)  # symmetric and orthogonal: its own inverse
    if n <= 2432:
        torch.testing.assert_close(y, x @ hadamard_matrix(n, torch.float64))  # the dense matrix, where it is small


@pytest.mark.parametrize("n", [2240, 2880, 5600, 15360])
def test_family_widths_through_the_cpu_kernel_match_float64(n):
    x = torch.randn(5, n, generator=torch.Generator().manual_seed(1))
    signs = random_signs(n, 3)
    exact = hadamard_transform(x.double(), signs.double()).float()
    torch.testing.assert_close(hadamard_transform(x, signs), exact, rtol=1e-4, atol=1e-5)
