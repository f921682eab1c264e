"""The GPU check of the paper's setting, built for a machine lent once, for minutes: is robuq correct, fast,
and does DiT-XL/2 QAT fit?

    python benchmarks/gpu_check.py --out results/gpu_check --budget-s 480     # on the GPU machine
    python benchmarks/gpu_check.py --device cpu --tiny --out /tmp/check        # the same sections, tiny, on a CPU

Sections run in order of value, each guarded: an error is recorded with its traceback and the next section
runs; each has its own time limit; each writes ``OUT/<section>.json`` and ``.md`` the moment it ends; the
run stops cleanly before ``--budget-s``; ``OUT/summary.md`` answers "correct, fast, fits" from what ran,
and ``OUT/stdout.txt`` keeps everything printed.

1. ``kernels_correct``: the Triton kernels (on a CPU: robuq's C back-ends) against float64 references that
   never enter a kernel, at DiT-XL/2's widths and the families' (PixArt-Σ, SD3.5, FLUX, Sana): the error is
   the largest difference relative to the reference's largest magnitude, which stays meaningful near zero.
2. ``kernels_fast``: each kernel against the PyTorch code training would run without it, with the pass
   threshold (the kernel at least as fast) written in the file.
3. ``qat_step``: one QAT step of DiT-XL/2 (RobuQ A2, the default ``mix`` loss, EMA, inside DDP with its
   gradient buckets) in bf16, with and without gradient checkpointing, at two batch sizes: time and peak
   memory, and the fit peak = fixed + per-sample · batch.
4. ``sampling``: denoiser calls per second of the quantized DiT-XL/2 with guidance, in bf16.
5. ``flux_block``: one FLUX.1 double-stream block at its real width quantized with RobuQ: a QAT step's
   time and peak memory at 1,024 image + 512 text tokens.
6. ``nccl``: with two or more GPUs, one 2-rank DDP QAT step over NCCL (skipped on one GPU).
7. ``triton_tests``: tests/test_kernels_triton.py on the device, its whole output kept.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from common import ROOT, machine, parse_config, time_ms
from robuq.core.options import option

# Widths of the families' block-linear inputs the kernels must handle (the paper's DiT-XL/2 first).
WIDTHS = (1152, 4608, 1536, 2432, 3072, 12288, 2240, 5600)
TINY_WIDTHS = (192, 2240)


@dataclass
class GPUCheckConfig:
    """Options of this benchmark."""

    out: str = option(
        str(ROOT / "results" / "gpu_check"),
        "folder for each section's JSON and Markdown, the summary and the whole stdout",
    )
    budget_s: float = option(
        480.0, "stop starting sections once this many seconds have passed (each section also has its own limit)"
    )
    device: str = option("cuda", "cuda, or cpu for a rehearsal of every section (with --tiny)", choices=("cuda", "cpu"))
    tiny: bool = option(False, "tiny models and shapes everywhere (a CPU rehearsal, and the tests)", cli=True)
    batches: str = option("8,32", "two QAT batch sizes, comma-separated (for the memory fit)")
    sample_batch: int = option(64, "images per sampling forward")
    tests: bool = option(True, "run tests/test_kernels_triton.py on the device (--no-tests skips it)")


# ------------------------------------------------------------------------------------------------ sections


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    """max |out − ref| / max |ref|: an error relative to the reference's scale, meaningful where ref ≈ 0."""
    return float((out.double() - reference.double()).abs().max() / reference.double().abs().max().clamp_min(1e-30))


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
    out = (
        scale.double()[:, None] * acc * alpha.double()[None, :]
        + offset.double()[:, None] * level_sums_alpha.double()[None, :]
    )
    return (out + bias.double()[None, :]).float()


def _kernel_ops(device: torch.device):
    """(hadamard, hadamard_quantize, lowbit_matmul or None, name): Triton's on a GPU, the registered CPU
    back-ends (robuq's C kernels) on a CPU."""
    if device.type == "cuda":
        from robuq.kernels import triton_ops

        return (
            triton_ops.hadamard,
            lambda x, s: triton_ops.hadamard_quantize(x, s, 2, "gaussian", None)[1:],
            triton_ops,
            "triton",
        )
    from robuq.quant.activation import activation_levels
    from robuq.quant.hadamard import hadamard_transform

    def fused(x, s):
        q = activation_levels(hadamard_transform(x, s), 2, "token", "gaussian")
        return q.levels, q.scale.squeeze(1), q.offset

    return hadamard_transform, fused, None, "robuq CPU back-ends"


def kernels_correct(config: GPUCheckConfig, device: torch.device) -> dict:
    from robuq.core import quantizer_spec as spec
    from robuq.quant.hadamard import random_signs

    hadamard, fused, triton, name = _kernel_ops(device)
    rows, tokens = [], 64 if config.tiny else 4096
    for n in TINY_WIDTHS if config.tiny else WIDTHS:
        x = torch.randn(tokens, n, device=device)
        signs = random_signs(n).to(device)
        ref = hadamard_reference(x, signs)
        rows.append(
            {
                "kernel": f"hadamard ({name})",
                "n": n,
                "relative_error": relative_error(hadamard(x, signs), ref),
                "threshold": 1e-5,
            }
        )
        levels, scale, _ = fused(x, signs)
        own = quantize_reference(ref, 2, "gaussian")
        shift = spec.int8_level_shift(2) if triton is not None else 0
        differing = float((levels.float() != (own.levels - shift).float()).float().mean())
        rows.append(
            {
                "kernel": f"hadamard + quantize A2 ({name})",
                "n": n,
                "levels_differing_fraction": differing,
                "scale_relative_error": relative_error(scale, own.scale.squeeze(1)),
                "threshold": 1e-3,
            }
        )
    if triton is not None:
        m, k, n = (64, 192, 96) if config.tiny else (4096, 1152, 4608)
        g = torch.Generator(device="cpu").manual_seed(0)
        levels = torch.randint(0, 4, (m, k), generator=g, dtype=torch.int8).to(device)
        ternary = torch.randint(-1, 2, (k, n), generator=g, dtype=torch.int8).to(device)
        scale, offset = torch.rand(m, device=device) + 0.5, torch.randn(m, device=device)
        alpha, bias = torch.rand(n, device=device) + 0.5, torch.randn(n, device=device)
        sums = ternary.float().sum(dim=0) * alpha
        ref = lowbit_reference(levels, ternary, scale, offset, alpha, sums, bias)
        for packed in (False, True):
            weight = triton.pack_ternary_columns(ternary) if packed else ternary
            out = triton.lowbit_matmul(levels, weight, packed, scale, offset, alpha, sums, bias)
            rows.append(
                {
                    "kernel": f"lowbit_matmul {'packed ternary' if packed else 'int8'} ({name})",
                    "n": n,
                    "relative_error": relative_error(out, ref),
                    "threshold": 1e-5,
                }
            )
    for r in rows:
        worst = max(
            r.get("relative_error", 0.0), r.get("scale_relative_error", 0.0), r.get("levels_differing_fraction", 0.0)
        )
        r["pass"] = worst <= r["threshold"]
    return {"rows": rows, "pass": all(r["pass"] for r in rows)}


def kernels_fast(config: GPUCheckConfig, device: torch.device) -> dict:
    """Each kernel against the PyTorch path it replaces, on the same inputs; pass: speed-up ≥ 1."""
    from robuq.quant.activation import activation_levels
    from robuq.quant.hadamard import _normalised_transform, random_signs

    hadamard, fused, triton, name = _kernel_ops(device)
    sync = "cuda" if device.type == "cuda" else "cpu"
    rows, tokens = [], 64 if config.tiny else 4096

    def torch_hadamard(x, s):
        return _normalised_transform(x * s)

    for n in TINY_WIDTHS if config.tiny else (1152, 4608, 3072, 12288):
        x = torch.randn(tokens, n, device=device)
        signs = random_signs(n).to(device)
        pairs = {
            "hadamard": (lambda: hadamard(x, signs), lambda: torch_hadamard(x, signs)),
            "hadamard + quantize A2": (
                lambda: fused(x, signs),
                lambda: activation_levels(torch_hadamard(x, signs), 2, "token", "gaussian"),
            ),
        }
        for kernel, (ours, theirs) in pairs.items():
            ms, torch_ms = time_ms(ours, 5, 2, device=sync), time_ms(theirs, 5, 2, device=sync)
            rows.append(
                {
                    "kernel": f"{kernel} ({name})",
                    "against": "PyTorch (Kronecker matmuls, PyTorch quantizer)",
                    "n": n,
                    "ms": ms,
                    "torch_ms": torch_ms,
                    "speedup": torch_ms / ms,
                    "threshold": 1.0,
                    "pass": torch_ms / ms >= 1.0,
                }
            )
    return {"rows": rows, "pass": all(r["pass"] for r in rows)}


def _setup_single_process_group(device: torch.device):
    import os

    import torch.distributed as dist

    if dist.is_initialized():
        return False
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29600 + os.getpid() % 1000))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    return True


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


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def qat_step(config: GPUCheckConfig, device: torch.device) -> dict:
    """A DDP-wrapped student (gradient buckets as views), the default mix loss, AdamW and an EMA updated with
    torch._foreach ops: the memory training really holds."""
    from torch.nn.parallel import DistributedDataParallel

    from robuq.diffusion.gaussian import create_diffusion
    from robuq.train.qat import qat_objective

    model, size = ("DiT-T/8", 16) if config.tiny else ("DiT-XL/2", 32)
    batches = (2, 4) if config.tiny else tuple(int(b) for b in config.batches.split(","))
    teacher, student = qat_pair(model, device, size)
    ema = [p.detach().clone() for p in student.parameters()]
    own_group = _setup_single_process_group(device)
    try:
        wrapped = DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True
        )
        objective = qat_objective(create_diffusion(learn_sigma=True), teacher, "mix", 1.0)
        optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-5)
        rows = []
        for checkpoint in (False, True):
            student.grad_checkpoint = checkpoint
            pair = []
            for batch in batches:
                x = torch.randn(batch, 4, size, size, device=device)
                y = torch.randint(0, 1000, (batch,), device=device)

                def step() -> None:
                    optimizer.zero_grad(set_to_none=True)
                    with _autocast(device):
                        loss = objective(wrapped, x, y, torch.Generator().manual_seed(0))["loss"].float().mean()
                    loss.backward()
                    optimizer.step()
                    with torch.no_grad():
                        torch._foreach_lerp_(ema, [p.detach() for p in student.parameters()], 1 - 0.9999)

                step()  # the first step allocates the optimizer state
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                    torch.cuda.reset_peak_memory_stats(device)
                ms = time_ms(step, repeats=3, warmup=1, device="cuda" if device.type == "cuda" else "cpu")
                pair.append(
                    {
                        "model": model,
                        "batch": batch,
                        "grad_checkpoint": checkpoint,
                        "step_ms": ms,
                        "images_per_s": batch / ms * 1e3,
                        "peak_gib": _peak_gib(device),
                        "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
                        "loss": "mix",
                        "ema": True,
                        "ddp": "gradient_as_bucket_view",
                    }
                )
            if pair[0]["peak_gib"] is not None:
                per_sample = (pair[1]["peak_gib"] - pair[0]["peak_gib"]) / (batches[1] - batches[0])
                for r in pair:
                    r.update(per_sample_gib=per_sample, fixed_gib=pair[0]["peak_gib"] - per_sample * batches[0])
            rows += pair
    finally:
        if own_group:
            torch.distributed.destroy_process_group()
    total = torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else None
    fits = None
    if total and rows[-1].get("per_sample_gib") is not None:
        ckpt = rows[-1]
        fits = {
            "gpu_gib": total,
            "largest_batch_with_checkpointing": int(
                (0.9 * total - ckpt["fixed_gib"]) / max(ckpt["per_sample_gib"], 1e-6)
            ),
        }
    return {"rows": rows, "fits": fits}


def sampling(config: GPUCheckConfig, device: torch.device) -> dict:
    from robuq.core.runtime import precision_context
    from robuq.models.dit import create_dit
    from robuq.precision.policy import quantize_
    from robuq.precision.presets import resolve_policy
    from robuq.sample.generate import guided

    model_name, size, batch = ("DiT-T/8", 16, 2) if config.tiny else ("DiT-XL/2", 32, config.sample_batch)
    torch.manual_seed(0)
    model = quantize_(create_dit(model_name, input_size=size).to(device), resolve_policy("robuq", 2, None, None)).eval()
    denoise = guided(model, 1.5, cfg_channels=3)
    x = torch.randn(batch, 4, size, size, device=device)
    t = torch.full((batch,), 500, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    precision = "bf16" if device.type == "cuda" else "fp32"
    with torch.no_grad(), precision_context(precision, device):  # what `robuq sample --precision bf16` runs under
        ms = time_ms(lambda: denoise(x, t, y), repeats=5, warmup=2, device="cuda" if device.type == "cuda" else "cpu")
    return {
        "model": model_name,
        "batch": batch,
        "precision": precision,
        "denoiser_ms": ms,
        "images_per_s_250_steps": batch / (ms * 250) * 1e3,
    }


def flux_block(config: GPUCheckConfig, device: torch.device) -> dict:
    """One FLUX.1 double block at width 3,072 (tiny: 32), quantized with RobuQ A4: a training step."""
    import diffusers

    import robuq
    from robuq.models.families import run_model
    from robuq.models.families.flux import packed_inputs

    kwargs = dict(num_layers=1, num_single_layers=0)
    if config.tiny:
        kwargs.update(
            num_attention_heads=2,
            attention_head_dim=16,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            axes_dims_rope=(4, 4, 8),
            in_channels=4,
        )
    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(**kwargs).to(device)
    robuq.quantize_(model, robuq.preset("robuq", act_bits=4), initialize=not config.tiny)
    model.train()
    image, text = (16, 8) if config.tiny else (1024, 512)
    inputs = packed_inputs(model, 1, image, text)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device):
            loss = run_model(model, inputs).float().pow(2).mean()
        loss.backward()
        optimizer.step()

    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    ms = time_ms(step, repeats=3, warmup=1, device="cuda" if device.type == "cuda" else "cpu")
    return {
        "block": "FLUX.1 double block",
        "width": model.inner_dim,
        "tokens": [image, text],
        "step_ms": ms,
        "peak_gib": _peak_gib(device),
    }


def nccl(config: GPUCheckConfig, device: torch.device) -> dict:
    if device.type != "cuda" or torch.cuda.device_count() < 2:
        return {"skipped": "needs two GPUs"}
    script = (
        "import torch, torch.distributed as dist, os\n"
        "dist.init_process_group('nccl'); r = dist.get_rank(); torch.cuda.set_device(r)\n"
        "x = torch.ones(1 << 20, device='cuda') * (r + 1); dist.all_reduce(x)\n"
        "assert float(x[0]) == 3.0, float(x[0]); print('ok', r)\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return {"returncode": done.returncode, "output": (done.stdout + done.stderr)[-4000:], "pass": done.returncode == 0}


def triton_tests(config: GPUCheckConfig, device: torch.device) -> dict:
    """tests/test_kernels_triton.py on this GPU, with its whole output (a CPU rehearsal runs it too: it skips)."""
    if not config.tests:
        return {"skipped": "--no-tests"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(ROOT / "tests" / "test_kernels_triton.py"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    return {
        "returncode": done.returncode,
        "output": done.stdout + done.stderr,
        "summary": (done.stdout.strip().splitlines() or [""])[-1],
        "pass": done.returncode == 0,
    }


# (name, function, its own time limit in seconds), in order of value.
SECTIONS = [
    ("kernels_correct", kernels_correct, 90),
    ("kernels_fast", kernels_fast, 90),
    ("qat_step", qat_step, 180),
    ("sampling", sampling, 60),
    ("flux_block", flux_block, 90),
    ("nccl", nccl, 130),
    ("triton_tests", triton_tests, 250),
]


# ------------------------------------------------------------------------------------------------ runner


class SectionTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise SectionTimeout in the main thread after ``seconds`` (a section stuck in a kernel launch or compile)."""

    def expire(signum, frame):
        raise SectionTimeout(f"over its {seconds:.0f} s limit")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Tee:
    """Everything printed, to the terminal and to OUT/stdout.txt."""

    def __init__(self, stream, path: Path):
        self.stream, self.file = stream, open(path, "a")

    def write(self, text: str) -> int:
        self.file.write(text)
        self.file.flush()
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()
        self.file.flush()


def section_markdown(name: str, result: dict) -> str:
    lines = [f"# gpu_check: {name}", "", f"status: **{result['status']}** ({result['seconds']:.1f} s)", ""]
    if result["status"] == "error":
        lines += ["```", result["traceback"].rstrip(), "```"]
    for row in result.get("result", {}).get("rows", []):
        lines.append("- " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    extra = {k: v for k, v in result.get("result", {}).items() if k not in ("rows", "output")}
    if extra:
        lines += ["", "```json", json.dumps(extra, indent=2, default=str), "```"]
    return "\n".join(lines) + "\n"


def verdicts(results: dict[str, dict]) -> dict[str, str]:
    """Correct, fast, fits: from the sections that ran ("not measured" where a section did not finish)."""

    def read(name: str, ok) -> str:
        r = results.get(name)
        if r is None or r["status"] != "ok":
            return f"not measured ({r['status'] if r else 'not run'})"
        return ok(r["result"])

    return {
        "correct": read("kernels_correct", lambda r: "yes" if r["pass"] else "NO: see kernels_correct.md"),
        "fast": read("kernels_fast", lambda r: "yes" if r["pass"] else "not everywhere: see kernels_fast.md"),
        "fits": read(
            "qat_step",
            lambda r: (
                f"batch ≤ {r['fits']['largest_batch_with_checkpointing']} per GPU with checkpointing"
                if r.get("fits")
                else "no GPU memory figure (CPU)"
            ),
        ),
    }


def main(argv: list[str] | None = None) -> int:
    config = parse_config(GPUCheckConfig, argv, __doc__)
    if config.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; skipped (nothing written). --device cpu --tiny rehearses every section.")
        return 0
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda", torch.cuda.current_device()) if config.device == "cuda" else torch.device("cpu")
    start = time.perf_counter()
    results: dict[str, dict] = {}
    old_stdout = sys.stdout
    sys.stdout = Tee(old_stdout, out / "stdout.txt")
    try:
        print(f"gpu_check on {device}: machine {json.dumps(machine())}", flush=True)
        for name, run, limit in SECTIONS:
            left = config.budget_s - (time.perf_counter() - start)
            if left < min(limit, 20):
                results[name] = {"status": "skipped", "reason": f"budget: {left:.0f} s left", "seconds": 0.0}
            else:
                t0 = time.perf_counter()
                try:
                    with time_limit(min(limit, left)):
                        results[name] = {"status": "ok", "result": run(config, device)}
                except Exception as error:  # noqa: BLE001 - every failure is a result; the next section runs
                    results[name] = {
                        "status": "error",
                        "error": f"{type(error).__name__}: {error}",
                        "traceback": traceback.format_exc(),
                    }
                results[name]["seconds"] = time.perf_counter() - t0
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            (out / f"{name}.json").write_text(json.dumps(results[name], indent=2, default=str) + "\n")
            (out / f"{name}.md").write_text(section_markdown(name, results[name]))
            print(f"gpu_check: {name}: {results[name]['status']} ({results[name]['seconds']:.1f} s)", flush=True)
        answer = verdicts(results)
        summary = {
            "device": str(device),
            "tiny": config.tiny,
            "seconds": time.perf_counter() - start,
            "verdicts": answer,
            "sections": {n: r["status"] for n, r in results.items()},
            "machine": machine(),
            "command": " ".join(
                [Path(sys.executable).name, *(sys.argv if argv is None else ["benchmarks/gpu_check.py", *argv])]
            ),
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        (out / "summary.md").write_text(
            "# gpu_check\n\n"
            + "\n".join(f"- **{k}**: {v}" for k, v in answer.items())
            + "\n\n"
            + "\n".join(f"- {n}: {s}" for n, s in summary["sections"].items())
            + "\n"
        )
        print(json.dumps(answer, indent=2), flush=True)
    finally:
        sys.stdout = old_stdout
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
