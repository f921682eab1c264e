"""Memory of one DiT-XL/2 QAT step, as fixed + per-sample, so a user can choose a batch per device.

    python benchmarks/qat_memory.py                  # DiT-XL/2, 32×32×4 latents → results/qat_memory.json and .md
    python benchmarks/qat_memory.py --model toy --batches 1,2 --precisions fp32   # a check of the script

One process first builds the teacher (random DiT weights with adaLN-Zero's gates opened) and its student
(``build_student``: ``--preset`` at ``--act-bits``, SVD-initialised branches, minutes for DiT-XL/2 on a CPU)
and writes both to a temporary folder. Every configuration (precision × gradient checkpointing × batch) then
runs in a fresh process holding what `robuq qat` holds — the teacher (eval, no gradients), the student, the
loop's EMA copy and AdamW with both moments (created by a step on zero gradients, which leaves the weights
as they are) — and runs the loop's own step once (``robuq.train.trainer.train_step``: the distillation +
diffusion objective under ``--precision``, backward, clipping, AdamW, EMA). On CUDA the figure is
``torch.cuda.max_memory_allocated`` during that step; on the CPU it is the process's peak resident memory
(``VmHWM`` of /proc/self/status, reset to the current use through /proc/self/clear_refs just before the
step), which also counts the interpreter and PyTorch's libraries; the processes run with glibc's mmap
threshold fixed at 64 KiB (``MALLOC_ENV``) so that freed tensors leave the resident memory. peak = fixed +
per_sample · batch is fitted by least squares over the batches.

A configuration whose predicted peak exceeds the memory available (with ``--margin-gib`` to spare) is not
started and is recorded as skipped, so the script never pushes a shared machine into swapping or the
OOM killer.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from common import TOY, invocation, model_config, parse_config, write_result
from robuq.core.options import option


PREPARED = "prepared.json"

# glibc's malloc serves blocks under its mmap threshold from its heap and keeps them when freed; the
# threshold starts at 128 KiB and grows to 32 MiB once such a block is freed, so after loading DiT-XL/2
# (weights of 21 MiB) it kept 2.8 GiB of freed memory that later tensors reused, and the resident memory no
# longer followed the tensors alive. A fixed threshold returns every freed block of 64 KiB or more at once.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def available_gib() -> float:
    """MemAvailable of /proc/meminfo in GiB."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError("/proc/meminfo has no MemAvailable")


def prepare(spec: dict) -> None:
    """Write the teacher and its quantized student (``build_student``: SVD-initialised branches, the costly
    part, minutes for DiT-XL/2 on a CPU) once, for every configuration's process to load."""
    from robuq.core.files import save_tensors
    from robuq.io.quantized import save_quantized
    from robuq.models.dit import DiT
    from robuq.precision.presets import resolve_policy
    from robuq.train.qat import build_student

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    teacher = DiT(model_config(spec["model"], spec["input_size"]))
    with torch.no_grad():  # open adaLN-Zero's gates, so every block has gradients and activations as when trained
        for p in teacher.parameters():
            p.add_(0.02 * torch.randn_like(p))
    teacher.eval().requires_grad_(False)
    save_tensors(
        Path(spec["work"]) / "teacher.safetensors", teacher.state_dict(), {"model_config": teacher.config.to_dict()}
    )
    quantization = resolve_policy(spec["preset"], spec["act_bits"], None, None)
    save_quantized(build_student(teacher, quantization), Path(spec["work"]) / "student.safetensors", quantization)
    (Path(spec["work"]) / PREPARED).write_text(json.dumps(_model_spec(spec)) + "\n")


def _model_spec(spec: dict) -> dict:
    return {k: spec[k] for k in ("model", "input_size", "preset", "act_bits")}


def is_prepared(spec: dict) -> bool:
    """Whether ``spec["work"]`` already holds the teacher and student that ``spec`` asks for."""
    marker = Path(spec["work"]) / PREPARED
    return marker.is_file() and json.loads(marker.read_text()) == _model_spec(spec)


def measure(spec: dict) -> dict:
    """One configuration, in this process: load teacher and student, make the loop's EMA and AdamW, run the
    loop's step once; returns its peak memory in GiB and what the process held before it."""
    from robuq.diffusion.gaussian import create_diffusion
    from robuq.io.quantized import load_quantized
    from robuq.models.checkpoint import load_dit
    from robuq.train.qat import QATConfig, qat_objective
    from robuq.core.distributed import DistInfo
    from robuq.train.trainer import StepState, ema_and_optimizer, train_step

    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    cuda = device.type == "cuda"
    baseline = torch.cuda.memory_allocated() if cuda else _status_kib("VmRSS") * 1024
    config = QATConfig(
        precision=spec["precision"],
        grad_checkpoint=spec["grad_checkpoint"],
        lr=1e-5,
        warmup_steps=0,
        steps=2,
        global_batch_size=spec["batch"],
        device=spec["device"],
    )
    teacher = load_dit(Path(spec["work"]) / "teacher.safetensors").to(device).eval().requires_grad_(False)
    student = load_quantized(Path(spec["work"]) / "student.safetensors")[0].to(device).train()
    student.grad_checkpoint = spec["grad_checkpoint"]
    ema, optimizer = ema_and_optimizer(student, config)
    # AdamW's state as after a step, without the minutes of one: a step on zero gradients creates both moments
    # and, with Adam's update 0 / (√0 + ε) and no weight decay, leaves the weights as they are.
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # as the loop's step leaves them
    objective = qat_objective(create_diffusion(learn_sigma=True), teacher, "mix", 1.0)
    side = teacher.x_embedder.grid_size * teacher.patch_size
    g = torch.Generator().manual_seed(1)
    x = torch.randn(spec["batch"], teacher.in_channels, side, side, generator=g).to(device)
    y = torch.randint(0, teacher.num_classes, (spec["batch"],), generator=g).to(device)
    state = [t for m in (teacher, student, ema) for t in (*m.parameters(), *m.buffers())]
    state += [t for per_param in optimizer.state.values() for t in per_param.values() if torch.is_tensor(t)]
    tensors = sum(t.numel() * t.element_size() for t in state)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated()
    else:
        held = _status_kib("VmRSS") * 1024
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS, so the peak below is the step's own
    t0 = time.perf_counter()
    loss, _, _ = train_step(StepState(student, student, ema, optimizer, objective, config, DistInfo(), device), x, y, 1)
    if cuda:
        torch.cuda.synchronize()
    step_s = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if cuda else _status_kib("VmHWM") * 1024
    return {
        **{k: v for k, v in spec.items() if k != "work"},
        "peak_gib": peak / 2**30,
        "held_before_step_gib": held / 2**30,
        "tensors_gib": tensors / 2**30,
        "baseline_gib": baseline / 2**30,
        "student_params": sum(p.numel() for p in student.parameters()),
        "loss": float(loss.detach()),
        "step_s": step_s,
        "measure": "torch.cuda.max_memory_allocated" if cuda else "VmHWM (peak resident memory of the process)",
    }


def _subprocess(flag: str, spec: dict, timeout_s: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, __file__, flag, json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env={**os.environ, **MALLOC_ENV},
    )


def run_isolated(spec: dict, timeout_s: float) -> dict:
    """``measure(spec)`` in a fresh interpreter: the peak of one configuration, not of all before it."""
    done = _subprocess("--worker", spec, timeout_s)
    if done.returncode != 0:
        return {
            **spec,
            "failed": f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ''}",
        }
    return json.loads(done.stdout.strip().splitlines()[-1])


def fit(rows: list[dict]) -> dict | None:
    """peak = fixed + per_sample · batch by least squares over the measured rows (None under two batches)."""
    pts = [(r["batch"], r["peak_gib"]) for r in rows if "peak_gib" in r]
    if len({b for b, _ in pts}) < 2:
        return None
    n = len(pts)
    mb, mp = sum(b for b, _ in pts) / n, sum(p for _, p in pts) / n
    slope = sum((b - mb) * (p - mp) for b, p in pts) / sum((b - mb) ** 2 for b, _ in pts)
    return {"fixed_gib": mp - slope * mb, "per_sample_gib": slope, "batches": sorted(b for b, _ in pts)}


def bound(rows: list[dict]) -> dict | None:
    """With one batch measured, what it bounds: fixed ≥ what was held before the step, and per sample ≤
    what the step added (its gradients and temporaries counted as per-sample)."""
    measured = [r for r in rows if "peak_gib" in r]
    if len(measured) != 1:
        return None
    r = measured[0]
    return {
        "fixed_gib": r["held_before_step_gib"],
        "per_sample_gib": (r["peak_gib"] - r["held_before_step_gib"]) / r["batch"],
        "batches": [r["batch"]],
        "bound": True,
    }


def predicted_gib(rows: list[dict], batch: int) -> float | None:
    """What the fit of the rows measured so far predicts for ``batch`` (None when there is no fit yet)."""
    f = fit(rows)
    if f is not None:
        return f["fixed_gib"] + f["per_sample_gib"] * batch
    f = bound(rows)
    return None if f is None else f["fixed_gib"] + f["per_sample_gib"] * batch  # an upper bound


def rough_fixed_gib(model: str, input_size: int) -> float:
    """A lower bound before anything is measured: fp32 teacher + student + EMA + gradients + AdamW's two moments."""
    from robuq.models.dit import DiT

    with torch.device("meta"):  # shapes only, no memory
        params = sum(p.numel() for p in DiT(model_config(model, input_size)).parameters())
    return 6 * params * 4 / 2**30


PRECISIONS = ("fp32", "bf16")


@dataclass
class QATMemoryConfig:
    """Options of this benchmark."""

    model: str = option("DiT-XL/2", f"a registry name, or '{TOY}' to check the script in seconds")
    input_size: int = option(32, "latent side (32: 256-px images through the SD VAE)")
    batches: str | None = option(None, "per-device batches, comma-separated (default: 1,2 on the CPU, 4,8,16 on CUDA)")
    precisions: str = option(",".join(PRECISIONS), "precisions to measure, comma-separated")
    checkpointing: str = option("off,on", "per-block gradient checkpointing settings to measure, comma-separated")
    preset: str = option("robuq", "quantization preset of the student")
    act_bits: int = option(2, "activation bits of the student")
    device: str = option("auto", "'auto' (CUDA when there is one), 'cpu' or 'cuda'")
    threads: int = option(2, "CPU threads")
    margin_gib: float = option(2.0, "memory to leave free when deciding what to start")
    timeout_s: float = option(900.0, "limit of one configuration's process")
    work_dir: str | None = option(
        None,
        "build the teacher and student here, or reuse the ones an earlier run built here "
        "for the same --model/--preset/--act-bits (default: a temporary folder)",
    )
    results_dir: str | None = option(None, "where the JSON and Markdown go (default: results/)")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:  # this script's own child processes (run_isolated): one configuration each
        print(json.dumps(measure(json.loads(argv[1]))))
        return 0
    if argv[:1] == ["--prepare"]:
        prepare(json.loads(argv[1]))
        return 0
    args = parse_config(QATMemoryConfig, argv, __doc__)
    lists = {name: [v for v in getattr(args, name).split(",") if v] for name in ("precisions", "checkpointing")}
    for name, allowed in (("precisions", PRECISIONS), ("checkpointing", ("off", "on"))):
        if not lists[name] or set(lists[name]) - set(allowed):
            raise SystemExit(f"--{name} {getattr(args, name)}: give some of {','.join(allowed)}, comma-separated")
    args = dataclasses.replace(
        args,
        precisions=lists["precisions"],
        checkpointing=lists["checkpointing"],
        batches=[int(b) for b in args.batches.split(",")] if args.batches else None,
    )
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    batches = args.batches or ([1, 2] if device == "cpu" else [4, 8, 16])
    t0 = time.perf_counter()
    work = tempfile.TemporaryDirectory(prefix="qat_memory-") if args.work_dir is None else None
    common = {
        "model": args.model,
        "input_size": model_config(args.model, args.input_size).input_size,
        "preset": args.preset,
        "act_bits": args.act_bits,
        "threads": args.threads,
        "work": work.name if work else args.work_dir,
    }
    Path(common["work"]).mkdir(parents=True, exist_ok=True)
    if not is_prepared(common):
        made = _subprocess("--prepare", common, args.timeout_s)
        if made.returncode != 0:
            raise RuntimeError(f"building the teacher and student failed:\n{made.stderr[-3000:]}")
    rows, fits = [], []
    for precision in args.precisions:
        for checkpointing in args.checkpointing:
            group = []
            for batch in sorted(batches):
                spec = {
                    **common,
                    "batch": batch,
                    "precision": precision,
                    "grad_checkpoint": checkpointing == "on",
                    "device": device,
                }
                need = predicted_gib(group, batch) if group else None
                need = need if need is not None else rough_fixed_gib(args.model, args.input_size)
                free = available_gib() if device == "cpu" else torch.cuda.mem_get_info()[0] / 2**30
                if need + args.margin_gib > free:
                    row = {
                        **spec,
                        "skipped": f"predicted {need:.1f} GiB + {args.margin_gib:g} GiB margin > {free:.1f} GiB available",
                    }
                else:
                    row = run_isolated(spec, args.timeout_s)
                row.pop("work", None)
                print(json.dumps(row), flush=True)
                group.append(row)
            rows += group
            f = fit(group) or bound(group)
            if f is not None:
                fits.append({"precision": precision, "grad_checkpoint": checkpointing == "on", **f})
    result = {
        "model": args.model,
        "input_size": common["input_size"],
        "preset": args.preset,
        "act_bits": args.act_bits,
        "device": device,
        "rows": rows,
        "fits": fits,
        "seconds": time.perf_counter() - t0,
    }
    if work is not None:
        work.cleanup()
    write_result(
        "qat_memory",
        result,
        table(result),
        Path(args.results_dir) if args.results_dir else None,
        invocation(__file__, argv),
    )
    print(table(result))
    return 0


def table(result: dict) -> str:
    """The Markdown of a result: one line per configuration, then the fits, then what the figures are."""
    cpu = result["device"] == "cpu"
    what = "peak resident memory (GiB, VmHWM)" if cpu else "peak allocated (GiB)"
    lines = [
        f"{result['model']} QAT step ({result['preset']} A{result['act_bits']}, latents {result['input_size']}², "
        f"teacher + student + EMA + AdamW) on {result['device']}:",
        "",
        f"| precision | grad ckpt | batch | {what} | held before the step | tensors held (weights, EMA, AdamW) | step s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        head = f"| {r['precision']} | {'on' if r['grad_checkpoint'] else 'off'} | {r['batch']} |"
        if "peak_gib" in r:
            lines.append(
                f"{head} {r['peak_gib']:.2f} | {r['held_before_step_gib']:.2f} | {r['tensors_gib']:.2f} | {r['step_s']:.1f} |"
            )
        else:
            lines.append(f"{head} {r.get('skipped') or r.get('failed')} | | | |")
    lines += ["", "| precision | grad ckpt | fixed GiB | GiB per sample | from batches |", "|---|---|---|---|---|"]
    lines += [
        f"| {f['precision']} | {'on' if f['grad_checkpoint'] else 'off'} | {'≥ ' if f.get('bound') else ''}{f['fixed_gib']:.2f} | "
        f"{'≤ ' if f.get('bound') else ''}{f['per_sample_gib']:.3f} | {', '.join(map(str, f['batches']))} |"
        for f in result["fits"]
    ]
    if any(f.get("bound") for f in result["fits"]):
        lines += [
            "",
            "≥ / ≤: only one batch fitted, so the fixed part is at least what the process held before the step "
            "and the per-sample part at most all that the step added (its gradients and temporaries included).",
        ]
    if any("skipped" in r for r in result["rows"]):
        lines += [
            "",
            "A row marked 'predicted … > … available' was not started: by the figures measured before it, it "
            "would not have fitted in the memory this machine had free (with the margin), and the script does not "
            "push a shared machine into swapping or the OOM killer.",
        ]
    if cpu:
        lines += [
            "",
            "Step times are not a speed measurement: every tensor of 64 KiB or more is a fresh mmap here, so "
            "the page faults make a step several times slower than a normal run's.",
        ]
        lines += [
            "",
            "**These are host-memory figures of a CPU run, not GPU figures.** On a GPU the script reports "
            "`torch.cuda.max_memory_allocated` instead, which differs: it counts tensors only (no interpreter, "
            "libraries or allocator slack, which VmHWM includes), while the GPU process also needs what it "
            "leaves out: the CUDA context and cuBLAS workspaces (about 0.5–1 GiB), the caching allocator's "
            "reserve and fragmentation (`nvidia-smi` shows more than the figure), and under DDP each GPU's "
            "gradient buckets (about one more copy of the gradients). The operations are the same (the "
            "student's quantized attention materialises its score matrices on both), but cuBLAS and oneDNN "
            "keep different temporaries, so per-sample figures can differ by a few per cent.",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
