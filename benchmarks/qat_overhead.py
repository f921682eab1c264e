"""Forward+backward time of the quantized DiT (a preset) against the full-precision one, same shapes.

    python benchmarks/qat_overhead.py        # DiT-S/2, latent 32×32, batch 8 → results/qat_overhead.json

The two models are timed alternately in one run, so machine noise hits both alike.
"""
from __future__ import annotations

import argparse
import statistics

import torch

from common import time_ms, write_result
import robuq


def step(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    model(x, t, y).square().mean().backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="DiT-S/2")
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--preset", default="robuq")
    parser.add_argument("--act-bits", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    fp = robuq.create_dit(args.model, input_size=args.input_size).to(args.device)
    quant = robuq.create_dit(args.model, input_size=args.input_size).to(args.device)
    quant.load_state_dict(fp.state_dict())
    robuq.quantize_(quant, robuq.preset(args.preset, act_bits=args.act_bits))
    x = torch.randn(args.batch, fp.in_channels, args.input_size, args.input_size, device=args.device)
    t = torch.randint(0, 1000, (args.batch,), device=args.device)
    y = torch.randint(0, fp.num_classes, (args.batch,), device=args.device)
    fp_ms, q_ms = [], []
    for _ in range(args.rounds):  # alternate, so drifts in machine load affect both
        fp_ms.append(time_ms(lambda: step(fp, x, t, y), repeats=3, warmup=1, device=args.device))
        q_ms.append(time_ms(lambda: step(quant, x, t, y), repeats=3, warmup=1, device=args.device))
    fp_med, q_med = statistics.median(fp_ms), statistics.median(q_ms)
    result = {
        "model": args.model, "input_size": args.input_size, "batch": args.batch, "preset": args.preset,
        "act_bits": args.act_bits, "device": args.device, "fp_ms": fp_med, "quantized_ms": q_med,
        "ratio": q_med / fp_med, "target_ratio": 1.5, "fp_ms_rounds": fp_ms, "quantized_ms_rounds": q_ms,
    }
    table = (
        "| model | preset | batch | device | fp fwd+bwd ms | quantized fwd+bwd ms | ratio (target ≤ 1.5) |\n|---|---|---|---|---|---|---|\n"
        f"| {args.model} | {args.preset} A{args.act_bits} | {args.batch} | {args.device} | {fp_med:.0f} | {q_med:.0f} | {q_med / fp_med:.2f} |"
    )
    write_result("qat_overhead", result, table)
    print(table)


if __name__ == "__main__":
    main()
