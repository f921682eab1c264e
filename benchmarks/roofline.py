"""What is left in the CPU kernels: each integer GEMM's and the fused ternary linear's measured rate as a
fraction of this CPU's peak for the instructions it is built on, and its traffic as a fraction of the memory
bandwidth, both peaks measured here, one thread.

    python benchmarks/roofline.py            # → results/roofline.json and .md (about a minute; quiet machine)
    python benchmarks/roofline.py --quick    # fewer repeats and a smaller copy: checks the script

Peaks: ``roofline_peaks.c`` beside this script, compiled for this CPU, runs 12 independent chains of each
GEMM's inner instructions: vpermb + vpaddb (the lookup at AVX-512 width: 192 ternary multiply-adds, 64
columns × 3 weights), vpshufb + vpsignb + vpaddb (the AVX2 lookup: 96) and vpdpbusd (VNNI, behind
``torch._int_mm``: 64). Bandwidth: the copy of a tensor far larger than the caches (bytes read and written
over the time). Kernels: DiT-S/2 and DiT-XL/2 block-linear shapes at 512 rows (batch 2 × 256 tokens),
activations at 3 bits, ternary weights, the rank-16 branch in the fused linear. A kernel near its instruction
peak has little left to gain from scheduling; one far below it and far below the bandwidth is bound by
something else (its passes around the lookups, table building, widening).
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from common import invocation, machine, parse_config, time_ms, write_result
from robuq.core.options import option
from robuq.kernels import native
from robuq.quant.hadamard import random_signs

PEAKS_SOURCE = Path(__file__).with_name("roofline_peaks.c")
# Ternary multiply-adds one instruction group does: (function, products per call of one chain step).
PEAKS = {
    "lookup, AVX-512 (vpermb + vpaddb)": ("lookup_rounds", 192),
    "lookup, AVX2 (vpshufb + vpsignb + vpaddb)": ("avx2_lookup_rounds", 96),
    "VNNI (vpdpbusd)": ("vnni_rounds", 64),
}
SHAPES = {
    "DiT-S/2 fc1": (384, 1536),
    "DiT-S/2 fc2": (1536, 384),
    "DiT-XL/2 fc1": (1152, 4608),
    "DiT-XL/2 fc2": (4608, 1152),
}
ROWS, BITS, RANK = 512, 3, 16


@dataclass
class RooflineConfig:
    quick: bool = option(False, "fewer repeats and a smaller copy (checks the script, measures little)")
    name: str = option("roofline", "results/<name>.json and .md")
    results_dir: str | None = option(None, "where the results go (default results/)")


def peaks_library(folder: Path) -> ctypes.CDLL:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise SystemExit("roofline.py compiles its peak loops with a C compiler (cc or gcc); none was found")
    target = folder / "roofline_peaks.so"
    subprocess.run(
        [compiler, "-O3", "-march=native", "-shared", "-fPIC", str(PEAKS_SOURCE), "-o", str(target)], check=True
    )
    library = ctypes.CDLL(str(target))
    for name, _ in PEAKS.values():
        getattr(library, name).restype = ctypes.c_int64
        getattr(library, name).argtypes = [ctypes.c_int64]
    return library


def peak_products_per_s(library: ctypes.CDLL, function: str, per_step: int, seconds: float) -> float | None:
    """Multiply-adds per second of one core at this instruction group's best, None where the CPU lacks it."""
    run = getattr(library, function)
    if run(1) == -1:
        return None
    rounds, best = 1 << 16, 0.0
    while True:  # rounds that take about `seconds`
        start = time.perf_counter()
        run(rounds)
        took = time.perf_counter() - start
        if took > seconds / 4:
            break
        rounds *= 4
    for _ in range(5):  # a peak: the best of a few tries
        start = time.perf_counter()
        run(rounds)
        best = max(best, rounds * library.chains() * per_step / (time.perf_counter() - start))
    return best


def bandwidth_bytes_per_s(mebibytes: int, repeats: int) -> float:
    """Bytes read and written per second by one thread copying a tensor of ``mebibytes``."""
    source = torch.ones(mebibytes * 2**20 // 4)
    target = torch.empty_like(source)
    ms = time_ms(lambda: target.copy_(source), repeats)
    return 2 * source.numel() * 4 / (ms / 1e3)


def kernel_rows(repeats: int, peaks: dict[str, float | None], bandwidth: float) -> list[dict]:
    wide = native.ternary_columns() == native.TERNARY_WIDE_COLUMNS
    lookup_peak = peaks["lookup, AVX-512 (vpermb + vpaddb)" if wide else "lookup, AVX2 (vpshufb + vpsignb + vpaddb)"]
    top, rows = 2**BITS - 1, []
    for shape, (k, n) in SHAPES.items():
        generator = torch.Generator().manual_seed(0)
        a = torch.randint(0, top + 1, (ROWS, k), dtype=torch.int8, generator=generator)
        b = torch.randint(-1, 2, (k, n), dtype=torch.int8, generator=generator)
        code, sums = native.pack_ternary_weights(b), b.sum(dim=0, dtype=torch.int32)
        x, alpha, w, bias = torch.randn(ROWS, k), torch.rand(n), torch.randn(n), torch.randn(n)
        down, up = torch.randn(RANK, k), torch.randn(RANK, n)
        layer = native.ternary_linear_args(
            k,
            n,
            random_signs(k, 1),
            True,
            BITS,
            "gaussian",
            torch.tensor(0.9),
            down,
            code,
            sums,
            alpha,
            w,
            bias,
            up,
            False,
        )
        out = torch.empty(ROWS, n)
        products = ROWS * k * n
        code_bytes = code.numel()
        kernels = {
            "lookup GEMM": (
                lambda: native.gemm_ternary(a, code, n, sums, top),
                lookup_peak,
                a.numel() + code_bytes + 4 * ROWS * n,
            ),
            "torch._int_mm": (
                lambda: torch._int_mm(a, b),
                peaks["VNNI (vpdpbusd)"],
                a.numel() + b.numel() + 4 * ROWS * n,
            ),
            "fused ternary linear": (
                lambda: native.linear_ternary(x, layer, out),
                lookup_peak,
                4 * x.numel() + code_bytes + 4 * out.numel(),
            ),
        }
        for kernel, (run, peak, traffic) in kernels.items():
            ms = time_ms(run, repeats)
            rate = products / (ms / 1e3)
            rows.append(
                {
                    "kernel": kernel,
                    "shape": shape,
                    "k": k,
                    "n": n,
                    "ms": ms,
                    "products_per_s": rate,
                    "of_instruction_peak": rate / peak if peak else None,
                    "bytes_per_s": traffic / (ms / 1e3),
                    "of_bandwidth": traffic / (ms / 1e3) / bandwidth,
                }
            )
    return rows


def markdown(peaks: dict, bandwidth: float, rows: list[dict]) -> str:
    lines = [
        "One thread. Instruction peaks (best of five runs of 12 independent chains) as ternary multiply-adds per "
        "second, and the copy bandwidth:",
        "",
        "| peak | G multiply-adds/s |",
        "|---|---|",
        *(
            f"| {name} | {rate / 1e9:.0f} |" if rate else f"| {name} | not on this CPU |"
            for name, rate in peaks.items()
        ),
        f"| memory copy | {bandwidth / 1e9:.1f} GB/s |",
        "",
        f"Kernels at {ROWS} rows, {BITS}-bit activations, ternary weights (medians). The fused linear's rate counts "
        "its GEMM's products only; its traffic is its fp32 input and output and the packed weights:",
        "",
        "| kernel | shape | ms | G multiply-adds/s | of its instruction peak | GB/s | of bandwidth |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        peak = f"{100 * r['of_instruction_peak']:.0f}%" if r["of_instruction_peak"] is not None else "—"
        lines.append(
            f"| {r['kernel']} | {r['shape']} ({r['k']}→{r['n']}) | {r['ms']:.2f} | {r['products_per_s'] / 1e9:.0f} "
            f"| {peak} | {r['bytes_per_s'] / 1e9:.1f} | {100 * r['of_bandwidth']:.0f}% |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    config = parse_config(RooflineConfig, argv, __doc__)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        library = peaks_library(Path(folder))
        seconds = 0.02 if config.quick else 0.2
        peaks = {name: peak_products_per_s(library, f, per, seconds) for name, (f, per) in PEAKS.items()}
    bandwidth = bandwidth_bytes_per_s(64 if config.quick else 512, 2 if config.quick else 5)
    rows = kernel_rows(2 if config.quick else 9, peaks, bandwidth)
    payload = {"machine": machine(), "threads": 1, "peaks": peaks, "bandwidth_bytes_per_s": bandwidth, "kernels": rows}
    out = Path(config.results_dir) if config.results_dir else None
    write_result(config.name, payload, markdown(peaks, bandwidth, rows), out, invocation(__file__, argv))
    return payload


if __name__ == "__main__":
    main()
