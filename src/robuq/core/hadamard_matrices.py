"""Hadamard matrices for every DiT width: Paley constructions of small order times Sylvester blocks.

Pure maths on small float64 tensors, used by the transform in ``robuq.quant.hadamard`` and by the C and
Triton kernels, which need the same factors and matrices.

A size n is split as n = m · 2^k where m is the order of a known small Hadamard matrix (Paley
constructions, 12, 20, 28, 36, …) and 2^k is handled by Sylvester's construction. Every matrix built
here is symmetric, so the normalised transform is its own inverse.
"""

from __future__ import annotations

import functools
import math

import torch
from robuq.core.errors import RobuqError

# Largest Sylvester block applied as one matrix product; larger powers of two are split into near-equal
# blocks. Measured on a 2-core x86 CPU, (4096, 4608): one 128-wide block beat two smaller passes.
_MAX_BLOCK = 128
_MAX_SMALL_ORDER = 1024  # 700 (Paley II, q = 349) covers Sana 1.6B's MLP width 5600 = 175·32


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, int(math.isqrt(q)) + 1))


def _legendre_table(q: int) -> list[int]:
    squares = {(i * i) % q for i in range(1, q)}
    return [0] + [1 if a in squares else -1 for a in range(1, q)]


def _jacobsthal(q: int) -> torch.Tensor:
    chi = _legendre_table(q)
    return torch.tensor([[chi[(j - i) % q] for j in range(q)] for i in range(q)], dtype=torch.float64)


def _paley1_symmetric(q: int) -> torch.Tensor:
    """Order q + 1 for a prime q ≡ 3 (mod 4), made symmetric.

    Paley's matrix I + [[0, 1ᵀ], [−1, Q]] is skew-type; reflecting the last q columns (j → −j mod q)
    makes the Q block χ(−1)·χ(i + j), which is symmetric, and negating the first row makes the border
    symmetric too. Row negation and column permutation keep it Hadamard.
    """
    Q = _jacobsthal(q)
    n = q + 1
    H = torch.eye(n, dtype=torch.float64)
    H[0, 1:] += 1
    H[1:, 0] -= 1
    H[1:, 1:] += Q
    reflect = [0] + [1 + ((-j) % q) for j in range(q)]
    H = H[:, reflect]
    H[0] = -H[0]
    return H


def _paley2(q: int) -> torch.Tensor:
    """Order 2(q + 1) for a prime q ≡ 1 (mod 4); symmetric because the conference matrix is."""
    Q = _jacobsthal(q)
    C = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    C[0, 1:] = 1
    C[1:, 0] = 1
    C[1:, 1:] = Q
    A = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    B = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(C, A) + torch.kron(torch.eye(q + 1, dtype=torch.float64), B)


def _sylvester(n: int) -> torch.Tensor:
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


@functools.lru_cache(maxsize=None)
def small_hadamard_orders() -> dict[int, str]:
    """Orders with a built-in (non-power-of-two) construction, mapped to the construction's name."""
    orders: dict[int, str] = {}
    for q in range(3, _MAX_SMALL_ORDER):
        if not _is_prime(q):
            continue
        if q % 4 == 3 and q + 1 <= _MAX_SMALL_ORDER:
            orders.setdefault(q + 1, f"paley1(q={q})")
        if q % 4 == 1 and 2 * (q + 1) <= _MAX_SMALL_ORDER:
            orders.setdefault(2 * (q + 1), f"paley2(q={q})")
    return {m: orders[m] for m in sorted(orders) if m & (m - 1)}  # powers of two come from Sylvester


@functools.lru_cache(maxsize=None)
def _small_matrix(m: int) -> torch.Tensor:
    if m & (m - 1) == 0:
        return _sylvester(m)
    construction = small_hadamard_orders()[m]
    q = int(construction.split("q=")[1].rstrip(")"))
    return _paley1_symmetric(q) if construction.startswith("paley1") else _paley2(q)


def hadamard_factors(n: int) -> tuple[int, ...]:
    """Orders whose Kronecker product is the Hadamard matrix of size n: (m, 2^a, 2^b, …), every 2^a ≤ 128.

    Raises ValueError naming n when no construction is known.
    """
    if n < 1:
        raise RobuqError(f"Hadamard size must be positive, got {n}")
    power = n & -n
    odd = n // power
    m = 1
    if odd > 1:
        for candidate in small_hadamard_orders():
            if candidate % odd == 0 and n % candidate == 0 and (n // candidate) & (n // candidate - 1) == 0:
                m = candidate
                break
        else:
            raise RobuqError(
                f"no Hadamard matrix of size {n} is available: {n} = {odd}·{power}, and robuq knows no Hadamard "
                f"matrix of order {odd}·2^j dividing it (built-in orders: powers of two times one of "
                f"{', '.join(map(str, list(small_hadamard_orders())[:12]))}, …). Turn the Hadamard transform off "
                "for this layer, or pad its input to a supported size."
            )
    log_rest = (n // m).bit_length() - 1
    blocks = -(-log_rest // (_MAX_BLOCK.bit_length() - 1)) if log_rest else 0
    # Balanced split, largest block last: the last axis is contiguous, where a matmul is cheapest.
    sizes = sorted(log_rest // blocks + (i < log_rest % blocks) for i in range(blocks)) if blocks else []
    factors = ([m] if m > 1 else []) + [2**k for k in sizes]
    return tuple(factors) or (1,)


def is_supported_size(n: int) -> bool:
    try:
        hadamard_factors(n)
    except ValueError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def factor_matrices(n: int) -> tuple[torch.Tensor, ...]:
    """The unnormalised ±1 factors of ``hadamard_factors(n)``, as float64 CPU tensors."""
    return tuple(_small_matrix(f) for f in hadamard_factors(n))


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense normalised n×n matrix (symmetric, orthogonal); for tests, kernels and small sizes."""
    H = torch.ones(1, 1, dtype=torch.float64)
    for h in factor_matrices(n):
        H = torch.kron(H, h)
    return (H / math.sqrt(n)).to(dtype)
