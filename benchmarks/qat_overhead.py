"""Forward+backward time of the quantized DiT (a preset) against the full-precision one, same shapes.

    python benchmarks/qat_overhead.py        # DiT-S/2, latent 32×32, batch 8 → results/qat_overhead.json
    python benchmarks/qat_overhead.py --model toy --batch 2 --rounds 1   # a check of the script, not a measurement

The two models are timed alternately in one run, so machine noise hits both alike.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from common import create_model, invocation, parse_config, time_ms, write_result
from robuq.core.options import option
import robuq


def step(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    model(x, t, y).square().mean().backward()


@dataclass
class QATOverheadConfig:
    """Options of this benchmark."""

    model: str = option("DiT-S/2", "a registry name, or 'toy' to check the script in seconds")
    input_size: int = option(32, "latent side")
    batch: int = option(8, "images per step")
    preset: str = option("robuq", "quantization preset")
    act_bits: int = option(4, "activation bits")
    rounds: int = option(5, "alternating rounds (each times both models)")
    threads: int = option(2, "CPU threads")
    device: str = option("cpu", "cpu or cuda")
    results_dir: str | None = option(None, "where the JSON and Markdown go (default: results/)")


def main(argv: list[str] | None = None) -> None:
    config = parse_config(QATOverheadConfig, argv, __doc__)
    torch.set_num_threads(config.threads)
    torch.manual_seed(0)
    fp = create_model(config.model, config.input_size).to(config.device)
    quant = create_model(config.model, config.input_size).to(config.device)
    quant.load_state_dict(fp.state_dict())
    robuq.quantize_(quant, robuq.preset(config.preset, act_bits=config.act_bits))
    size = fp.config.input_size
    x = torch.randn(config.batch, fp.in_channels, size, size, device=config.device)
    t = torch.randint(0, 1000, (config.batch,), device=config.device)
    y = torch.randint(0, fp.num_classes, (config.batch,), device=config.device)
    fp_ms, q_ms = [], []
    for _ in range(config.rounds):  # alternate, so drifts in machine load affect both
        fp_ms.append(time_ms(lambda: step(fp, x, t, y), repeats=3, warmup=1, device=config.device))
        q_ms.append(time_ms(lambda: step(quant, x, t, y), repeats=3, warmup=1, device=config.device))
    fp_med, q_med = statistics.median(fp_ms), statistics.median(q_ms)
    result = {
        "model": config.model,
        "input_size": size,
        "batch": config.batch,
        "preset": config.preset,
        "act_bits": config.act_bits,
        "device": config.device,
        "fp_ms": fp_med,
        "quantized_ms": q_med,
        "ratio": q_med / fp_med,
        "target_ratio": 1.5,
        "fp_ms_rounds": fp_ms,
        "quantized_ms_rounds": q_ms,
    }
    table = (
        "| model | preset | batch | device | fp fwd+bwd ms | quantized fwd+bwd ms | ratio (target ≤ 1.5) |\n|---|---|---|---|---|---|---|\n"
        f"| {config.model} | {config.preset} A{config.act_bits} | {config.batch} | {config.device} | {fp_med:.0f} | {q_med:.0f} | {q_med / fp_med:.2f} |"
    )
    write_result(
        "qat_overhead",
        result,
        table,
        Path(config.results_dir) if config.results_dir else None,
        invocation(__file__, argv),
    )
    print(table)


if __name__ == "__main__":
    main()
