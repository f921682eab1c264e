"""Fast Hadamard transform vs a dense matmul with H vs a plain memory copy (the floor).

    python benchmarks/hadamard.py                          # writes results/hadamard.json and .md
    python benchmarks/hadamard.py --shapes 64x48 --repeats 1   # a check of the script, not a measurement

``fast`` is what ``hadamard_transform`` runs by default (robuq's C kernel on the CPU, Triton on a GPU);
``pytorch`` is its PyTorch fallback (a small matmul per Kronecker factor). All are timed side by side
in one run; compare the ratios, not the absolute times.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from common import invocation, parse_config, time_ms, write_result
from robuq.core.options import option
from robuq.kernels import native
from robuq.core.hadamard_matrices import hadamard_factors, hadamard_matrix
from robuq.quant.hadamard import hadamard_transform


def measure(shape: tuple[int, int], device: str, repeats: int) -> dict:
    x = torch.randn(*shape, device=device)
    H = hadamard_matrix(shape[1]).to(device)
    fast = time_ms(lambda: hadamard_transform(x), repeats, device=device)
    with native.use(False):  # the PyTorch path (on a GPU the Triton kernel runs either way)
        pytorch = time_ms(lambda: hadamard_transform(x), repeats, device=device) if device == "cpu" else None
    dense = time_ms(lambda: x @ H, repeats, device=device)
    copy = time_ms(lambda: x.clone(), repeats, device=device)
    error = (hadamard_transform(x) - x @ H).abs().max().item()
    return {
        "shape": list(shape),
        "device": device,
        "factors": list(hadamard_factors(shape[1])),
        "fast_ms": fast,
        "pytorch_ms": pytorch,
        "dense_ms": dense,
        "copy_ms": copy,
        "dense_over_fast": dense / fast,
        "fast_over_copy": fast / copy,
        "max_abs_diff": error,
    }


@dataclass
class HadamardBenchConfig:
    """Options of this benchmark."""

    shapes: str = option("4096x1152,4096x4608", "tokens×width, comma-separated (DiT-XL/2's by default)")
    repeats: int = option(7, "timed repeats per measurement")
    threads: int = option(2, "CPU threads")
    results_dir: str | None = option(None, "where the JSON and Markdown go (default: results/)")


def main(argv: list[str] | None = None) -> None:
    config = parse_config(HadamardBenchConfig, argv, __doc__)
    torch.set_num_threads(config.threads)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    shapes = [tuple(int(n) for n in shape.split("x")) for shape in config.shapes.split(",")]
    rows = [measure(shape, d, config.repeats) for d in devices for shape in shapes]
    table = [
        "| shape | device | factors | fast ms | PyTorch path ms | dense ms | copy ms | dense/fast | fast/copy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        pytorch = "—" if r["pytorch_ms"] is None else f"{r['pytorch_ms']:.1f}"
        table.append(
            f"| {r['shape']} | {r['device']} | {r['factors']} | {r['fast_ms']:.1f} | {pytorch} | {r['dense_ms']:.1f} | {r['copy_ms']:.1f} "
            f"| {r['dense_over_fast']:.1f}× | {r['fast_over_copy']:.1f}× |"
        )
    write_result(
        "hadamard",
        {"rows": rows, "repeats": config.repeats},
        "\n".join(table),
        Path(config.results_dir) if config.results_dir else None,
        invocation(__file__, argv),
    )
    print("\n".join(table))


if __name__ == "__main__":
    main()
