"""When and how robuq's Triton kernels run: on CUDA tensors, or on the CPU under ``TRITON_INTERPRET=1``.

Every caller keeps its PyTorch path; these functions are used only where ``enabled_for`` says so and
the shape is one the kernels handle (``hadamard_split``), so a machine without Triton or a GPU runs the
same model unchanged.

Launches turn off Triton's contraction of multiply-adds (``enable_fp_fusion=False``), as the C kernels build
with ``-ffp-contract=off``: a fused multiply-add rounds once where PyTorch rounds twice, and a value on a
level boundary can then round to the neighbouring level.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
from types import ModuleType

import torch

from robuq.core import quantizer_spec as spec
from robuq.core.hadamard_matrices import hadamard_factors, hadamard_matrix
from robuq.core.runtime import device_context
from robuq.core.errors import RobuqError

_MAX_B = 128  # columns of the (A, B) view of a token: one dense B×B product per token
# Padded rows. At AP = 64, B = 128 the operands (H_A, H_B, one token) take 112 KiB of shared memory, which fits
# an A100 (163 KiB per block) and an H100/H200 (227 KiB) but not an RTX 30/40 (sm_86/sm_89: 99 KiB): there DiT-XL's
# 4608 = 36·128 has no split that fits and takes the PyTorch path. Larger splits than this are never chosen.
_MAX_AP = 64
RULES = ("minmax", "gaussian")  # the scale rules hadamard_quantize_kernel has a branch for


@functools.lru_cache(maxsize=None)
def available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Triton's interpreter mode. Triton reads it when it is imported (its own helpers are jit functions),
    so it must be set in the environment before the process starts, as the interpreter tests do."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def enabled_for(x: torch.Tensor) -> bool:
    """Whether x's work goes to the Triton kernels: a CUDA tensor, or a CPU tensor under the interpreter."""
    return (x.is_cuda or (x.device.type == "cpu" and interpreting())) and available()


_modules: dict[bool, ModuleType] = {}


def _kernels() -> ModuleType:
    """The kernel module, loaded once per mode: ``triton.jit`` binds compiled or interpreted at import."""
    mode = interpreting()
    if mode not in _modules:
        path = os.path.join(os.path.dirname(__file__), "_triton_kernels.py")
        spec = importlib.util.spec_from_file_location(
            f"robuq.kernels._triton_kernels_{'interp' if mode else 'jit'}", path
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _modules[mode] = module
    return _modules[mode]


def on_device(x: torch.Tensor):
    """The context every launch runs in: Triton launches on the *current* CUDA device, so with x on another GPU
    (rank 1's, say, while device 0 is current) the kernel would run on the wrong GPU with x's pointers."""
    return device_context(x.device)


def _next_power_of_two(v: int) -> int:
    return 1 << max(v - 1, 0).bit_length()


def shared_memory_bytes(a: int, b: int) -> int:
    """Shared memory the Hadamard kernel's operands take for a split (A, B): H_A padded, H_B and one token, fp32."""
    ap = _next_power_of_two(max(a, 16))
    return 4 * (ap * ap + b * b + ap * b)


@functools.lru_cache(maxsize=None)
def hadamard_split(n: int, shared_limit: int | None = None) -> tuple[int, int] | None:
    """(A, B) with n = A·B, H_n = H_A ⊗ H_B and B a power of two, or None if the kernel cannot take n: the
    largest B (fewest padded rows) whose operands fit in ``shared_limit`` bytes (None: no limit but the sizes above)."""
    try:
        factors = hadamard_factors(n)
    except ValueError:
        return None
    power = math.prod(f for f in factors if f & (f - 1) == 0)
    b = min(power, _MAX_B)
    while b >= 16:  # tl.dot needs every side ≥ 16
        a = n // b
        fits = shared_limit is None or shared_memory_bytes(a, b) <= shared_limit
        if _next_power_of_two(max(a, 16)) <= _MAX_AP and fits:
            return a, b
        b //= 2
    return None


@functools.lru_cache(maxsize=None)
def _shared_limit(device: torch.device) -> int | None:
    """Shared memory one block may use on ``device`` (None on the CPU interpreter, which has no such limit)."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    return int(
        getattr(props, "shared_memory_per_block_optin", 0) or getattr(props, "shared_memory_per_block", 48 * 1024)
    )


def device_split(n: int, device: torch.device) -> tuple[int, int] | None:
    return hadamard_split(n, _shared_limit(device))


@functools.lru_cache(maxsize=None)
def _split_matrices_cpu(a: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(H_A zero-padded to AP×AP, H_Bᵀ), each normalised, so that H_A ⊗ H_B = hadamard_matrix(A·B).

    Sylvester blocks compose (H_2^a ⊗ H_2^b = H_2^(a+b)), so any split of the power-of-two part is exact.
    """
    ap = _next_power_of_two(max(a, 16))
    ha = torch.zeros(ap, ap)
    ha[:a, :a] = hadamard_matrix(a)
    return ha, hadamard_matrix(b).t().contiguous()


def can_hadamard(x: torch.Tensor) -> bool:
    """Whether ``hadamard``/``hadamard_quantize`` take x: kernels enabled, fp32/fp16/bf16, a size they split."""
    return enabled_for(x) and x.dtype in _KERNEL_DTYPES and device_split(x.shape[-1], x.device) is not None


_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # computed in fp32; fp64 stays on PyTorch's path
_device_matrices: dict[tuple[int, int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def _split_matrices(a: int, b: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    key = (a, b, device)
    if key not in _device_matrices:
        _device_matrices[key] = tuple(m.to(device) for m in _split_matrices_cpu(a, b))
    return _device_matrices[key]


def _launch_hadamard(
    x: torch.Tensor,
    signs: torch.Tensor | None,
    inverse: bool,
    store_y: bool,
    quant: tuple[int, str, torch.Tensor | None] | None,
):
    n = x.shape[-1]
    a, b = device_split(n, x.device)
    ha, hb_t = _split_matrices(a, b, x.device)
    rows = x.reshape(-1, n)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    count = rows.shape[0]
    y = torch.empty_like(rows) if store_y else rows  # rows: a placeholder pointer, never written
    bits, rule, ratio = quant if quant is not None else (8, "minmax", None)  # placeholders when not quantizing
    rule_id = spec.check_rule(rule, RULES, "robuq's Triton kernels (robuq/kernels/_triton_kernels.py)")
    top = spec.level_range(spec.check_bits(bits))[1]
    levels = torch.empty(count, n, dtype=torch.int8, device=x.device) if quant else rows
    scale = torch.empty(count, dtype=torch.float32, device=x.device)
    offset = torch.empty(count, dtype=torch.float32, device=x.device)
    signs_arg = signs.to(device=x.device, dtype=torch.float32).contiguous() if signs is not None else scale
    ratio_arg = ratio.detach().reshape(1).float() if ratio is not None else scale
    kernels = _kernels()
    if count:
        with on_device(x):
            kernels.hadamard_quantize_kernel[(count,)](
                rows,
                signs_arg,
                ha,
                hb_t,
                y,
                levels,
                scale,
                offset,
                ratio_arg,
                a,
                n,
                rows.stride(0),
                y.stride(0),
                levels.stride(0),
                spec.gaussian_optimal_step(bits),
                top,
                spec.int8_level_shift(bits),
                AP=ha.shape[0],
                B=b,
                SIGNS=0 if signs is None else (2 if inverse else 1),
                STORE_Y=store_y,
                QUANT=quant is not None,
                enable_fp_fusion=False,
                RULE=rule_id,
                HAS_RATIO=ratio is not None,
            )
    return y, levels, scale, offset


def hadamard(x: torch.Tensor, signs: torch.Tensor | None = None, inverse: bool = False) -> torch.Tensor:
    """``robuq.quant.hadamard``'s transform (no autograd) through the kernel; n must pass ``hadamard_split``."""
    y = _launch_hadamard(x, signs, inverse, store_y=True, quant=None)[0]
    return y.reshape(x.shape)


def hadamard_quantize(
    x: torch.Tensor,
    signs: torch.Tensor | None,
    bits: int,
    rule: str,
    clip_ratio: torch.Tensor | None,
    store_rotated: bool = False,
):
    """(rotated x or None, int8 levels (tokens, n), scale (tokens,), offset (tokens,)) in one pass.

    Levels follow the integer path's convention: 0 … 2^b − 1, shifted down by 128 at 8 bits to fit int8.
    A rule outside ``RULES`` or bits outside 1…8 are a ValueError, never another rule's numbers.
    """
    y, levels, scale, offset = _launch_hadamard(x, signs, False, store_rotated, (bits, rule, clip_ratio))
    return (y if store_rotated else None), levels, scale, offset


def pack_ternary_columns(levels_t: torch.Tensor) -> torch.Tensor:
    """Ternary levels (K, N) → the matmul kernel's layout (K/4, N) uint8: field p of byte k is row p·K/4 + k."""
    k = levels_t.shape[0]
    if k % 4:
        raise RobuqError(f"packed ternary weights need K divisible by 4, got K={k}")
    codes = (levels_t.to(torch.int16) + 1).to(torch.uint8).reshape(4, k // 4, -1)
    return codes[0] | (codes[1] << 2) | (codes[2] << 4) | (codes[3] << 6)


def lowbit_matmul(
    levels: torch.Tensor,
    weight: torch.Tensor,
    packed: bool,
    scale: torch.Tensor,
    offset: torch.Tensor,
    alpha: torch.Tensor,
    level_sums_alpha: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """s·(q Lᵀ)·α + o·(ΣL·α) + b with int32 accumulation; ``weight`` is (K, N) int8 or, if ``packed``, (K/4, N)."""
    m, k = levels.shape
    n = weight.shape[1]
    out = torch.empty(m, n, dtype=torch.float32, device=levels.device)
    block = 64
    grid = (-(-m // block), -(-n // block))
    if m and n:
        with on_device(levels):
            _kernels().lowbit_matmul_kernel[grid](
                levels,
                weight,
                out,
                scale,
                offset,
                alpha,
                level_sums_alpha,
                bias if bias is not None else alpha,
                m,
                n,
                k,
                levels.stride(0),
                weight.stride(0),
                out.stride(0),
                BM=block,
                BN=block,
                BK=block,
                PACKED=packed,
                HAS_BIAS=bias is not None,
                enable_fp_fusion=False,
            )
    return out
