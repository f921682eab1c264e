"""robuq's CPU kernels (cpu_kernels.c): built with the system C compiler at first use, called via ctypes.

The build is cached per source, compiler and machine under ``$ROBUQ_CACHE`` (default
``~/.cache/robuq``); without a compiler, or with ``ROBUQ_NATIVE=0``, every caller keeps its PyTorch
path, which computes the same numbers more slowly. Only contiguous float32 CPU tensors are taken.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

from robuq.quant.activation import gaussian_optimal_step
from robuq.quant.hadamard import hadamard_factors, hadamard_matrix

SOURCE = Path(__file__).with_name("cpu_kernels.c")
# -ffp-contract=off: no fused multiply-adds, so scales, offsets and levels round as PyTorch's do;
# -fno-trapping-math lets rintf vectorize (no program here traps on floating-point exceptions).
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-trapping-math", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
RULES = {"minmax": 0, "gaussian": 1, "max": 2}

_f32, _i8, _i64, _int, _float = (ctypes.POINTER(ctypes.c_float), ctypes.POINTER(ctypes.c_int8),
                                 ctypes.c_int64, ctypes.c_int, ctypes.c_float)
_SIGNATURES = {
    "robuq_hadamard": [_f32, _f32, _i64, _i64, _i64, _f32, _f32, _int, _int],
    "robuq_hadamard_quantize": [_f32, _f32, _i8, _f32, _f32, _i64, _i64, _i64, _f32, _f32, _int, _int, _float,
                                _float, _int, _int],
    "robuq_rescale": [ctypes.POINTER(ctypes.c_int32), _f32, _i64, _i64, _f32, _f32, _f32, _f32, _f32, _int],
    "robuq_fake_quantize_rows": [_f32, _i64, _i64, _int, _int, _float, _int],
}


def _cache_dir() -> Path:
    return Path(os.environ.get("ROBUQ_CACHE", Path.home() / ".cache" / "robuq")) / "kernels"


def _build(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(FLAGS), version, platform.machine(),
                                    platform.processor()]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"cpu_kernels-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built), "-lm"], check=True, capture_output=True, text=True)
        os.replace(built, target)  # atomic: a concurrent process sees the whole library or none
    return target


@functools.lru_cache(maxsize=None)
def _library() -> ctypes.CDLL | None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        warnings.warn("robuq: no C compiler found, so the CPU kernels fall back to slower PyTorch code")
        return None
    try:
        library = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", "") or error
        warnings.warn(f"robuq: building the CPU kernels failed, falling back to PyTorch code: {detail}")
        return None
    for name, argtypes in _SIGNATURES.items():
        getattr(library, name).argtypes = argtypes
        getattr(library, name).restype = None
    return library


def enabled() -> bool:
    return os.environ.get("ROBUQ_NATIVE", "1") != "0" and _library() is not None


def takes(x: torch.Tensor) -> bool:
    """Whether the kernels take x: a float32 CPU tensor (made contiguous if it is not), kernels enabled."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and enabled()


@functools.lru_cache(maxsize=None)
def _mix_matrix(n: int) -> tuple[int, torch.Tensor]:
    """(m, H_m/√n): the dense factor of the (m, p) layout; the FWHT leaves its 1/√p to this matrix."""
    factors = hadamard_factors(n)
    m = factors[0] if factors[0] & (factors[0] - 1) else 1
    return m, (hadamard_matrix(m) * math.sqrt(m) / math.sqrt(n)).contiguous()


def _ptr(t: torch.Tensor | None, kind=_f32):
    return None if t is None else ctypes.cast(t.data_ptr(), kind)


def _threads() -> int:
    return torch.get_num_threads()


def hadamard(x: torch.Tensor, signs: torch.Tensor | None, inverse: bool) -> torch.Tensor:
    """The normalised transform of ``robuq.quant.hadamard`` on the last axis (no autograd)."""
    n = x.shape[-1]
    m, hm = _mix_matrix(n)
    rows = x.reshape(-1, n).contiguous()
    y = torch.empty_like(rows)
    signs = None if signs is None else signs.to(torch.float32).contiguous()
    _library().robuq_hadamard(_ptr(rows), _ptr(y), rows.shape[0], n, m, _ptr(hm), _ptr(signs), int(inverse), _threads())
    return y.reshape(x.shape)


def hadamard_quantize(x: torch.Tensor, signs: torch.Tensor | None, rotate: bool, bits: int, rule: str,
                      clip_ratio: torch.Tensor | None, keep_rotated: bool, shift: int):
    """(rotated rows or None, int8 levels − shift, scale (rows, 1), offset (rows, 1)) of x's rows in one pass."""
    n = x.shape[-1]
    rows = x.reshape(-1, n).contiguous()
    count = rows.shape[0]
    m, hm = _mix_matrix(n) if rotate else (1, None)
    y = torch.empty_like(rows) if keep_rotated else None
    levels = torch.empty(count, n, dtype=torch.int8)
    scale, offset = torch.empty(count, 1), torch.empty(count, 1)
    signs = None if signs is None or not rotate else signs.to(torch.float32).contiguous()
    ratio = 1.0 if clip_ratio is None else float(clip_ratio)
    _library().robuq_hadamard_quantize(
        _ptr(rows), _ptr(y), _ptr(levels, _i8), _ptr(scale), _ptr(offset), count, n, m, _ptr(hm), _ptr(signs),
        bits, RULES[rule], gaussian_optimal_step(bits), ratio, shift, _threads())
    return y, levels, scale, offset


def fake_quantize_rows_(x: torch.Tensor, bits: int, rule: str) -> torch.Tensor:
    """In place on a contiguous float32 tensor: each last-axis row → its fake-quantized values, with the
    row's own scale (``rule``: "minmax", "gaussian", or "max" — a grid from 0 to the row's maximum)."""
    if not x.is_contiguous():
        raise ValueError("fake_quantize_rows_ needs a contiguous tensor")
    _library().robuq_fake_quantize_rows(_ptr(x), x.numel() // x.shape[-1], x.shape[-1], bits, RULES[rule],
                                        gaussian_optimal_step(bits), _threads())
    return x


def rescale(acc: torch.Tensor, out: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, alpha: torch.Tensor,
            offset_weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """out = acc·scale·α + offset·w + b in one pass (acc int32 (rows, cols); scale, offset per row;
    α, w, b per column; all contiguous)."""
    rows, cols = acc.shape
    _library().robuq_rescale(_ptr(acc, ctypes.POINTER(ctypes.c_int32)), _ptr(out), rows, cols, _ptr(scale),
                             _ptr(offset), _ptr(alpha), _ptr(offset_weight), _ptr(bias), _threads())
    return out
