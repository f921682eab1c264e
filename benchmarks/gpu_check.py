"""The GPU check of the paper's setting (≤ 8 minutes on one H100/H200): DiT-XL/2 QAT steps, kernels, sampling.

    python benchmarks/gpu_check.py            # → results/gpu_check.json and .md; on a machine without CUDA it skips

1. One QAT step of DiT-XL/2 (256 px: 32×32×4 latents, RobuQ A2 student in training mode, distillation loss,
   the fp teacher under no_grad) in bf16 autocast, with and without per-block gradient checkpointing, at two
   batch sizes: step time, images/s, peak memory, and the fit peak = fixed + per_sample · batch that lets a
   user choose a batch per GPU.
2. The Triton kernels against references that never enter a kernel (a dense matmul with the Hadamard
   matrix, the PyTorch quantizer, a float64 matmul for the low-bit GEMM) on DiT-XL/2 shapes: Hadamard
   transform (1152, 4608), the fused Hadamard + activation quantizer, the int8 and packed-ternary
   ``lowbit_matmul``; largest difference and time. Then tests/test_kernels_triton.py run on the device.
3. Sampling throughput of the quantized DiT-XL/2 with guidance (denoiser calls per second → images/s at
   250 DDPM steps), in bf16 as `robuq sample --precision bf16` runs it.

Each figure in the JSON names the kernel and the precision it used. Under torchrun every rank runs the check
on its own GPU and writes results/gpu_check-rank<R>.json (rank 0: results/gpu_check.json).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from common import parse_config, time_ms, write_result
from robuq.core.options import option


def _qat_step_stats(student, teacher, objective, optimizer, batch: int, checkpoint: bool) -> dict:
    student.grad_checkpoint = checkpoint
    device = next(student.parameters()).device
    x = torch.randn(batch, 4, 32, 32, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)

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
    return {"batch": batch, "grad_checkpoint": checkpoint, "training_mode": student.training, "precision": "bf16 autocast",
            "step_ms": ms, "images_per_s": batch / ms * 1e3, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def qat_pair(name: str, device: torch.device, input_size: int = 32):
    """(frozen teacher, RobuQ A2 student in training mode) of a random ``name`` DiT on ``device``."""
    from robuq.models.dit import create_dit
    from robuq.precision.presets import resolve_policy
    from robuq.train.qat import build_student

    torch.manual_seed(0)
    teacher = create_dit(name, input_size=input_size).to(device).eval().requires_grad_(False)
    with torch.no_grad():  # open adaLN-Zero's gates so gradients reach every block, as in a trained checkpoint
        for p in teacher.parameters():
            p.add_(0.02 * torch.randn_like(p))
    # The student is a copy of the eval-mode teacher: without .train() DiT.forward would never checkpoint.
    return teacher, build_student(teacher, resolve_policy("robuq", 2, None, None)).train()


def qat_steps(batches: tuple[int, int], device: torch.device) -> list[dict]:
    from robuq.diffusion.gaussian import create_diffusion
    from robuq.train.qat import qat_objective

    teacher, student = qat_pair("DiT-XL/2", device)
    objective = qat_objective(create_diffusion(learn_sigma=True), teacher, "distill", 1.0)
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-5)
    rows = []
    for checkpoint in (False, True):
        pair = [_qat_step_stats(student, teacher, objective, optimizer, b, checkpoint) for b in batches]
        per_sample = (pair[1]["peak_gib"] - pair[0]["peak_gib"]) / (batches[1] - batches[0])
        for r in pair:
            r.update(per_sample_gib=per_sample, fixed_gib=pair[0]["peak_gib"] - per_sample * batches[0])
        rows += pair
    return rows


def hadamard_reference(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """robuq's transform as a dense float64 matmul with the Hadamard matrix: no robuq kernel, no back-end."""
    from robuq.core.hadamard_matrices import hadamard_matrix

    h = hadamard_matrix(x.shape[-1]).to(device=x.device, dtype=torch.float64)
    return ((x.double() * signs.double()) @ h.T).float()


def quantize_reference(rotated: torch.Tensor, bits: int, rule: str):
    """Per-token levels of already-rotated activations by the PyTorch quantizer (no kernel)."""
    from robuq.quant.activation import activation_levels

    return activation_levels(rotated, bits, "token", rule)


def lowbit_reference(levels, weight_levels, scale, offset, alpha, level_sums_alpha, bias) -> torch.Tensor:
    """s·(q Lᵀ)·α + o·(ΣL·α) + b in float64 (cuBLAS or the CPU's matmul, not robuq's kernel)."""
    acc = levels.double() @ weight_levels.double()
    out = scale.double()[:, None] * acc * alpha.double()[None, :] + offset.double()[:, None] * level_sums_alpha.double()[None, :]
    return (out + bias.double()[None, :]).float()


def kernels(device: torch.device) -> list[dict]:
    from robuq.core import quantizer_spec as spec
    from robuq.kernels import triton_ops
    from robuq.quant.hadamard import random_signs

    rows = []
    for n in (1152, 4608):
        if triton_ops.device_split(n, device) is None:
            rows.append({"kernel": "hadamard", "n": n, "skipped": "no Triton split fits this GPU's shared memory"})
            continue
        x = torch.randn(4096, n, device=device)
        signs = random_signs(n).to(device)
        ref = hadamard_reference(x, signs)
        rows.append({"kernel": "hadamard (triton)", "reference": "dense float64 matmul", "precision": "fp32", "n": n,
                     "max_abs_diff": float((triton_ops.hadamard(x, signs) - ref).abs().max()),
                     "triton_ms": time_ms(lambda: triton_ops.hadamard(x, signs), device="cuda"),
                     "reference_ms": time_ms(lambda: hadamard_reference(x, signs), device="cuda")})
        _, levels, scale, offset = triton_ops.hadamard_quantize(x, signs, 2, "gaussian", None)
        own = quantize_reference(ref, 2, "gaussian")
        differing = (levels.float() != own.levels - spec.int8_level_shift(2)).float().mean()
        rows.append({"kernel": "hadamard_quantize A2 (triton)", "reference": "dense matmul + PyTorch quantizer",
                     "precision": "fp32", "n": n, "levels_differing_fraction": float(differing),
                     "max_scale_rel_diff": float(((scale - own.scale.squeeze(1)) / own.scale.squeeze(1)).abs().max()),
                     "triton_ms": time_ms(lambda: triton_ops.hadamard_quantize(x, signs, 2, "gaussian", None), device="cuda"),
                     "reference_ms": time_ms(lambda: quantize_reference(hadamard_reference(x, signs), 2, "gaussian"),
                                             device="cuda")})
    m, k, n = 4096, 1152, 4608
    g = torch.Generator(device="cpu").manual_seed(0)
    levels = torch.randint(0, 4, (m, k), generator=g, dtype=torch.int8).to(device)
    ternary = torch.randint(-1, 2, (k, n), generator=g, dtype=torch.int8).to(device)
    scale, offset = torch.rand(m, device=device) + 0.5, torch.randn(m, device=device)
    alpha, bias = torch.rand(n, device=device) + 0.5, torch.randn(n, device=device)
    sums = ternary.float().sum(dim=0) * alpha
    ref = lowbit_reference(levels, ternary, scale, offset, alpha, sums, bias)
    for packed in (False, True):
        weight = triton_ops.pack_ternary_columns(ternary) if packed else ternary
        run = lambda: triton_ops.lowbit_matmul(levels, weight, packed, scale, offset, alpha, sums, bias)  # noqa: E731
        rows.append({"kernel": f"lowbit_matmul {'packed ternary' if packed else 'int8'} (triton)",
                     "reference": "float64 matmul", "precision": "int8 × int8 → int32, fp32 epilogue", "n": n,
                     "max_rel_diff": float(((run() - ref).abs() / ref.abs().clamp_min(1e-3)).max()),
                     "triton_ms": time_ms(run, device="cuda"),
                     "reference_ms": time_ms(lambda: lowbit_reference(levels, ternary, scale, offset, alpha, sums, bias),
                                             device="cuda")})
    return rows


def triton_tests() -> dict:
    """tests/test_kernels_triton.py on this GPU: the kernels' exactness tests, compiled for the device."""
    import subprocess
    import sys

    from common import ROOT

    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_kernels_triton.py")],
                          cwd=ROOT, capture_output=True, text=True)
    return {"returncode": done.returncode, "summary": (done.stdout.strip().splitlines() or [""])[-1]}


def sampling(batch: int, device: torch.device) -> dict:
    from robuq.models.dit import create_dit
    from robuq.precision.presets import resolve_policy
    from robuq.precision.policy import quantize_
    from robuq.core.runtime import precision_context
    from robuq.sample.generate import guided

    torch.manual_seed(0)
    model = quantize_(create_dit("DiT-XL/2", input_size=32).to(device), resolve_policy("robuq", 2, None, None)).eval()
    denoise = guided(model, 1.5, cfg_channels=3)
    x = torch.randn(batch, 4, 32, 32, device=device)
    t = torch.full((batch,), 500, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    with torch.no_grad(), precision_context("bf16", device):  # what `robuq sample --precision bf16` runs under
        ms = time_ms(lambda: denoise(x, t, y), repeats=5, warmup=2, device="cuda")
    return {"batch": batch, "precision": "bf16 autocast (quantizer in fp32)", "denoiser_ms": ms,
            "images_per_s_250_steps": batch / (ms * 250) * 1e3}


@dataclass
class GPUCheckConfig:
    """Options of this benchmark."""

    batches: str = option("8,32", "two QAT batch sizes, comma-separated (for the memory fit)")
    sample_batch: int = option(64, "images per sampling forward")
    tests: bool = option(True, "run tests/test_kernels_triton.py on the device (--no-tests skips it)")


def main(argv: list[str] | None = None) -> int:
    config = parse_config(GPUCheckConfig, argv, __doc__)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; skipped (nothing written)")
        return 0
    import os

    rank = int(os.environ.get("RANK", "0"))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    t0 = time.perf_counter()
    with torch.cuda.device(device):
        batches = tuple(int(b) for b in config.batches.split(","))
        result = {"device": torch.cuda.get_device_name(device), "rank": rank, "qat": qat_steps(batches, device)}
        torch.cuda.empty_cache()
        result["kernels"] = kernels(device)
        result["sampling"] = sampling(config.sample_batch, device)
        if rank == 0 and config.tests:
            result["triton_tests"] = triton_tests()
    result["seconds"] = time.perf_counter() - t0
    lines = ["| batch | grad ckpt | step ms | img/s | peak GiB | fixed GiB | GiB/sample |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['batch']} | {r['grad_checkpoint']} | {r['step_ms']:.0f} | {r['images_per_s']:.1f} | {r['peak_gib']:.1f} | "
              f"{r['fixed_gib']:.1f} | {r['per_sample_gib']:.2f} |" for r in result["qat"]]
    lines += ["", "| kernel | n | result |", "|---|---|---|"]
    lines += [f"| {r['kernel']} | {r['n']} | {', '.join(f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}' for k, v in r.items() if k not in ('kernel', 'n'))} |"
              for r in result["kernels"]]
    if "triton_tests" in result:
        lines += ["", f"tests/test_kernels_triton.py on the device: {result['triton_tests']['summary']}"]
    s = result["sampling"]
    lines += ["", f"sampling (A2, cfg 1.5, bf16): denoiser {s['denoiser_ms']:.1f} ms at batch {s['batch']} → "
                  f"{s['images_per_s_250_steps']:.2f} images/s at 250 steps"]
    write_result("gpu_check" if rank == 0 else f"gpu_check-rank{rank}", result, "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
