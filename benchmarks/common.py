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


def machine() -> dict:
    info = {
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def time_ms(fn: Callable[[], object], repeats: int = 7, warmup: int = 2, device: str = "cpu") -> float:
    """Median wall time of ``fn`` in milliseconds (median: the machine is shared and noisy)."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def invocation(script: str, argv: list[str] | None) -> list[str]:
    """The command line that ran a benchmark: the process's own, or ``script`` with ``argv`` when its
    ``main(argv)`` was called from other Python code (a test), whose own command line says nothing."""
    if argv is None:
        return list(sys.argv)
    script_path = Path(script).resolve()
    shown = script_path.relative_to(ROOT) if script_path.is_relative_to(ROOT) else script_path
    return [str(shown), *argv]


def write_result(name: str, payload: dict, markdown: str, out: Path | None = None, argv: list[str] | None = None) -> Path:
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
    header = f"# {name}\n\n`{provenance['command']}` on {provenance['date']}\n\nmachine: {json.dumps(provenance['machine'])}\n\n"
    (out / f"{name}.md").write_text(header + markdown + "\n")
    return out / f"{name}.json"
