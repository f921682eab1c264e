"""The GPU check of the paper's setting (≤ 8 minutes on one H100/H200): DiT-XL/2 QAT steps, kernels, sampling.

    python benchmarks/gpu_check.py            # → results/gpu_check.json and .md; on a machine without CUDA it skips

1. One QAT step of DiT-XL/2 (256 px: 32×32×4 latents, RobuQ A2 student, distillation + diffusion loss, the
   fp teacher under no_grad) in bf16 autocast, with and without per-block gradient checkpointing, at two
   batch sizes: step time, images/s, peak memory, and the fit peak = fixed + per_sample · batch that lets a
   user choose a batch per GPU.
2. The Triton kernels against their PyTorch twins on DiT-XL/2 shapes: Hadamard transform (1152, 4608) and
   the fused Hadamard + activation quantizer; largest difference and time.
3. Sampling throughput of the quantized DiT-XL/2 with guidance (denoiser calls per second → images/s at
   250 DDPM steps).
"""
from __future__ import annotations

import argparse
import time

import torch

from common import time_ms, write_result


def _qat_step_stats(student, teacher, objective, optimizer, batch: int, checkpoint: bool) -> dict:
    student.grad_checkpoint = checkpoint
    x = torch.randn(batch, 4, 32, 32, device="cuda")
    y = torch.randint(0, 1000, (batch,), device="cuda")

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = objective(student, x, y, torch.Generator().manual_seed(0))["loss"].float().mean()
        loss.backward()
        optimizer.step()

    step()  # first step allocates the optimizer state
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    ms = time_ms(step, repeats=3, warmup=1, device="cuda")
    return {"batch": batch, "grad_checkpoint": checkpoint, "step_ms": ms, "images_per_s": batch / ms * 1e3,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def qat_steps(batches: tuple[int, int]) -> list[dict]:
    from robuq.diffusion.gaussian import create_diffusion
    from robuq.models.dit import create_dit
    from robuq.quantize.presets import resolve_policy
    from robuq.train.qat import build_student, qat_objective

    torch.manual_seed(0)
    teacher = create_dit("DiT-XL/2", input_size=32).cuda().eval().requires_grad_(False)
    with torch.no_grad():  # open adaLN-Zero's gates so gradients reach every block, as in a trained checkpoint
        for p in teacher.parameters():
            p.add_(0.02 * torch.randn_like(p))
    student = build_student(teacher, resolve_policy("robuq", 2, None, None))
    objective = qat_objective(create_diffusion(learn_sigma=True), teacher, "mix", 1.0)
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-5)
    rows = []
    for checkpoint in (False, True):
        pair = [_qat_step_stats(student, teacher, objective, optimizer, b, checkpoint) for b in batches]
        per_sample = (pair[1]["peak_gib"] - pair[0]["peak_gib"]) / (batches[1] - batches[0])
        for r in pair:
            r.update(per_sample_gib=per_sample, fixed_gib=pair[0]["peak_gib"] - per_sample * batches[0])
        rows += pair
    return rows


def kernels() -> list[dict]:
    from robuq.core import quantizer_spec as spec
    from robuq.kernels import triton_ops
    from robuq.quant.activation import activation_levels
    from robuq.quant.hadamard import hadamard_transform, random_signs

    rows = []
    for n in (1152, 4608):
        if triton_ops.hadamard_split(n) is None:
            rows.append({"kernel": "hadamard", "n": n, "skipped": "no Triton split for this size"})
            continue
        x = torch.randn(4096, n, device="cuda")
        signs = random_signs(n).cuda()
        # A tensor that wants gradients takes robuq's PyTorch path (the kernels serve inference only).
        twin = lambda: hadamard_transform(x.detach().requires_grad_(True), signs).detach()  # noqa: E731
        ref = twin()
        rows.append({"kernel": "hadamard", "n": n, "max_abs_diff": float((triton_ops.hadamard(x, signs) - ref).abs().max()),
                     "triton_ms": time_ms(lambda: triton_ops.hadamard(x, signs), device="cuda"),
                     "pytorch_ms": time_ms(twin, device="cuda")})
        _, levels, scale, offset = triton_ops.hadamard_quantize(x, signs, 2, "gaussian", None)
        own = activation_levels(ref, 2, "token", "gaussian")
        differing = (levels.float() != own.levels - spec.int8_level_shift(2)).float().mean()
        rows.append({"kernel": "hadamard_quantize A2", "n": n, "levels_differing_fraction": float(differing),
                     "max_scale_rel_diff": float(((scale - own.scale.squeeze(1)) / own.scale.squeeze(1)).abs().max()),
                     "triton_ms": time_ms(lambda: triton_ops.hadamard_quantize(x, signs, 2, "gaussian", None), device="cuda"),
                     "pytorch_ms": time_ms(lambda: activation_levels(twin(), 2, "token", "gaussian"), device="cuda")})
    return rows


def sampling(batch: int) -> dict:
    from robuq.models.dit import create_dit
    from robuq.quantize.presets import resolve_policy
    from robuq.quantize.policy import quantize_
    from robuq.sample.generate import guided

    torch.manual_seed(0)
    model = quantize_(create_dit("DiT-XL/2", input_size=32).cuda(), resolve_policy("robuq", 2, None, None)).eval()
    denoise = guided(model, 1.5, cfg_channels=3)
    x = torch.randn(batch, 4, 32, 32, device="cuda")
    t = torch.full((batch,), 500, device="cuda")
    y = torch.randint(0, 1000, (batch,), device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        ms = time_ms(lambda: denoise(x, t, y), repeats=5, warmup=2, device="cuda")
    return {"batch": batch, "denoiser_ms": ms, "images_per_s_250_steps": batch / (ms * 250) * 1e3}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs=2, default=(8, 32), help="two QAT batch sizes (for the memory fit)")
    parser.add_argument("--sample-batch", type=int, default=64)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; skipped (nothing written)")
        return 0
    t0 = time.perf_counter()
    result = {"qat": qat_steps(tuple(args.batches))}
    torch.cuda.empty_cache()
    result["kernels"] = kernels()
    result["sampling"] = sampling(args.sample_batch)
    result["seconds"] = time.perf_counter() - t0
    lines = ["| batch | grad ckpt | step ms | img/s | peak GiB | fixed GiB | GiB/sample |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['batch']} | {r['grad_checkpoint']} | {r['step_ms']:.0f} | {r['images_per_s']:.1f} | {r['peak_gib']:.1f} | "
              f"{r['fixed_gib']:.1f} | {r['per_sample_gib']:.2f} |" for r in result["qat"]]
    lines += ["", "| kernel | n | result |", "|---|---|---|"]
    lines += [f"| {r['kernel']} | {r['n']} | {', '.join(f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}' for k, v in r.items() if k not in ('kernel', 'n'))} |"
              for r in result["kernels"]]
    s = result["sampling"]
    lines += ["", f"sampling (A2, cfg 1.5, bf16): denoiser {s['denoiser_ms']:.1f} ms at batch {s['batch']} → "
                  f"{s['images_per_s_250_steps']:.2f} images/s at 250 steps"]
    write_result("gpu_check", result, "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
