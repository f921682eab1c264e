"""Triton kernels: the fused Hadamard transform + per-token quantizer, and the low-bit integer matmul.

Imported only through ``robuq.kernels.triton_ops``, which decides when they run. Under
``TRITON_INTERPRET=1`` Triton executes them on the CPU with NumPy, which is how CI tests them.
"""

from __future__ import annotations

import triton
import triton.language as tl

from robuq.core import quantizer_spec

# The quantizer's constants, from its one definition: the ids of the scale rules the fused quantizer has
# a branch for (triton_ops.RULES), and the smallest scale.
RULE_MINMAX = tl.constexpr(quantizer_spec.SCALE_RULES["minmax"])
RULE_GAUSSIAN = tl.constexpr(quantizer_spec.SCALE_RULES["gaussian"])
SCALE_EPS = tl.constexpr(quantizer_spec.SCALE_EPS)


@triton.jit
def _round_half_even(v):
    # torch.round rounds halves to even; floor(v + 0.5) would not, and a level could differ from the CPU's.
    r = tl.floor(v)
    d = v - r
    odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
    return tl.where((d > 0.5) | ((d == 0.5) & odd), r + 1.0, r)


@triton.jit
def _token_scale_offset(y, valid, n, top, step_factor, ratio, RULE: tl.constexpr):
    """The scale and offset of one token's rotated values ``y`` (where ``valid``) by the scale rule."""
    if RULE == RULE_MINMAX:
        lo = tl.min(tl.min(tl.where(valid, y, float("inf")), axis=1), axis=0)
        hi = tl.max(tl.max(tl.where(valid, y, float("-inf")), axis=1), axis=0)
        half = (hi - lo) / 2 * ratio
        scale = tl.maximum(2 * half / top, SCALE_EPS)
        offset = (lo + hi) / 2 - half
    else:  # RULE_GAUSSIAN (the kernel refuses any other id)
        mean = tl.sum(tl.sum(tl.where(valid, y, 0.0), axis=1), axis=0) / n
        centred = tl.where(valid, y - mean, 0.0)
        std = tl.sqrt_rn(tl.sum(tl.sum(centred * centred, axis=1), axis=0)) / tl.sqrt_rn(n * 1.0)
        scale = tl.maximum(step_factor * std * ratio, SCALE_EPS)
        offset = mean - scale * (top / 2)
    # A NaN or infinity in the row: NaN scale and offset, so its outputs are NaN as on PyTorch's path
    # (min, max and the clamps to the levels would hide it).
    bad = tl.sum(tl.sum(tl.where(valid, y - y, 0.0), axis=1), axis=0)
    scale = tl.where(bad == 0.0, scale, float("nan"))
    offset = tl.where(bad == 0.0, offset, float("nan"))
    return scale, offset


@triton.jit
def hadamard_quantize_kernel(
    x_ptr,
    signs_ptr,
    ha_ptr,
    hb_t_ptr,
    y_ptr,
    levels_ptr,
    scale_ptr,
    offset_ptr,
    ratio_ptr,
    A,
    n,
    stride_x,
    stride_y,
    stride_levels,
    step_factor,
    top,
    shift,
    AP: tl.constexpr,
    B: tl.constexpr,
    SIGNS: tl.constexpr,  # 0: none, 1: before H (forward), 2: after H (inverse)
    STORE_Y: tl.constexpr,
    QUANT: tl.constexpr,
    RULE: tl.constexpr,
    HAS_RATIO: tl.constexpr,
):
    """One token per program. Its n = A·B values are viewed as an (A, B) matrix X, padded to AP rows;
    H = H_A ⊗ H_B makes the transform H_A · X · H_Bᵀ, two small dense products (exact in fp32)."""
    row = tl.program_id(0)
    ra = tl.arange(0, AP)
    rb = tl.arange(0, B)
    index = ra[:, None] * B + rb[None, :]
    valid = (ra[:, None] < A) & (rb[None, :] < B)
    x = tl.load(x_ptr + row * stride_x + index, mask=valid, other=0.0).to(tl.float32)
    if SIGNS == 1:
        x = x * tl.load(signs_ptr + index, mask=valid, other=0.0)
    hb_t = tl.load(hb_t_ptr + rb[:, None] * B + rb[None, :])
    ha = tl.load(ha_ptr + ra[:, None] * AP + ra[None, :])  # zero-padded beyond A, so padding stays zero
    y = tl.dot(x, hb_t, input_precision="ieee")
    y = tl.dot(ha, y, input_precision="ieee")
    if SIGNS == 2:
        y = y * tl.load(signs_ptr + index, mask=valid, other=0.0)
    if STORE_Y:
        tl.store(y_ptr + row * stride_y + index, y.to(y_ptr.dtype.element_ty), mask=valid)
    if QUANT:
        tl.static_assert(
            (RULE == RULE_MINMAX) | (RULE == RULE_GAUSSIAN),
            "hadamard_quantize_kernel has minmax and gaussian rules only",
        )
        ratio = 1.0
        if HAS_RATIO:
            ratio = tl.load(ratio_ptr)
        scale, offset = _token_scale_offset(y, valid, n, top, step_factor, ratio, RULE)
        u = _round_half_even(tl.div_rn(y - offset, scale))
        u = tl.minimum(tl.maximum(u, 0.0), top * 1.0) - shift
        tl.store(levels_ptr + row * stride_levels + index, u.to(tl.int8), mask=valid)
        tl.store(scale_ptr + row, scale)
        tl.store(offset_ptr + row, offset)


@triton.jit
def _packed_ternary_products(
    a_ptr, w_ptr, rm, rn, M, N, K, stride_a, stride_w, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr
):
    """q Lᵀ (int32) of one output tile for L ternary in lowbit_matmul_kernel's 2-bit packing."""
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    quarter = K // 4
    for k in range(0, quarter, BK):
        kk = k + rk
        packed = tl.load(
            w_ptr + kk[:, None] * stride_w + rn[None, :], mask=(kk[:, None] < quarter) & (rn[None, :] < N), other=0
        )
        for part in tl.static_range(4):
            a = tl.load(
                a_ptr + rm[:, None] * stride_a + (part * quarter + kk)[None, :],
                mask=(rm[:, None] < M) & (kk[None, :] < quarter),
                other=0,
            )
            w = ((packed >> (2 * part)) & 3).to(tl.int8) - 1
            acc += tl.dot(a, w)
    return acc


@triton.jit
def _int8_products(
    a_ptr, w_ptr, rm, rn, M, N, K, stride_a, stride_w, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr
):
    """q Lᵀ (int32) of one output tile for int8 weight levels L (K, N)."""
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    for k in range(0, K, BK):
        kk = k + rk
        a = tl.load(a_ptr + rm[:, None] * stride_a + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K), other=0)
        w = tl.load(w_ptr + kk[:, None] * stride_w + rn[None, :], mask=(kk[:, None] < K) & (rn[None, :] < N), other=0)
        acc += tl.dot(a, w)
    return acc


@triton.jit
def lowbit_matmul_kernel(
    a_ptr,
    w_ptr,
    out_ptr,
    scale_ptr,
    offset_ptr,
    alpha_ptr,
    offset_row_ptr,
    bias_ptr,
    M,
    N,
    K,
    stride_a,
    stride_w,
    stride_out,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    PACKED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """out = s·(q Lᵀ)·α + o·(ΣL·α) + b for int8 activation levels q (M, K) and weight levels L.

    PACKED: L is ternary, 2 bits per weight, stored (K/4, N) with byte (k, j) holding the codes L+1 of
    rows k, k + K/4, k + 2K/4, k + 3K/4 — so each of the four 2-bit fields is a contiguous K/4 slice and
    no interleaving is needed to unpack. Otherwise L is int8 (K, N). Accumulation is int32.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    if PACKED:
        acc = _packed_ternary_products(a_ptr, w_ptr, rm, rn, M, N, K, stride_a, stride_w, BM, BN, BK)
    else:
        acc = _int8_products(a_ptr, w_ptr, rm, rn, M, N, K, stride_a, stride_w, BM, BN, BK)
    s = tl.load(scale_ptr + rm, mask=rm < M, other=0.0)
    o = tl.load(offset_ptr + rm, mask=rm < M, other=0.0)
    alpha = tl.load(alpha_ptr + rn, mask=rn < N, other=0.0)
    level_sums = tl.load(offset_row_ptr + rn, mask=rn < N, other=0.0)
    y = acc.to(tl.float32) * s[:, None] * alpha[None, :] + o[:, None] * level_sums[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn, mask=rn < N, other=0.0)[None, :]
    tl.store(out_ptr + rm[:, None] * stride_out + rn[None, :], y, mask=(rm[:, None] < M) & (rn[None, :] < N))
