"""Which integer GEMM an exported model's linears run on this CPU, chosen once per process and kind of layer.

PyTorch's int8 GEMM (``torch._int_mm``) is fast where the CPU has VNNI (AVX-512 VNNI, AMX): 4–9× an fp32
matmul on this project's AMD EPYC (results/deploy_cputime.md). On a CPU with AVX2 alone it took 33× an fp32 matmul's time
(512×384 by 384×1536, measured on such a CPU), so there robuq multiplies with its own AVX2
kernels (cpu_kernels.c: ``robuq_gemm_ternary``, table lookups, for ternary weights against activations of
at most 4 bits; ``robuq_gemm_s8``, vpmaddubsw, for the rest), and without its C kernels with an fp32
matmul on the integer levels, the floor that is never slower than the float model.

Built for a CPU with AVX-512 VBMI, the lookup kernel reads 64 columns per instruction pair and may beat
``torch._int_mm`` even with VNNI. There ternary layers with low-bit activations are timed once per CPU
model, library build and level range against ``int_mm`` (``lookup_beats_int_mm``; the answer is cached on
disk beside the built library) and take robuq's kernel only where it wins: never slower than ``int_mm``.

Paths, all giving ``torch._int_mm``'s exact int32 result:

| path | what multiplies |
|---|---|
| ``int_mm`` | ``torch._int_mm`` (oneDNN; VNNI or AMX) |
| ``avx2`` | robuq's own kernels on weights packed once per layer: ternary weights with activations of 4 bits or fewer by table lookups (three weights at a time: vpshufb on AVX2, vpermb where built with AVX-512 VBMI), other weights by AVX2's vpmaddubsw, low-bit sums kept in int16 |
| ``fp32`` | an fp32 matmul of the levels, exact while |sum| < 2^24 (float64 beyond) |

``ROBUQ_GEMM`` (``auto`` or a path) is read by ``robuq.load_exported`` when it loads a model, and its
``gemm=`` argument overrides it; the choice is then handed down to each layer explicitly.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from pathlib import Path

import torch

from robuq.core.files import atomic_write_text
from robuq.kernels import native
from robuq.core.errors import RobuqError

PATHS = ("int_mm", "avx2", "fp32")
ENVIRONMENT = "ROBUQ_GEMM"
# The instruction sets that decide the path (VBMI: the lookup's width), as /proc/cpuinfo names them.
ISA_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512vbmi", "avx512_vnni", "avx_vnni", "amx_int8")
# oneDNN's ISA cap (ONEDNN_MAX_CPU_ISA) → the flags above it that PyTorch's int8 GEMM may still use.
_ONEDNN_CAPS = {
    "SSE41": (),
    "AVX": (),
    "AVX2": ("avx2",),
    "AVX2_VNNI": ("avx2", "avx_vnni"),
    "AVX2_VNNI_2": ("avx2", "avx_vnni"),
    "AVX512_CORE": ("avx2", "avx_vnni", "avx512f"),
    "AVX512_CORE_VNNI": ("avx2", "avx_vnni", "avx512f", "avx512_vnni"),
    "AVX512_CORE_BF16": ("avx2", "avx_vnni", "avx512f", "avx512_vnni"),
}
# A weight level beyond this lets vpmaddubsw's int16 pair sums saturate (2·255·64 < 2^15).
AVX2_MAX_WEIGHT = 64


@dataclasses.dataclass(frozen=True)
class CpuCapability:
    """What the GEMM choice depends on: PyTorch's CPU capability (``torch.backends.cpu.get_cpu_capability``:
    DEFAULT, AVX2, AVX512, …), the CPU's instruction sets among ``ISA_FLAGS`` that PyTorch may use, and
    what robuq's built C kernels use (``native.integer_isa``: none, plain, avx2, avx512_vnni) and the columns
    per block of their ternary lookup (``native.ternary_columns``: 64 where built with AVX-512 VBMI)."""

    torch_capability: str
    flags: frozenset[str]
    kernels: str
    lookup_columns: int = native.TERNARY_COLUMNS

    @property
    def wide_lookup(self) -> bool:
        """Whether robuq's ternary lookup runs at AVX-512 width here (and may beat ``int_mm``)."""
        return self.kernels != "none" and self.lookup_columns == native.TERNARY_WIDE_COLUMNS

    @property
    def vnni(self) -> bool:
        """Whether PyTorch's int8 GEMM may use VNNI (AVX-512 VNNI or AMX at PyTorch's AVX-512 level, or AVX-VNNI)."""
        return self.wide_vnni or "avx_vnni" in self.flags

    @property
    def wide_vnni(self) -> bool:
        """AVX-512 VNNI or AMX, with PyTorch at its AVX-512 level: where ``torch._int_mm`` is known fast."""
        return bool(self.flags & {"avx512_vnni", "amx_int8"}) and self.torch_capability.startswith("AVX512")

    def to_dict(self) -> dict:
        return {
            "torch_capability": self.torch_capability,
            "isa": sorted(self.flags),
            "robuq_kernels": self.kernels,
            "robuq_lookup_columns": self.lookup_columns,
        }


def cpu_flags() -> frozenset[str]:
    """The CPU's instruction sets among ``ISA_FLAGS`` (from /proc/cpuinfo; empty where there is none)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    return frozenset(f for f in ISA_FLAGS if f in flags)


def cpu_model() -> str:
    """The CPU's model name, family and model as /proc/cpuinfo gives them (the platform's name elsewhere)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        import platform

        return platform.processor() or platform.machine()
    fields = {}
    for line in info.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return f"{fields.get('model name', '?')} (vendor {fields.get('vendor_id', '?')}, family {fields.get('cpu family', '?')}, model {fields.get('model', '?')})"


@functools.lru_cache(maxsize=None)
def cpu_capability() -> CpuCapability:
    """This process's capability, read once: the CPU's flags, capped where ``ONEDNN_MAX_CPU_ISA`` caps
    oneDNN (which runs ``torch._int_mm``) and dropped above PyTorch's own capability level."""
    flags = cpu_flags()
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if cap in _ONEDNN_CAPS:
        flags = flags & frozenset(_ONEDNN_CAPS[cap])
    return CpuCapability(torch.backends.cpu.get_cpu_capability(), flags, native.integer_isa(), native.ternary_columns())


def choose_path(capability: CpuCapability, measure=None, lookup_top: int | None = None, measure_lookup=None) -> str:
    """The GEMM path for ``capability``: ``int_mm`` with AVX-512 VNNI or AMX; below VNNI robuq's ``avx2``
    kernel where it is built, else ``fp32``. With AVX-VNNI alone (client CPUs, where PyTorch's int8 speed
    was not measured here) ``measure(fallback)``, if given, times ``int_mm`` against that fallback once and
    names the faster; without it the fallback is taken. A layer the ternary lookup takes (``lookup_top``:
    its activations' top level) on a CPU with VNNI and the wide lookup asks ``measure_lookup(lookup_top)``
    instead, if given, which names ``avx2`` only where that is measured faster than ``int_mm``."""
    if capability.wide_vnni:
        if lookup_top is not None and capability.wide_lookup and measure_lookup is not None:
            return measure_lookup(lookup_top)
        return "int_mm"
    fallback = "avx2" if capability.kernels in ("avx2", "avx512_vnni") else "fp32"
    if capability.vnni and measure is not None:
        return measure(fallback)
    return fallback


def _median_ms(run, repeats: int) -> float:
    """The median of ``repeats`` timed calls of ``run`` after one untimed, in milliseconds."""
    run()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        samples.append(time.perf_counter() - start)
    return sorted(samples)[repeats // 2] * 1e3


def _faster_than(fallback: str, repeats: int = 5) -> str:
    """``int_mm`` or ``fallback``, timed once on a DiT-S/2-like fc1 of 256 rows; int_mm must win by 20%
    (the machine may be noisy, and the fallback's speed is known)."""
    torch.manual_seed(0)
    a = torch.randint(0, 8, (256, 384), dtype=torch.int8)
    b = torch.randint(-1, 2, (384, 1536), dtype=torch.int8)
    sums, b_float = b.sum(dim=0, dtype=torch.int32), b.float()
    times = {
        name: _median_ms(lambda name=name: matmul(name, a, b, sums, 1, b_float), repeats)
        for name in ("int_mm", fallback)
    }
    return "int_mm" if times["int_mm"] * 1.2 < times[fallback] else fallback


# The shape the lookup is timed at: a DiT-S/2 fc1 at batch 2 (two 256-token images, one with guidance).
LOOKUP_TIMING_SHAPE = (512, 384, 1536)


def time_lookup_against_int_mm(top: int, repeats: int = 7) -> dict[str, float]:
    """Milliseconds (medians) of ``int_mm`` and of the ``avx2`` path's lookup kernel on LOOKUP_TIMING_SHAPE
    with ternary weights and levels 0…``top``, with PyTorch's thread count."""
    m, k, n = LOOKUP_TIMING_SHAPE
    generator = torch.Generator().manual_seed(0)
    a = torch.randint(0, top + 1, (m, k), dtype=torch.int8, generator=generator)
    b = torch.randint(-1, 2, (k, n), dtype=torch.int8, generator=generator)
    sums, packed = b.sum(dim=0, dtype=torch.int32), native.pack_ternary_weights(b)
    return {
        "int_mm": _median_ms(lambda: torch._int_mm(a, b), repeats),
        "avx2": _median_ms(lambda: matmul("avx2", a, b, sums, 1, packed=packed, act_shift=0, act_top=top), repeats),
    }


def _choices_file() -> Path:
    return native.cache_directory() / "gemm_choices.json"


@functools.lru_cache(maxsize=None)
def lookup_beats_int_mm(top: int) -> str:
    """``avx2`` where the lookup kernel is measured at least 10% faster than ``int_mm`` for levels 0…``top``
    on this CPU, else ``int_mm``. Measured once per CPU model, built library, PyTorch version and thread
    count, then read from the cache file (delete it to measure again)."""
    key = "|".join([cpu_model(), native.build_identity(), torch.__version__, str(torch.get_num_threads()), str(top)])
    path = _choices_file()
    try:
        choices = json.loads(path.read_text())
    except (OSError, ValueError):
        choices = {}
    if key not in choices:
        times = time_lookup_against_int_mm(top)
        choices[key] = {"path": "avx2" if times["avx2"] * 1.1 < times["int_mm"] else "int_mm", "ms": times}
        atomic_write_text(path, json.dumps(choices, indent=1))  # a concurrent process reads the old or the new
    return choices[key]["path"]


@functools.lru_cache(maxsize=None)
def auto_path(lookup_top: int | None = None) -> str:
    """The path ``choose_path`` picks for this process (measuring once if it must), cached; ``lookup_top``
    for a layer the ternary lookup could take (ternary weights, activation levels 0…lookup_top)."""
    return choose_path(cpu_capability(), _faster_than, lookup_top, lookup_beats_int_mm)


def requested(path: str | None) -> str:
    """``path`` (None: ``$ROBUQ_GEMM``, read now, ``auto`` where unset), checked: ``auto`` or one of PATHS
    this machine can run. Layers resolve ``auto`` each for itself (``resolve``)."""
    path = (os.environ.get(ENVIRONMENT) or "auto") if path is None else path
    return path if path == "auto" else resolve(path)


def resolve(path: str | None, lookup_top: int | None = None) -> str:
    """A concrete path from ``path`` (None: ``$ROBUQ_GEMM``, read now; ``"auto"``: ``auto_path(lookup_top)``),
    checked against what this machine can run."""
    path = (os.environ.get(ENVIRONMENT) or "auto") if path is None else path
    if path == "auto":
        return auto_path(lookup_top)
    if path not in PATHS:
        raise RobuqError(
            f"unknown GEMM path {path!r} (from gemm= or ${ENVIRONMENT}); use auto or one of {', '.join(PATHS)}"
        )
    if path == "avx2" and native.integer_isa() not in ("avx2", "avx512_vnni"):
        raise RobuqError(
            "the avx2 GEMM path needs robuq's C kernels built for AVX2 (a C compiler, ROBUQ_NATIVE "
            "unset or 1, an x86-64 CPU with AVX2); use gemm='fp32' or 'int_mm' instead"
        )
    return path


def avx2_flush(max_weight: int, act_top: int = 255) -> int:
    """How many quads of int16 pair sums the AVX2 multiply-add kernel may add before widening them, for weights up to
    ``max_weight`` in magnitude and unsigned activation levels up to ``act_top`` (0 where vpmaddubsw itself
    could saturate)."""
    return 32767 // (2 * act_top * max(1, max_weight))


def largest_level(levels: torch.Tensor) -> int:
    """max |level| of int8 levels (−128 has no int8 abs), 0 for none: the ``max_weight`` of ``matmul``."""
    return max(-int(levels.min()), int(levels.max())) if levels.numel() else 0


def uses_ternary_lookup(max_weight: int, act_shift: int, act_top: int) -> bool:
    """Whether the AVX2 path multiplies by the ternary lookup kernel (``native.gemm_ternary``): weights in
    {−1, 0, 1} and unsigned activation levels of at most 4 bits; else by vpmaddubsw (``native.gemm_s8``)."""
    return max_weight <= 1 and act_shift == 0 and act_top <= native.TERNARY_MAX_TOP


def pack_avx2(b: torch.Tensor, act_shift: int, act_top: int) -> torch.Tensor:
    """b (k, n) int8 packed for whichever AVX2 kernel ``matmul`` will give it (see ``uses_ternary_lookup``)."""
    if uses_ternary_lookup(largest_level(b), act_shift, act_top):
        return native.pack_ternary_weights(b)
    return native.pack_gemm_weights(b)


def unpack_avx2(packed: torch.Tensor, k: int, n: int) -> torch.Tensor:
    """The int8 (k, n) matrix that ``pack_avx2`` packed (each kernel's packing ends in its own block shape)."""
    if native.is_ternary_code(packed):
        return native.unpack_ternary_weights(packed, k, n)
    return native.unpack_gemm_weights(packed, k, n)


def float_matmul(a: torch.Tensor, b_float: torch.Tensor, max_weight: int) -> torch.Tensor:
    """a (m, k) int8 · b (k, n) given as float levels (|b| ≤ max_weight) → int32, exact: fp32 while
    128·max|b|·k < 2^24, float64 beyond."""
    if 128 * max_weight * a.shape[1] < 2**24:
        return torch.mm(a.float(), b_float).to(torch.int32)
    return torch.mm(a.double(), b_float.double()).to(torch.int32)


def matmul(
    path: str,
    a: torch.Tensor,
    b: torch.Tensor | None,
    col_sums: torch.Tensor,
    max_weight: int,
    b_float: torch.Tensor | None = None,
    packed: torch.Tensor | None = None,
    act_shift: int = 128,
    act_top: int = 255,
) -> torch.Tensor:
    """a (m, k) int8 · b (k, n) int8 → int32 by ``path`` (a concrete one of PATHS). ``col_sums`` and
    ``max_weight`` describe b (the AVX2 kernels need them; weights beyond AVX2_MAX_WEIGHT go to fp32);
    ``b_float`` is b as float32 and ``packed`` b as ``pack_avx2`` packs it, if the caller keeps them (b may
    then be None on the AVX2 path).
    a's levels are u − ``act_shift`` with u in 0…``act_top``: low-bit activations (shift 0, top 2^bits − 1)
    let the AVX2 kernels read them in place and keep their sums in int8 or int16 for longer, and with
    ternary weights up to 4 bits take the lookup kernel."""
    if path == "avx2" and uses_ternary_lookup(max_weight, act_shift, act_top):
        packed = native.pack_ternary_weights(b) if packed is None else packed
        return native.gemm_ternary(a, packed, col_sums.numel(), col_sums, act_top)
    if path == "avx2" and max_weight <= AVX2_MAX_WEIGHT:
        packed = native.pack_gemm_weights(b) if packed is None else packed
        return native.gemm_s8(a, packed, col_sums.numel(), col_sums, act_shift, avx2_flush(max_weight, act_top))
    if path == "int_mm":
        return torch._int_mm(a, b)
    return float_matmul(a, b.float() if b_float is None else b_float, max_weight)


__all__ = [
    "PATHS",
    "CpuCapability",
    "auto_path",
    "choose_path",
    "cpu_capability",
    "cpu_model",
    "largest_level",
    "lookup_beats_int_mm",
    "matmul",
    "pack_avx2",
    "requested",
    "resolve",
    "unpack_avx2",
    "uses_ternary_lookup",
]
