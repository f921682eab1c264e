"""Forward+backward time of the quantized DiT (a preset) against the full-precision one, same shapes.

    python benchmarks/qat_overhead.py        # DiT-S/2, latent 32×32, batch 8 → results/qat_overhead.json
    python benchmarks/qat_overhead.py --model toy --batch 2 --rounds 1   # a check of the script, not a measurement

The two models are timed alternately in one run, so machine noise hits both alike.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from common import create_model, invocation, time_ms, write_result
import robuq


def step(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    model(x, t, y).square().mean().backward()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="DiT-S/2", help="a registry name, or 'toy' to check the script in seconds")
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--preset", default="robuq")
    parser.add_argument("--act-bits", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--results-dir", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    fp = create_model(args.model, args.input_size).to(args.device)
    quant = create_model(args.model, args.input_size).to(args.device)
    quant.load_state_dict(fp.state_dict())
    robuq.quantize_(quant, robuq.preset(args.preset, act_bits=args.act_bits))
    size = fp.config.input_size
    x = torch.randn(args.batch, fp.in_channels, size, size, device=args.device)
    t = torch.randint(0, 1000, (args.batch,), device=args.device)
    y = torch.randint(0, fp.num_classes, (args.batch,), device=args.device)
    fp_ms, q_ms = [], []
    for _ in range(args.rounds):  # alternate, so drifts in machine load affect both
        fp_ms.append(time_ms(lambda: step(fp, x, t, y), repeats=3, warmup=1, device=args.device))
        q_ms.append(time_ms(lambda: step(quant, x, t, y), repeats=3, warmup=1, device=args.device))
    fp_med, q_med = statistics.median(fp_ms), statistics.median(q_ms)
    result = {
        "model": args.model, "input_size": size, "batch": args.batch, "preset": args.preset,
        "act_bits": args.act_bits, "device": args.device, "fp_ms": fp_med, "quantized_ms": q_med,
        "ratio": q_med / fp_med, "target_ratio": 1.5, "fp_ms_rounds": fp_ms, "quantized_ms_rounds": q_ms,
    }
    table = (
        "| model | preset | batch | device | fp fwd+bwd ms | quantized fwd+bwd ms | ratio (target ≤ 1.5) |\n|---|---|---|---|---|---|---|\n"
        f"| {args.model} | {args.preset} A{args.act_bits} | {args.batch} | {args.device} | {fp_med:.0f} | {q_med:.0f} | {q_med / fp_med:.2f} |"
    )
    write_result("qat_overhead", result, table, Path(args.results_dir) if args.results_dir else None, invocation(__file__, argv))
    print(table)


if __name__ == "__main__":
    main()
