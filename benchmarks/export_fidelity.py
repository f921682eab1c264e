"""Does an exported model sample the images its training model samples? Side by side, same noise.

    python benchmarks/export_fidelity.py                       # the shipped teacher quantized at RobuQ A4 and A2
    python benchmarks/export_fidelity.py --model runs/ampn-b3/final/model.safetensors ...   # trained models

For each quantized model it samples the same labels and noise four ways: the fake-quantized training
model on PyTorch's kernels (the reference), the same model on robuq's C kernels, and the exported file
(integer linears and attention) with its full-precision parts in fp32 and in fp16. The training model
against itself on other kernels is the floor: at 2–4 bits a float rounding difference can move an
activation to the next level, and 25 sampling steps carry it on, so no integer path can agree more
closely than that. Writes results/export_fidelity.{json,md,png}.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common import invocation, parse_config, write_result
from robuq.core.options import option
import robuq
from robuq.deploy.export import export_model, load_exported
from robuq.eval.metrics import psnr
from robuq.kernels import native
from robuq.io.quantized import load_quantized
from robuq.core.runtime import default_teacher_path
from robuq.sample.generate import save_grid, to_uint8


def to_pixels(images: torch.Tensor) -> np.ndarray:
    """The 8-bit pixels a user gets (NHWC), as float for the arithmetic."""
    return to_uint8(images).astype(np.float64)


def compare(reference: np.ndarray, other: np.ndarray) -> dict:
    return {
        "psnr_db": psnr(reference, other),
        "max_abs_diff": float(np.abs(reference - other).max()),
        "within_2_levels": float((np.abs(reference - other) <= 2).mean()),
    }


def quantized_models(paths: list[str]) -> list[tuple[str, torch.nn.Module, robuq.QuantConfig]]:
    if paths:
        return [(path, *load_quantized(path)) for path in paths]
    models = []
    for bits in (4, 2):
        config = robuq.preset("robuq", act_bits=bits)
        models.append(
            (
                f"shipped teacher, robuq preset A{bits} (no QAT)",
                robuq.quantize_(robuq.load_dit(str(default_teacher_path())), config),
                config,
            )
        )
    return models


def measure(name: str, model: torch.nn.Module, config, per_class: int, steps: int, tmp: Path, grid: Path) -> dict:
    model.eval()
    labels = torch.arange(model.num_classes).repeat_interleave(per_class)
    sample = lambda m: to_pixels(robuq.generate(m, labels, len(labels), "ddim", steps, 1.5, 0, progress=False))  # noqa: E731
    with native.use(False):
        reference = sample(model)
    with native.use(True):
        floor = sample(model)
        exported = {
            dtype: sample(
                load_exported(export_model(model, config, tmp / f"{dtype}.safetensors", "ternary-trits", dtype))
            )
            for dtype in ("fp32", "fp16")
        }
    # Rows: reference, exported (fp32 parts), and their difference ×4, the first 8 samples of each.
    shown = slice(0, min(8, len(labels)))
    diff = np.clip(np.abs(reference - exported["fp32"]) * 4, 0, 255)
    save_grid(
        np.concatenate([reference[shown], exported["fp32"][shown], diff[shown]]).astype(np.uint8), grid, shown.stop
    )
    return {
        "model": name,
        "samples": len(labels),
        "ddim_steps": steps,
        "training_model_c_kernels": compare(reference, floor),
        "exported_fp32": compare(reference, exported["fp32"]),
        "exported_fp16": compare(reference, exported["fp16"]),
        "grid": grid.name,
    }


@dataclass
class ExportFidelityConfig:
    """Options of this benchmark."""

    model: str = option("", "quantized model files, comma-separated")
    per_class: int = option(4, "samples per class")
    steps: int = option(25, "DDIM steps")
    threads: int = option(2, "CPU threads")
    results_dir: str = option(str(Path(__file__).resolve().parents[1] / "results"), "where the JSON and Markdown go")


def main(argv: list[str] | None = None) -> None:
    options = parse_config(ExportFidelityConfig, argv, __doc__)
    torch.set_num_threads(options.threads)
    results_dir = Path(options.results_dir)
    grids = results_dir / "export_fidelity_grids"
    grids.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for i, (name, model, config) in enumerate(quantized_models([m for m in options.model.split(",") if m])):
            rows.append(
                measure(name, model, config, options.per_class, options.steps, Path(folder), grids / f"model-{i}.png")
            )
    lines = [
        "PSNR (dB) of each way of sampling against the training model on PyTorch's kernels; same labels and noise.",
        "",
        "| model | training model, C kernels (floor) | exported, fp32 parts | exported, fp16 parts | max pixel diff (fp32 parts) | grid |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['training_model_c_kernels']['psnr_db']:.1f} | {r['exported_fp32']['psnr_db']:.1f} "
            f"| {r['exported_fp16']['psnr_db']:.1f} | {r['exported_fp32']['max_abs_diff']:.0f} "
            f"| [grid](export_fidelity_grids/{r['grid']}) |"
        )
    lines += ["", "Grids: the reference samples, the exported model's (fp32 parts), and 4× their absolute difference."]
    write_result("export_fidelity", {"rows": rows}, "\n".join(lines), results_dir, invocation(__file__, argv))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
