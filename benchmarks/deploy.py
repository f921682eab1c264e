"""Exported (packed, integer-domain) DiTs against full precision: file size, CPU speed, peak memory.

    python benchmarks/deploy.py            # → results/deploy.json and .md  (about 10 minutes on 2 cores)
    python benchmarks/deploy.py --quick    # DiT-S/2 only, fewer repeats
    python benchmarks/deploy.py --models toy --linear-width 48 --linear-tokens 16 --repeats 1 --memory-runs 1
                                           # a 2-block toy DiT: checks the script in seconds, measures nothing

Random weights are fine here: sizes and speeds do not depend on the values. Each speed figure is a
ratio of two timings taken alternately in one run.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from common import create_model, invocation, model_config, time_ms, write_result
import robuq
from robuq.deploy.elementwise import use_native_kernels
from robuq.deploy.allocator import retain_freed_memory
from robuq.deploy.export import export_model, file_report, load_exported
from robuq.deploy.integer_linear import IntegerLinear
from robuq.deploy.packing import packed_bits_per_weight
from robuq.kernels import native
from robuq.quant.linear import LinearQuantConfig, QuantLinear


def layouts(act_bits: int) -> dict[str, robuq.QuantConfig]:
    """The paper's W1.58A2 layout (adaLN W4, rank-16 branch) and the same with ternary adaLN."""
    return {
        "paper (adaLN int4)": robuq.preset("robuq", act_bits=act_bits),
        "ternary adaLN": robuq.preset("robuq", act_bits=act_bits, adaln="ternary"),
    }


def information_bytes(model: torch.nn.Module, packing: str, half_bytes: int = 2) -> float:
    """What the plan says the file must hold: packed levels at the format's bits, everything else fp16."""
    bits = 0.0
    quantized = {id(m.weight): m for m in model.modules() if isinstance(m, QuantLinear) and m.quantized_weight() is not None}
    for p in model.parameters():
        layer = quantized.get(id(p))
        if layer is None:
            bits += p.numel() * 8 * half_bytes
        else:
            fmt = packing if layer.config.weight == "ternary" else "int4"
            bits += p.numel() * packed_bits_per_weight(fmt) + p.shape[0] * 8 * half_bytes
    return bits / 8


def size_rows(names: list[str], packing: str, tmp: Path) -> list[dict]:
    rows = []
    for name in names:
        for layout, config in layouts(2).items():
            model = robuq.quantize_(create_model(name), config, initialize=False)
            path = export_model(model, config, tmp / "m.safetensors", packing, "fp16")
            report = file_report(path)
            info = information_bytes(model, packing)
            rows.append({
                "name": name, "layout": layout, "packing": packing, "file_bytes": report["file_bytes"],
                "size_ratio_fp32": report["ratio_fp32"], "size_ratio_fp16": report["ratio_fp16"],
                "information_bytes": info, "overhead_vs_information": report["file_bytes"] / info - 1,
            })
            path.unlink()
            del model
    return rows


def linear_rows(repeats: int, tokens: int = 2048, width: int = 1152) -> list[dict]:
    """Each block-linear shape of a DiT of ``width`` (DiT-XL/2's by default, batch 8 × 256 tokens):
    fp32 nn.Linear vs IntegerLinear."""
    rows = []
    shapes = {"qkv": (width, 3 * width), "proj": (width, width), "fc1": (width, 4 * width), "fc2": (4 * width, width)}
    for name, (cin, cout) in shapes.items():
        linear = torch.nn.Linear(cin, cout)
        q = QuantLinear.from_linear(linear, LinearQuantConfig(act_bits=2, act_rule="gaussian", hadamard=True,
                                                              hadamard_signs=True, lowrank_rank=16))
        integer = IntegerLinear(q)
        x = torch.randn(tokens, cin)
        with torch.no_grad():
            fp, it = [], []
            for _ in range(3):
                fp.append(time_ms(lambda: linear(x), repeats))
                it.append(time_ms(lambda: integer(x), repeats))
        rows.append({"layer": name, "shape": [tokens, cin, cout], "fp32_ms": statistics.median(fp),
                     "integer_ms": statistics.median(it), "speedup": statistics.median(fp) / statistics.median(it)})
    return rows


def export_random(name: str, path: Path) -> Path:
    """A randomly initialised ``name`` at the paper's W1.58A2 layout, exported with 2-bit packing."""
    config = robuq.preset("robuq", act_bits=2)
    model = robuq.quantize_(create_model(name), config, initialize=False)
    return export_model(model, config, path, "ternary-2bit", "fp16")


def end_to_end(name: str, repeats: int, tmp: Path, batch: int = 8) -> dict:
    """fp32 forward vs exported forward, alternately; also fp32 with robuq's elementwise C kernels (GELU,
    LayerNorm+modulate, gated residuals), which the exported model uses, so that the part of the speed-up
    that does not come from quantization shows."""
    torch.manual_seed(0)
    fp = create_model(name).eval()
    fp_native = use_native_kernels(copy.deepcopy(fp))
    path = export_random(name, tmp / f"{name.replace('/', '_')}.safetensors")
    exported = load_exported(path)
    c = fp.config
    x = torch.randn(batch, c.in_channels, c.input_size, c.input_size)
    t, y = torch.randint(0, 1000, (batch,)), torch.randint(0, c.num_classes, (batch,))
    with torch.no_grad():
        fp_ms, native_ms, ex_ms = [], [], []
        for _ in range(3):
            fp_ms.append(time_ms(lambda: fp(x, t, y), repeats))
            native_ms.append(time_ms(lambda: fp_native(x, t, y), repeats))
            ex_ms.append(time_ms(lambda: exported(x, t, y), repeats))
    fp_med, native_med, ex_med = (statistics.median(v) for v in (fp_ms, native_ms, ex_ms))
    return {"fp32_ms": fp_med, "fp32_native_elementwise_ms": native_med, "exported_ms": ex_med,
            "cpu_speedup": fp_med / ex_med, "cpu_speedup_vs_fp32_native_elementwise": native_med / ex_med,
            "export_path": str(path)}


# Peak resident memory from VmHWM: ru_maxrss would be wrong here, because Linux carries it over from the
# parent across fork and exec (this benchmark has built DiT-XL/2 by then).
PEAK_SCRIPT = """
import json, sys, torch, robuq
from robuq.models.dit import DiT, DiTConfig
from robuq.io.model_files import load_any
from robuq.deploy.elementwise import use_native_kernels
from robuq.deploy.allocator import retain_freed_memory
def high_water():
    status = open("/proc/self/status").read()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024
kind, path, config = sys.argv[1:4]
torch.set_num_threads(1)
retain_freed_memory()  # both models under the allocator setting robuq sample applies to exported models
baseline = high_water()
model = DiT(DiTConfig(**json.loads(config))).eval() if kind == "fp32" else load_any(path)
robuq.generate(model, torch.arange(4), 4, "ddim", 3, 1.5, 0, progress=False)
print(baseline, high_water())
"""


def peak_memory_ratio(name: str, export_path: str, runs: int = 3) -> dict:
    """Peak resident memory of a short sampling run in a fresh process: fp32 model vs exported file,
    in total and above the process's footprint after importing torch and robuq. Medians of ``runs``
    processes each: the same run's peak varies from process to process (by 10% on DiT-XL/2's export
    here, with how the allocator happens to place and reuse blocks)."""
    result = {}
    for kind in ("fp32", "exported"):
        baselines, peaks = [], []
        for _ in range(runs):
            config = json.dumps(model_config(name).to_dict())
            out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, kind, export_path, config], capture_output=True, text=True, check=True)
            baseline, peak = map(int, out.stdout.strip().splitlines()[-1].split())
            baselines.append(baseline)
            peaks.append(peak)
        peak, baseline = statistics.median(peaks), statistics.median(baselines)
        result.update({f"{kind}_peak_bytes": peak, f"{kind}_peak_above_import_bytes": peak - baseline,
                       f"{kind}_peak_bytes_runs": peaks})
    result["peak_mem_ratio"] = result["fp32_peak_bytes"] / result["exported_peak_bytes"]
    result["peak_mem_ratio_above_import"] = result["fp32_peak_above_import_bytes"] / result["exported_peak_above_import_bytes"]
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="DiT-S/2 only, 3 repeats")
    parser.add_argument("--models", default=None, help="comma-separated models to size and measure, 'toy' for a 2-block "
                        "check of the script (default DiT-XL/2,DiT-B/2,DiT-S/2)")
    parser.add_argument("--speed-models", default=None, help="which of --models to time end to end; the others get peak "
                        "memory only (default: all of --models when given, else DiT-S/2,DiT-B/2)")
    parser.add_argument("--repeats", type=int, default=None, help="timing repeats (default 5, quick 3)")
    parser.add_argument("--memory-runs", type=int, default=3, help="processes per peak-memory median (0: skip peak memory)")
    parser.add_argument("--linear-width", type=int, default=1152, help="block-linear rows at this model width (DiT-XL/2's)")
    parser.add_argument("--linear-tokens", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results-dir", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    # load_exported raises glibc's allocator thresholds for the process; doing it first puts the fp32
    # model under the same setting, so the ratios compare the models and not the allocator.
    allocator_tuned = retain_freed_memory()
    repeats = args.repeats or (3 if args.quick else 5)
    size_models = args.models.split(",") if args.models else ["DiT-S/2"] if args.quick else ["DiT-XL/2", "DiT-B/2", "DiT-S/2"]
    speed_models = (args.speed_models.split(",") if args.speed_models else
                    size_models if args.models else ["DiT-S/2"] if args.quick else ["DiT-S/2", "DiT-B/2"])
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        sizes = size_rows(size_models, "ternary-trits", tmp) + size_rows(size_models, "ternary-2bit", tmp)
        linears = linear_rows(repeats, args.linear_tokens, args.linear_width)
        models = []
        for name in size_models:
            entry = {"name": name, "sizes": [r for r in sizes if r["name"] == name]}
            paper_trits = next(r for r in entry["sizes"] if r["layout"].startswith("paper") and r["packing"] == "ternary-trits")
            entry.update({k: paper_trits[k] for k in ("size_ratio_fp32", "size_ratio_fp16", "overhead_vs_information")})
            if name in speed_models:
                speed = end_to_end(name, repeats, tmp)
                entry.update({k: v for k, v in speed.items() if k != "export_path"})
                if args.memory_runs:
                    entry.update(peak_memory_ratio(name, speed["export_path"], args.memory_runs))
            elif args.memory_runs:  # DiT-XL/2: memory only, where the weights outweigh the interpreter
                entry.update(peak_memory_ratio(name, str(export_random(name, tmp / "memory.safetensors")), args.memory_runs))
            entry["linears"] = linears if name == "DiT-XL/2" or args.quick or model_config(name).hidden_size == args.linear_width else []
            models.append(entry)
    lines = ["| model | layout | packing | MiB | ×fp32 | ×fp16 | over information |", "|---|---|---|---|---|---|---|"]
    for r in sizes:
        lines.append(f"| {r['name']} | {r['layout']} | {r['packing']} | {r['file_bytes'] / 2**20:.1f} | {r['size_ratio_fp32']:.1f} "
                     f"| {r['size_ratio_fp16']:.1f} | {100 * r['overhead_vs_information']:.2f}% |")
    lines += ["", "| model | fp32 forward ms | exported forward ms | speedup | speedup over fp32 with robuq's elementwise kernels | peak memory fp32 ÷ exported (MiB) | same, above the import footprint |",
              "|---|---|---|---|---|---|---|"]
    for m in models:
        if "peak_mem_ratio" in m or "cpu_speedup" in m:
            mib = lambda key: m[key] / 2**20  # noqa: E731
            speed = (f"{m['fp32_ms']:.0f} | {m['exported_ms']:.0f} | {m['cpu_speedup']:.2f}× | {m['cpu_speedup_vs_fp32_native_elementwise']:.2f}×"
                     if "cpu_speedup" in m else "— | — | — | —")
            memory = (f"{m['peak_mem_ratio']:.2f}× ({mib('fp32_peak_bytes'):.0f} / {mib('exported_peak_bytes'):.0f}) "
                      f"| {m['peak_mem_ratio_above_import']:.2f}× ({mib('fp32_peak_above_import_bytes'):.0f} / {mib('exported_peak_above_import_bytes'):.0f})"
                      if "peak_mem_ratio" in m else "— | —")
            lines.append(f"| {m['name']} (batch 8, {model_config(m['name']).input_size}×{model_config(m['name']).input_size}) | {speed} | {memory} |")
    lines += ["", f"| width-{args.linear_width} linear | tokens×in×out | fp32 ms | integer ms | speedup |", "|---|---|---|---|---|"]
    for r in linears:
        lines.append(f"| {r['layer']} | {r['shape']} | {r['fp32_ms']:.1f} | {r['integer_ms']:.1f} | {r['speedup']:.2f}× |")
    lines += ["", f"Peak memory: medians of {args.memory_runs} processes each; exported peaks per process (MiB): "
              + "; ".join(f"{m['name']} " + ", ".join(f"{b / 2**20:.0f}" for b in m["exported_peak_bytes_runs"])
                          for m in models if "exported_peak_bytes_runs" in m) + "."]
    lines += ["", f"Both models ran with glibc's allocator thresholds raised (robuq.deploy.allocator): {allocator_tuned}; "
              f"robuq's CPU kernels (robuq/kernels/cpu_kernels.c) in use: {native.enabled()}; threads: {args.threads}."]
    write_result("deploy", {"models": models, "quick": args.quick, "threads": args.threads, "repeats": repeats,
                            "memory_runs": args.memory_runs, "allocator_tuned": allocator_tuned, "cpu_kernels": native.enabled()},
                 "\n".join(lines), Path(args.results_dir) if args.results_dir else None, invocation(__file__, argv))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
