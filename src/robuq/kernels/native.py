"""robuq's CPU kernels (cpu_kernels.c): built with the system C compiler at first use, called via ctypes.

The build is cached per source, compiler, flags and machine under ``$ROBUQ_CACHE`` (default
``~/.cache/robuq``); without a compiler, or with ``ROBUQ_NATIVE=0`` (see ``use``), every caller keeps
its PyTorch path, which computes the same numbers more slowly. ``ROBUQ_MARCH`` (read once, at the first
build) replaces ``-march=native``: ``ROBUQ_MARCH=haswell`` builds for AVX2 alone, as an AVX2-only CPU would. Callers route float32 CPU tensors here
(``takes``); every function converts its inputs to contiguous float32 CPU tensors before handing
pointers to C, and allocates its outputs as such, whatever PyTorch's default dtype and device.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import dataclasses
import functools
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from robuq.core import quantizer_spec as spec
from robuq.core.hadamard_matrices import hadamard_factors, hadamard_matrix
from robuq.core.errors import RobuqError

SOURCE = Path(__file__).with_name("cpu_kernels.c")  # includes the kernel families in c/: one translation unit
FAMILIES = Path(__file__).with_name("c")
# -ffp-contract=off: no fused multiply-adds, so scales, offsets and levels round as PyTorch's do;
# -fno-trapping-math lets rintf vectorize (no program here traps on floating-point exceptions).
FLAGS = [
    "-O3",
    "-march=native",
    "-ffp-contract=off",
    "-fno-trapping-math",
    "-fno-math-errno",
    "-fopenmp",
    "-shared",
    "-fPIC",
    "-std=c11",
    "-Wall",
    "-Werror=implicit-function-declaration",
]
RULES = ("minmax", "gaussian")  # the scale rules cpu_kernels.c has a branch for
# These return 0, or −1: out of memory.
_ALLOCATING = (
    "robuq_hadamard",
    "robuq_hadamard_quantize",
    "robuq_attention_int8",
    "robuq_gemm_s8",
    "robuq_gemm_ternary",
    "robuq_linear_ternary",
)
_BAD_ARGUMENT = -2  # cpu_kernels.c's answer to a rule or level range it does not implement
# The AVX2 GEMM's weight packing: blocks of GEMM_PACK_COLUMNS columns (one register of int32 lanes), each
# column's GEMM_PACK_DEPTH consecutive k side by side (the bytes one vpmaddubsw lane pair multiplies).
GEMM_PACK_COLUMNS, GEMM_PACK_DEPTH = 8, 4
# The ternary lookup GEMM (robuq_gemm_ternary): groups of TERNARY_GROUP consecutive k, whose weight pattern
# up to sign is one of TERNARY_PATTERNS (slot 0 all-zero; every other pattern's first nonzero is +1), in
# blocks of TERNARY_COLUMNS columns (one register of bytes); activation levels up to TERNARY_MAX_TOP (4 bits).
# A build with AVX-512 VBMI looks up whole patterns by number instead, in blocks of TERNARY_WIDE_COLUMNS
# (``ternary_columns`` says which layout the built library reads).
TERNARY_GROUP, TERNARY_COLUMNS, TERNARY_WIDE_COLUMNS, TERNARY_MAX_TOP = 3, 32, 64, 15
TERNARY_PATTERNS = (
    (0, 0, 0),
    *((1, b, c) for b in (-1, 0, 1) for c in (-1, 0, 1)),
    *((0, 1, c) for c in (-1, 0, 1)),
    (0, 0, 1),
)


def definitions() -> list[str]:
    """The quantizer's constants as the C compiler's -D flags: cpu_kernels.c keeps no copy of its own."""
    rules = [f"-DRULE_{name.upper()}={rule_id}" for name, rule_id in spec.SCALE_RULES.items()]
    # repr: the shortest decimal that reads back as the same double; the f suffix rounds it to float as
    # PyTorch rounds the Python scalar when it clamps a float32 tensor.
    return [
        *rules,
        f"-DSCALE_EPS={spec.SCALE_EPS!r}f",
        f"-DPROBABILITY_SCALE_EPS={spec.PROBABILITY_SCALE_EPS!r}f",
        f"-DGEMM_PACK_COLUMNS={GEMM_PACK_COLUMNS}",
        f"-DGEMM_PACK_DEPTH={GEMM_PACK_DEPTH}",
        f"-DTERNARY_GROUP={TERNARY_GROUP}",
        f"-DTERNARY_COLUMNS={TERNARY_COLUMNS}",
        f"-DTERNARY_WIDE_COLUMNS={TERNARY_WIDE_COLUMNS}",
        f"-DTERNARY_MAX_TOP={TERNARY_MAX_TOP}",
        *(
            f"-DTERNARY_PATTERN_{name}={{{','.join(str(p[i]) for p in TERNARY_PATTERNS)}}}"
            for i, name in enumerate(("FIRST", "SECOND", "THIRD"))
        ),
        f"-DMIX12_PLAN={{{','.join(str(code) for code in _mix12_plan())}}}",
    ]


def _mix12_plan() -> list[int]:
    """H_12 as cpu_kernels.c's mix12_tile adds it up: per output row and triple of columns, the sign of the
    triple's first entry (4 if negative) plus the signs of the other two relative to it (2: the second's
    flipped, 1: the third's), row by row."""
    h = hadamard_matrix(12, torch.float64)
    plan = []
    for row in h.sign().to(torch.int64).tolist():
        for g in range(4):
            a, b, c = row[3 * g : 3 * g + 3]
            plan.append(4 * (a < 0) + 2 * (b * a < 0) + (c * a < 0))
    return plan


# Pointer arguments go to C as plain addresses (c_void_p takes the int of data_ptr() as it is): a typed
# pointer cost a ctypes.cast per argument, some 1,400 per exported DiT-S/2 forward (a few ms of Python).
# The type names still say what the C side reads there.
class _Strides(ctypes.Structure):
    """strides_t: where a (batch, heads, tokens, d) tensor's rows start, in floats."""

    _fields_ = [("batch", ctypes.c_int64), ("head", ctypes.c_int64), ("token", ctypes.c_int64)]


_TYPES = {
    "f32*": ctypes.c_void_p,
    "i8*": ctypes.c_void_p,
    "i32*": ctypes.c_void_p,
    "i64": ctypes.c_int64,
    "i32": ctypes.c_int32,
    "int": ctypes.c_int,
    "float": ctypes.c_float,
    "strides": _Strides,
}

# Each exported function's parameters, named and typed as in its C prototype (a test compares the two):
# the one place the ctypes layer learns an argument's position. Calls name their arguments (``_call``).
_SIGNATURES = {
    "robuq_hadamard": "x:f32* y:f32* rows:i64 n:i64 m:i64 hm:f32* signs:f32* inverse:int threads:int",
    "robuq_hadamard_quantize": "x:f32* y:f32* levels:i8* scale:f32* offset:f32* rows:i64 n:i64 m:i64 hm:f32* "
    "signs:f32* levels_top:int rule:int step_factor:float ratio:float shift:int down:f32* "
    "rank:i64 branch:f32* threads:int",
    "robuq_rescale": "acc:i32* y:f32* rows:i64 cols:i64 s:f32* o:f32* alpha:f32* w:f32* bias:f32* branch:f32* "
    "up:f32* rank:i64 gelu:int threads:int",
    "robuq_gelu_tanh": "x:f32* y:f32* n:i64 threads:int",
    "robuq_layer_norm_modulate": "x:f32* shift:f32* scale:f32* y:f32* rows:i64 tokens:i64 n:i64 eps:float threads:int",
    "robuq_gated_residual": "x:f32* gate:f32* y:f32* out:f32* rows:i64 tokens:i64 n:i64 threads:int",
    "robuq_attention_int8": "q:f32* qs:strides k:f32* kst:strides v:f32* vst:strides batch:i64 heads:i64 nq:i64 "
    "nk:i64 d:i64 levels_top:int probs_top:int shift:int inv_sqrt_d:float out:f32* threads:int",
    "robuq_gemm_s8": "a:i8* shift:i32 packed:i8* out:i32* m:i64 k:i64 n:i64 col_sums:i32* flush:i64 threads:int",
    "robuq_gemm_ternary": "a:i8* top:i32 code:i8* out:i32* m:i64 k:i64 n:i64 col_sums:i32* threads:int",
    "robuq_linear_ternary": "x:f32* rows:i64 k:i64 m:i64 hm:f32* signs:f32* levels_top:int rule:int step_factor:float "
    "ratio:float down:f32* rank:i64 code:i8* n:i64 col_sums:i32* alpha:f32* w:f32* bias:f32* "
    "up:f32* gelu:int y:f32* threads:int",
    "robuq_integer_isa": "",
    "robuq_ternary_columns": "",
}
_RETURNING = (*_ALLOCATING, "robuq_integer_isa", "robuq_ternary_columns")  # the others return nothing


def _parameters(name: str) -> list[tuple[str, str]]:
    """(parameter, type) pairs of an exported function, in order."""
    return [tuple(item.split(":")) for item in _SIGNATURES[name].split()]


@functools.lru_cache(maxsize=None)
def _order(name: str) -> tuple[str, ...]:
    return tuple(parameter for parameter, _ in _parameters(name))


def _call(name: str, **arguments):
    """Call an exported function with its arguments by name (``threads`` defaults to PyTorch's thread count);
    a name missing or unknown is a TypeError here, not a wrong pointer in C."""
    order = _order(name)
    if "threads" not in arguments and "threads" in order:
        arguments["threads"] = _threads()
    try:
        values = [arguments[parameter] for parameter in order]
    except KeyError:
        values = None
    if values is None or len(arguments) != len(order):
        missing, unknown = set(order) - arguments.keys(), arguments.keys() - set(order)
        raise TypeError(f"{name}: missing {sorted(missing)}, unknown {sorted(unknown)}")
    return getattr(_library(), name)(*values)


def cache_directory() -> Path:
    """Where built libraries (and what is measured of them) are kept: ``$ROBUQ_CACHE/kernels``."""
    return Path(os.environ.get("ROBUQ_CACHE", Path.home() / ".cache" / "robuq")) / "kernels"


def build_identity() -> str:
    """The built library's file name (a hash of its sources, flags, compiler and CPU), "none" without one."""
    library = _library()
    return "none" if library is None else Path(library._name).name


def _cpu_identity() -> str:
    """What -march=native compiles for: a cache shared between different CPUs must not mix their builds."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    return "\n".join(sorted({line for line in info.splitlines() if line.startswith(("model name", "flags"))}))


def _build(compiler: str, flags: list[str] | None = None) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    flags = [*(FLAGS if flags is None else flags), *definitions()]
    sources = [SOURCE.read_text(), *(f.read_text() for f in sorted(FAMILIES.iterdir()) if f.suffix in (".c", ".h"))]
    key = hashlib.sha256(
        "\0".join([*sources, " ".join(flags), version, platform.machine(), _cpu_identity()]).encode()
    ).hexdigest()[:16]
    target = cache_directory() / f"cpu_kernels-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        subprocess.run(
            [compiler, *flags, str(SOURCE), "-o", str(built), "-lm"], check=True, capture_output=True, text=True
        )
        os.replace(built, target)  # atomic: a concurrent process sees the whole library or none
    return target


def _flags_for(march: str) -> list[str]:
    """FLAGS for another target than this CPU (``-march=haswell``: AVX2 and FMA, no AVX-512)."""
    if not march.replace("-", "").replace("_", "").isalnum():
        raise RobuqError(f"ROBUQ_MARCH={march!r} is not a -march value; use e.g. native or haswell")
    # AVX2 builds pass 64-byte lane vectors between inlined helpers; GCC's note about their ABI is moot.
    extra = [] if march == "native" else ["-Wno-psabi"]
    return [f"-march={march}" if flag == "-march=native" else flag for flag in FLAGS] + extra


@functools.lru_cache(maxsize=None)
def _library() -> ctypes.CDLL | None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        warnings.warn("robuq: no C compiler found, so the CPU kernels fall back to slower PyTorch code")
        return None
    try:
        library = ctypes.CDLL(str(_build(compiler, _flags_for(os.environ.get("ROBUQ_MARCH", "native")))))
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", "") or error
        warnings.warn(f"robuq: building the CPU kernels failed, falling back to PyTorch code: {detail}")
        return None
    for name in _SIGNATURES:
        getattr(library, name).argtypes = [_TYPES[kind] for _, kind in _parameters(name)]
        getattr(library, name).restype = ctypes.c_int if name in _RETURNING else None
    return library


# ROBUQ_NATIVE=0 in the environment turns the kernels off for the whole process (read once, at import);
# ``use`` turns them on or off for a block of code, in the calling thread or task only.
_ENV_ENABLED = os.environ.get("ROBUQ_NATIVE", "1") != "0"
_enabled_here: contextvars.ContextVar[bool | None] = contextvars.ContextVar("robuq_native", default=None)


def enabled() -> bool:
    """Whether the kernels run: ``use``'s setting where one is in force, else ``ROBUQ_NATIVE``; and they built."""
    wanted = _enabled_here.get()
    return (_ENV_ENABLED if wanted is None else wanted) and _library() is not None


def takes(*tensors: torch.Tensor) -> bool:
    """Whether the kernels take these: float32 CPU tensors (any strides), kernels enabled."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors) and enabled()


@contextlib.contextmanager
def use(enabled: bool) -> Iterator[None]:
    """Run the enclosed code with robuq's C kernels on or off, in this thread (or asyncio task) only."""
    token = _enabled_here.set(enabled)
    try:
        yield
    finally:
        _enabled_here.reset(token)


@functools.lru_cache(maxsize=None)
def _mix_matrix(n: int) -> tuple[int, torch.Tensor]:
    """(m, H_m/√n): the dense factor of the (m, p) layout; the FWHT leaves its 1/√p to this matrix."""
    factors = hadamard_factors(n)
    m = factors[0] if factors[0] & (factors[0] - 1) else 1
    return m, (hadamard_matrix(m, torch.float64) * math.sqrt(m) / math.sqrt(n)).to(
        device="cpu", dtype=torch.float32
    ).contiguous()


# torch.compile must not trace into a call of the library: it would hand C the addresses of the fake tensors it
# traces with, and the kernels have no backward for it to differentiate. Every function below that calls C
# runs as it is, between compiled graphs (about half a microsecond a call in eager code).
_outside_compiled_graphs = torch.compiler.disable


def _ptr(t: torch.Tensor | None) -> int | None:
    """t's address for a pointer argument (_SIGNATURES says what element type the C side reads there)."""
    return None if t is None else t.data_ptr()


def _threads() -> int:
    return torch.get_num_threads()


def _input(x: torch.Tensor) -> torch.Tensor:
    return x.to(device="cpu", dtype=torch.float32).contiguous()


def _empty(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="cpu")


def _check(status: int, what: str = "") -> None:
    if status == _BAD_ARGUMENT:
        raise RobuqError(f"robuq's CPU kernels refused {what}: a rule or level range cpu_kernels.c does not implement")
    if status:
        raise MemoryError("robuq's CPU kernels could not allocate their working memory")


def _levels_top(bits: int, what: str) -> int:
    """The largest level of ``bits``-bit activations, after checking the bit width."""
    return spec.level_range(spec.check_bits(bits, what))[1]


@_outside_compiled_graphs
def hadamard(x: torch.Tensor, signs: torch.Tensor | None, inverse: bool) -> torch.Tensor:
    """The normalised transform of ``robuq.quant.hadamard`` on the last axis (no autograd)."""
    n = x.shape[-1]
    m, hm = _mix_matrix(n)
    rows = _input(x.reshape(-1, n))
    y = _empty(*rows.shape)
    signs = None if signs is None else _input(signs)
    _check(
        _call(
            "robuq_hadamard",
            x=_ptr(rows),
            y=_ptr(y),
            rows=rows.shape[0],
            n=n,
            m=m,
            hm=_ptr(hm),
            signs=_ptr(signs),
            inverse=int(inverse),
        )
    )
    return y.reshape(x.shape)


@_outside_compiled_graphs
def hadamard_quantize(
    x: torch.Tensor,
    signs: torch.Tensor | None,
    rotate: bool,
    bits: int,
    rule: str,
    clip_ratio: torch.Tensor | None,
    keep_rotated: bool,
    down: torch.Tensor | None = None,
):
    """(rotated rows or None, int8 levels − shift, scale (rows, 1), offset (rows, 1), branch or None) of x's
    rows in one pass (shift: ``int8_level_shift(bits)``); branch = (rotated rows)·downᵀ, (rows, rank), when
    ``down`` (rank, n) is given. A rule outside ``RULES`` or bits outside 1…8 are a ValueError, never
    another rule's numbers."""
    rule_id = spec.check_rule(rule, RULES, "robuq's C kernels (robuq/kernels/cpu_kernels.c)")
    top = _levels_top(bits, "activation bits")
    n = x.shape[-1]
    rows = _input(x.reshape(-1, n))
    count = rows.shape[0]
    m, hm = _mix_matrix(n) if rotate else (1, None)
    y = _empty(count, n) if keep_rotated else None
    levels = _empty(count, n, dtype=torch.int8)
    scale, offset = _empty(count, 1), _empty(count, 1)
    signs = None if signs is None or not rotate else _input(signs)
    ratio = 1.0 if clip_ratio is None else float(clip_ratio)
    rank = 0 if down is None else down.shape[0]
    down = None if down is None else _input(down)
    branch = None if down is None else _empty(count, rank)
    _check(
        _call(
            "robuq_hadamard_quantize",
            x=_ptr(rows),
            y=_ptr(y),
            levels=_ptr(levels),
            scale=_ptr(scale),
            offset=_ptr(offset),
            rows=count,
            n=n,
            m=m,
            hm=_ptr(hm),
            signs=_ptr(signs),
            levels_top=top,
            rule=rule_id,
            step_factor=spec.gaussian_optimal_step(bits),
            ratio=ratio,
            shift=spec.int8_level_shift(bits),
            down=_ptr(down),
            rank=rank,
            branch=_ptr(branch),
        ),
        f"rule {rule!r} at {bits} bits",
    )
    return y, levels, scale, offset, branch


@_outside_compiled_graphs
def rescale(
    acc: torch.Tensor,
    out: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    alpha: torch.Tensor,
    offset_weight: torch.Tensor,
    bias: torch.Tensor,
    branch: torch.Tensor | None = None,
    up_rows: torch.Tensor | None = None,
    gelu: bool = False,
) -> torch.Tensor:
    """out = acc·scale·α + offset·w + b [+ branch·up_rows] [then tanh-GELU] in one pass (acc int32 (rows, cols);
    scale, offset per row; α, w, b per column; branch (rows, rank), up_rows (rank, cols)); ``out`` must be a
    contiguous float32 CPU tensor."""
    if not (out.is_contiguous() and out.dtype == torch.float32 and out.device.type == "cpu"):
        raise RobuqError("rescale writes into a contiguous float32 CPU tensor")
    rows, cols = acc.shape
    acc = acc.to(device="cpu", dtype=torch.int32).contiguous()
    scale, offset, alpha, offset_weight, bias = (_input(t) for t in (scale, offset, alpha, offset_weight, bias))
    rank = 0 if branch is None else branch.shape[1]
    branch, up_rows = (None, None) if branch is None else (_input(branch), _input(up_rows))
    _call(
        "robuq_rescale",
        acc=_ptr(acc),
        y=_ptr(out),
        rows=rows,
        cols=cols,
        s=_ptr(scale),
        o=_ptr(offset),
        alpha=_ptr(alpha),
        w=_ptr(offset_weight),
        bias=_ptr(bias),
        branch=_ptr(branch),
        up=_ptr(up_rows),
        rank=rank,
        gelu=int(gelu),
    )
    return out


@_outside_compiled_graphs
def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """``F.gelu(x, approximate="tanh")`` (no autograd), about 1e-7 relative from PyTorch's."""
    x = _input(x)
    y = _empty(*x.shape)
    _call("robuq_gelu_tanh", x=_ptr(x), y=_ptr(y), n=x.numel())
    return y


def _per_sample(x: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x as (batch, tokens, n) rows and v, one n-vector per sample, both contiguous float32 CPU."""
    batch, n = v.shape
    if x.dim() != 3 or x.shape[0] != batch or x.shape[2] != n:
        raise RobuqError(f"per-sample vectors of shape {tuple(v.shape)} do not fit tokens of shape {tuple(x.shape)}")
    return _input(x), _input(v)


@_outside_compiled_graphs
def layer_norm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """``modulate(F.layer_norm(x, (n,), eps=eps), shift, scale)`` in one pass, x (batch, tokens, n), shift and
    scale (batch, n); no autograd."""
    _, scale = _per_sample(x, scale)
    x, shift = _per_sample(x, shift)
    y = _empty(*x.shape)
    _call(
        "robuq_layer_norm_modulate",
        x=_ptr(x),
        shift=_ptr(shift),
        scale=_ptr(scale),
        y=_ptr(y),
        rows=x.shape[0] * x.shape[1],
        tokens=x.shape[1],
        n=x.shape[2],
        eps=eps,
    )
    return y


@_outside_compiled_graphs
def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x + gate.unsqueeze(1) * y`` in one pass, x and y (batch, tokens, n), gate (batch, n); no autograd."""
    x, gate = _per_sample(x, gate)
    y = _input(y)
    if y.shape != x.shape:
        raise RobuqError(f"residual branch of shape {tuple(y.shape)} does not match tokens of shape {tuple(x.shape)}")
    out = _empty(*x.shape)
    _call(
        "robuq_gated_residual",
        x=_ptr(x),
        gate=_ptr(gate),
        y=_ptr(y),
        out=_ptr(out),
        rows=x.shape[0] * x.shape[1],
        tokens=x.shape[1],
        n=x.shape[2],
    )
    return out


def _head_rows(x: torch.Tensor) -> tuple[torch.Tensor, _Strides]:
    """x as float32 CPU with contiguous channels (the strided q, k, v views of qkv stay uncopied)."""
    x = x.to(device="cpu", dtype=torch.float32)
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x, _Strides(*x.stride()[:3])


@_outside_compiled_graphs
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bits: int, probs_bits: int) -> torch.Tensor:
    """softmax(Q̂K̂ᵀ/√d)̂ V̂ for (batch, heads, tokens, d) inputs in one fused pass, the two matmuls on
    integer levels with exact int32 sums (Q, K per token, V per channel, probabilities per row from 0 to
    its maximum, as ``QuantAttentionCore``). The result is a (batch, heads, tokens, d) view of a
    (batch, tokens, heads, d) tensor, so the caller's transpose back to tokens is free."""
    top, probs_top = _levels_top(bits, "attention bits"), _levels_top(probs_bits, "attention probability bits")
    batch, heads, nq, d = q.shape
    nk = k.shape[2]
    (q, qs), (k, ks), (v, vs) = (_head_rows(t) for t in (q, k, v))
    out = _empty(batch, nq, heads, d)
    _check(
        _call(
            "robuq_attention_int8",
            q=_ptr(q),
            qs=qs,
            k=_ptr(k),
            kst=ks,
            v=_ptr(v),
            vst=vs,
            batch=batch,
            heads=heads,
            nq=nq,
            nk=nk,
            d=d,
            levels_top=top,
            probs_top=probs_top,
            shift=spec.int8_level_shift(bits),
            inv_sqrt_d=1.0 / math.sqrt(d),
            out=_ptr(out),
        ),
        f"{bits}-bit attention with {probs_bits}-bit probabilities",
    )
    return out.transpose(1, 2)


INTEGER_ISAS = ("plain", "avx2", "avx512_vnni")


def integer_isa() -> str:
    """What the built integer kernels use: "avx512_vnni" (the attention's dot products; the GEMM is AVX2),
    "avx2", "plain" C, or "none" when the kernels are off or unbuilt."""
    return INTEGER_ISAS[_call("robuq_integer_isa")] if enabled() else "none"


def pack_gemm_weights(b: torch.Tensor) -> torch.Tensor:
    """b (k, n) int8 in the AVX2 GEMM's layout: (⌈n/8⌉, ⌈k/4⌉, 8, 4), zero-padded (see GEMM_PACK_COLUMNS)."""
    k, n = b.shape
    depth, columns = GEMM_PACK_DEPTH, GEMM_PACK_COLUMNS
    padded = torch.zeros(-(-k // depth) * depth, -(-n // columns) * columns, dtype=torch.int8, device=b.device)
    padded[:k, :n] = b
    blocks = padded.reshape(padded.shape[0] // depth, depth, padded.shape[1] // columns, columns)
    return blocks.permute(2, 0, 3, 1).contiguous()


def unpack_gemm_weights(packed: torch.Tensor, k: int, n: int) -> torch.Tensor:
    """The int8 (k, n) matrix that ``pack_gemm_weights`` packed."""
    blocks, quads = packed.shape[:2]
    return packed.permute(1, 3, 0, 2).reshape(quads * GEMM_PACK_DEPTH, blocks * GEMM_PACK_COLUMNS)[:k, :n].contiguous()


@_outside_compiled_graphs
def gemm_s8(
    a: torch.Tensor, packed: torch.Tensor, n: int, col_sums: torch.Tensor, shift: int, flush: int
) -> torch.Tensor:
    """a (m, k) int8 · b (k, n) int8 → int32, exactly ``torch._int_mm(a, b)``, by robuq's AVX2 kernel, with
    b given as ``pack_gemm_weights(b)`` and its int32 column sums.

    a's levels must be u − ``shift`` with u in 0…top: ``shift`` 0 (a ≥ 0, read in place) or 128 (any int8);
    ``flush``: how many quads of int16 pair sums may add up before they are widened, 32767 // (2·top·max|b|),
    at least 1 (so max|b| ≤ 64)."""
    m, k = a.shape
    if (
        a.dtype != torch.int8
        or packed.dtype != torch.int8
        or flush < 1
        or shift not in (0, 128)
        or packed.shape != (-(-n // GEMM_PACK_COLUMNS), -(-k // GEMM_PACK_DEPTH), GEMM_PACK_COLUMNS, GEMM_PACK_DEPTH)
    ):
        raise RobuqError(
            "gemm_s8 multiplies int8 (m, k) by pack_gemm_weights of an int8 (k, n) with max|b| ≤ 64, shift 0 or 128"
        )
    a, packed = a.contiguous(), packed.contiguous()
    col_sums = col_sums.to(torch.int32).contiguous()
    out = _empty(m, n, dtype=torch.int32)
    _check(
        _call(
            "robuq_gemm_s8",
            a=_ptr(a),
            shift=shift,
            packed=_ptr(packed),
            out=_ptr(out),
            m=m,
            k=k,
            n=n,
            col_sums=_ptr(col_sums),
            flush=flush,
        )
    )
    return out


def _slot_table(device: torch.device) -> torch.Tensor:
    """Slot of each canonical pattern by its base-3 number Σ (w_i + 1)·3^(2−i) (0 for the others), int8."""
    slots = torch.zeros(27, dtype=torch.int8, device=device)
    for slot, pattern in enumerate(TERNARY_PATTERNS):
        slots[sum((w + 1) * 3 ** (2 - i) for i, w in enumerate(pattern))] = slot
    return slots


def ternary_columns() -> int:
    """Columns per block of the ternary lookup GEMM's packing in the built library: TERNARY_WIDE_COLUMNS where
    it was built with AVX-512 VBMI, else TERNARY_COLUMNS (also without a built library)."""
    library = _library()
    return TERNARY_COLUMNS if library is None else _call("robuq_ternary_columns")


def _ternary_code_shape(k: int, n: int, columns: int) -> tuple[int, ...]:
    """The shape of ``pack_ternary_weights`` of a (k, n) matrix in blocks of ``columns``: (column blocks,
    groups, 2, 32) for AVX2's slots and signs, (column blocks, groups, 64) for the wide numbers."""
    per_group = (2, TERNARY_COLUMNS) if columns == TERNARY_COLUMNS else (TERNARY_WIDE_COLUMNS,)
    return -(-n // columns), -(-k // TERNARY_GROUP), *per_group


def is_ternary_code(packed: torch.Tensor) -> bool:
    """Whether ``packed`` is in a ternary lookup layout (either width), not the multiply-add GEMM's."""
    return packed.shape[2:] in ((2, TERNARY_COLUMNS), (TERNARY_WIDE_COLUMNS,))


def _pattern_numbers(b: torch.Tensor, columns: int) -> tuple[torch.Tensor, int, int]:
    """b (k, n) zero-padded to whole groups and blocks of ``columns``, as the base-3 number of each column's
    group Σ (w_i + 1)·3^(2−i) (13: all zero), shape (groups, blocks·columns); and the blocks and groups."""
    k, n = b.shape
    blocks, groups = -(-n // columns), -(-k // TERNARY_GROUP)
    padded = torch.zeros(groups * TERNARY_GROUP, blocks * columns, dtype=torch.int8, device=b.device)
    padded[:k, :n] = b
    w = padded.reshape(groups, TERNARY_GROUP, -1).unbind(1)  # each (groups, columns)
    return (w[0] + 1) * 9 + (w[1] + 1) * 3 + (w[2] + 1), blocks, groups


def _pattern_weights(number: torch.Tensor) -> list[torch.Tensor]:
    """The three weights (each in {−1, 0, 1}) a base-3 pattern number stands for: ``_pattern_numbers`` undone."""
    return [number // 9 - 1, number // 3 % 3 - 1, number % 3 - 1]


def pack_ternary_weights(b: torch.Tensor, columns: int | None = None) -> torch.Tensor:
    """b (k, n) with levels in {−1, 0, 1} in the layout of the built ternary lookup GEMM (``columns``: None
    for ``ternary_columns()``). AVX2's: (⌈n/32⌉, ⌈k/3⌉, 2, 32) int8, per column block and group of
    TERNARY_GROUP k the columns' TERNARY_PATTERNS slots, then the signs that make their patterns canonical
    (0 for an all-zero group). The wide one: (⌈n/64⌉, ⌈k/3⌉, 64), each column's pattern number, plus 32 in
    odd groups (their half of a table pair). Zero-padded; computed in int8 (a model's peak memory while it
    loads includes these temporaries)."""
    if b.numel() and (b.min() < -1 or b.max() > 1):
        raise RobuqError("pack_ternary_weights takes levels in {-1, 0, 1}")
    columns = ternary_columns() if columns is None else columns
    number, blocks, groups = _pattern_numbers(b, columns)
    if columns == TERNARY_WIDE_COLUMNS:
        odd = (torch.arange(groups, device=b.device) % 2 * 32).to(torch.int8)[:, None]
        return (number + odd).reshape(groups, blocks, columns).permute(1, 0, 2).contiguous()
    digits = _pattern_weights(number)
    sign = torch.where(digits[0] != 0, digits[0], torch.where(digits[1] != 0, digits[1], digits[2]))
    canonical = (digits[0] * sign + 1) * 9 + (digits[1] * sign + 1) * 3 + (digits[2] * sign + 1)
    code = torch.stack([_slot_table(b.device)[canonical.long()], sign], dim=1)  # (groups, 2, columns)
    return code.reshape(groups, 2, blocks, columns).permute(2, 0, 1, 3).contiguous()


def unpack_ternary_weights(code: torch.Tensor, k: int, n: int) -> torch.Tensor:
    """The int8 (k, n) matrix that ``pack_ternary_weights`` packed, in either layout."""
    if code.dim() == 3:  # the wide numbers
        weights = torch.stack(_pattern_weights(code % 32), dim=-1)  # (blocks, groups, 64, 3)
    else:
        table = torch.tensor(TERNARY_PATTERNS, dtype=torch.int8, device=code.device)
        slots, signs = code[:, :, 0].long(), code[:, :, 1]  # (blocks, groups, 32)
        weights = table[slots] * signs[..., None]  # (blocks, groups, 32, 3)
    return weights.permute(1, 3, 0, 2).reshape(code.shape[1] * TERNARY_GROUP, -1)[:k, :n].contiguous()


@_outside_compiled_graphs
def gemm_ternary(a: torch.Tensor, code: torch.Tensor, n: int, col_sums: torch.Tensor, top: int) -> torch.Tensor:
    """a (m, k) int8 levels in 0…``top`` (``top`` ≤ TERNARY_MAX_TOP) · b (k, n) ternary → int32, exactly
    ``torch._int_mm(a, b)``, by the lookup kernel, with b given as ``pack_ternary_weights(b)`` and its int32
    column sums."""
    m, k = a.shape
    if (
        a.dtype != torch.int8
        or code.dtype != torch.int8
        or not 1 <= top <= TERNARY_MAX_TOP
        or code.shape != _ternary_code_shape(k, n, ternary_columns())
    ):
        raise RobuqError(
            f"gemm_ternary multiplies int8 (m, k) levels in 0…top (1 ≤ top ≤ {TERNARY_MAX_TOP}) by "
            "pack_ternary_weights of a ternary (k, n), packed for this build's layout"
        )
    a, code = a.contiguous(), code.contiguous()
    col_sums = col_sums.to(torch.int32).contiguous()
    out = _empty(m, n, dtype=torch.int32)
    _check(
        _call(
            "robuq_gemm_ternary",
            a=_ptr(a),
            top=top,
            code=_ptr(code),
            out=_ptr(out),
            m=m,
            k=k,
            n=n,
            col_sums=_ptr(col_sums),
        ),
        f"ternary GEMM with levels up to {top}",
    )
    return out


@dataclasses.dataclass(frozen=True)
class TernaryLinearArgs:
    """A ternary integer linear's arguments to ``linear_ternary`` besides its input, converted and checked once
    (``ternary_linear_args``): converting and checking its ten tensors on each of a DiT-S/2 forward's 60
    calls cost about 1 ms of Python per forward. ``arguments`` are ``robuq_linear_ternary``'s by name, all
    but the input's, the output's and the thread count; ``tensors`` keeps alive what their addresses point into."""

    in_features: int
    out_features: int
    tensors: tuple[torch.Tensor | None, ...]
    arguments: dict
    what: str


def _ternary_linear_top(k: int, n: int, bits: int, code: torch.Tensor) -> int:
    """The top activation level of a layer ``linear_ternary`` can take: low-bit levels, weights packed for
    this build's lookup."""
    top = _levels_top(bits, "activation bits")
    if (
        spec.int8_level_shift(bits)
        or top > TERNARY_MAX_TOP
        or code.dtype != torch.int8
        or code.shape != _ternary_code_shape(k, n, ternary_columns())
    ):
        raise RobuqError(
            f"linear_ternary takes activations of at most {TERNARY_MAX_TOP.bit_length()} bits and "
            "pack_ternary_weights of a ternary (k, n)"
        )
    return top


def ternary_linear_args(
    k: int,
    n: int,
    signs: torch.Tensor | None,
    rotate: bool,
    bits: int,
    rule: str,
    clip_ratio: torch.Tensor | None,
    down: torch.Tensor | None,
    code: torch.Tensor,
    col_sums: torch.Tensor,
    alpha: torch.Tensor,
    offset_weight: torch.Tensor,
    bias: torch.Tensor,
    up_rows: torch.Tensor | None,
    gelu: bool,
) -> TernaryLinearArgs:
    """``linear_ternary``'s layer of k inputs and n outputs: ``hadamard_quantize``'s rotation (signs, rotate),
    bits, rule, clip ratio and low-rank ``down`` (rank, k) or None; ``gemm_ternary``'s weights
    (``pack_ternary_weights`` of a ternary (k, n)) and column sums; ``rescale``'s α, w, b (per output
    column), ``up_rows`` (rank, n) and GELU. The activations must be low-bit (``int8_level_shift(bits)`` 0,
    top ≤ TERNARY_MAX_TOP)."""
    rule_id = spec.check_rule(rule, RULES, "robuq's C kernels (robuq/kernels/cpu_kernels.c)")
    top = _ternary_linear_top(k, n, bits, code)
    m, hm = _mix_matrix(k) if rotate else (1, None)
    signs = None if signs is None or not rotate else _input(signs)
    rank = 0 if down is None else down.shape[0]
    down, up_rows = (None, None) if down is None else (_input(down), _input(up_rows))
    code, col_sums = code.contiguous(), col_sums.to(device="cpu", dtype=torch.int32).contiguous()
    alpha, offset_weight, bias = (_input(t) for t in (alpha, offset_weight, bias))
    ratio = 1.0 if clip_ratio is None else float(clip_ratio)
    tensors = (hm, signs, down, code, col_sums, alpha, offset_weight, bias, up_rows)
    arguments = dict(
        k=k,
        m=m,
        hm=_ptr(hm),
        signs=_ptr(signs),
        levels_top=top,
        rule=rule_id,
        step_factor=spec.gaussian_optimal_step(bits),
        ratio=ratio,
        down=_ptr(down),
        rank=rank,
        code=_ptr(code),
        n=n,
        col_sums=_ptr(col_sums),
        alpha=_ptr(alpha),
        w=_ptr(offset_weight),
        bias=_ptr(bias),
        up=_ptr(up_rows),
        gelu=int(gelu),
    )
    return TernaryLinearArgs(k, n, tensors, arguments, f"rule {rule!r} at {bits} bits")


@_outside_compiled_graphs
def linear_ternary(x: torch.Tensor, layer: TernaryLinearArgs, out: torch.Tensor) -> torch.Tensor:
    """A whole ternary integer linear in one pass over blocks of rows: ``hadamard_quantize`` of x's rows (with
    the branch if the layer has one), ``gemm_ternary`` of their levels and ``rescale`` into ``out`` (rows,
    n), a contiguous float32 CPU tensor: the same numbers as those three calls."""
    rows = _input(x.reshape(-1, layer.in_features))
    if not (
        out.is_contiguous()
        and out.dtype == torch.float32
        and out.device.type == "cpu"
        and out.shape == (rows.shape[0], layer.out_features)
    ):
        raise RobuqError(
            f"linear_ternary writes into a contiguous float32 CPU tensor of shape ({rows.shape[0]}, "
            f"{layer.out_features})"
        )
    _check(_call("robuq_linear_ternary", x=_ptr(rows), rows=rows.shape[0], y=_ptr(out), **layer.arguments), layer.what)
    return out
