"""What every benchmark records beside its numbers: the machine, the exact command and the date."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from robuq.models.dit import DiT, DiTConfig, dit_config

ROOT = Path(__file__).resolve().parents[1]

# Not a model anyone measures: two 48-wide blocks on 8×8 latents, so that a test runs a benchmark script
# end to end in seconds (tests/test_benchmarks.py) while the real sizes stay the scripts' defaults.
TOY = "toy"


def model_config(name: str, input_size: int = 32) -> DiTConfig:
    """The DiTConfig of a registry name ("DiT-S/2", …) at ``input_size`` latent pixels, or the ``TOY`` one."""
    if name == TOY:
        return DiTConfig(input_size=8, hidden_size=48, depth=2, num_heads=2)
    return dit_config(name, input_size)


def create_model(name: str, input_size: int = 32) -> DiT:
    """A randomly initialised DiT of ``model_config(name, input_size)``."""
    return DiT(model_config(name, input_size))


# Environment variables that hold PyTorch, oneDNN, MKL, fbgemm or robuq below what the CPU can do: a run
# that sets them measured a forced, not a native, setting.
FORCING = (
    "ATEN_CPU_CAPABILITY",
    "ONEDNN_MAX_CPU_ISA",
    "MKL_ENABLE_INSTRUCTIONS",
    "FBGEMM_ENABLE_INSTRUCTIONS",
    "ROBUQ_MARCH",
    "ROBUQ_GEMM",
    "ROBUQ_NATIVE",
)


# The CPU settings the speed benchmarks measure under, as environment variables of a fresh process (PyTorch
# reads its capability once, at import): the CPU as it is, and everything held to AVX2 with robuq's C kernels
# built for Haswell, which is what an AVX2-only CPU runs, on this CPU's cores.
CPU_SETTINGS = {
    "native": {},
    "avx2-forced": {
        "ATEN_CPU_CAPABILITY": "avx2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2",
        "ROBUQ_MARCH": "haswell",
    },
}


def setting_environment(setting: str) -> dict[str, str]:
    """This process's environment with ``setting``'s variables in place of any forcing ones it had."""
    forcing = set(CPU_SETTINGS["avx2-forced"])
    return {**{k: v for k, v in os.environ.items() if k not in forcing}, **CPU_SETTINGS[setting]}


def machine() -> dict:
    """The machine a result was measured on: CPU model and the instruction sets that decide integer speed,
    PyTorch's CPU capability, robuq's GEMM path, and any setting that forced them below the CPU's own."""
    from robuq.deploy import gemm

    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_model": gemm.cpu_model(),
        "cpu_isa": sorted(gemm.cpu_flags()),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        # the path of layers the lookup cannot take, and of ternary layers at 3 bits (measured where it must be)
        "robuq_gemm": {
            **gemm.cpu_capability().to_dict(),
            "chosen": gemm.auto_path(),
            "chosen_ternary_a3": gemm.auto_path(lookup_top=7),
        },
        "forced": {k: os.environ[k] for k in FORCING if k in os.environ},
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def time_ms(
    fn: Callable[[], object], repeats: int = 7, warmup: int = 2, device: str = "cpu", clock: str = "wall"
) -> float:
    """Median time of ``fn`` in milliseconds (median: the machine is shared and noisy): wall time, or with
    ``clock="cpu"`` the process's CPU time, which other processes on a crowded machine do not inflate (at
    one thread it is the latency the machine alone would give)."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    now = time.process_time if clock == "cpu" else time.perf_counter
    for _ in range(warmup):
        fn()
    sync()
    samples = []
    for _ in range(repeats):
        t0 = now()
        fn()
        sync()
        samples.append((now() - t0) * 1e3)
    return statistics.median(samples)


def invocation(script: str, argv: list[str] | None) -> list[str]:
    """The command line that ran a benchmark: the process's own, or ``script`` with ``argv`` when its
    ``main(argv)`` was called from other Python code (a test), whose own command line says nothing."""
    if argv is None:
        return list(sys.argv)
    script_path = Path(script).resolve()
    shown = script_path.relative_to(ROOT) if script_path.is_relative_to(ROOT) else script_path
    return [str(shown), *argv]


def header(name: str, provenance: dict) -> str:
    """The top of results/<name>.md: the command, the date and the machine."""
    return f"# {name}\n\n`{provenance['command']}` on {provenance['date']}\n\nmachine: {json.dumps(provenance['machine'])}\n\n"


def write_result(
    name: str, payload: dict, markdown: str, out: Path | None = None, argv: list[str] | None = None
) -> Path:
    """results/<name>.json (payload + provenance) and results/<name>.md (the table a person reads);
    ``argv`` is the command that ran it (``invocation``), by default the process's."""
    out = out or ROOT / "results"
    out.mkdir(parents=True, exist_ok=True)
    provenance = {
        "machine": machine(),
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *(sys.argv if argv is None else argv)]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    data = {**payload, **provenance}
    (out / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    (out / f"{name}.md").write_text(header(name, provenance) + markdown + "\n")
    return out / f"{name}.json"


def parse_config(cls: type, argv: list[str] | None, doc: str | None):
    """A benchmark's config dataclass (options declared with robuq's ``option()``, as the library declares
    its jobs') from the command line ``argv``: the same flags, defaults, help and choices as ``robuq``'s."""
    import argparse
    import dataclasses

    from robuq.cli.flags import add_config_arguments, config_from_args
    from robuq.core.options import check_choice

    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0] if doc else None)
    add_config_arguments(parser, cls)
    config = config_from_args(parser.parse_args(argv), cls)
    for field in dataclasses.fields(cls):
        if field.metadata.get("choices"):
            check_choice(config, field.name)
    return config
