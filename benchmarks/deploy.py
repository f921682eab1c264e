"""Exported (packed, integer-domain) DiTs against full precision: file size, CPU speed, peak memory.

    python benchmarks/deploy.py            # → results/deploy.json and .md  (hours on 2 cores without VNNI, see below)
    python benchmarks/deploy.py --quick    # DiT-S/2 only, fewer repeats
    python benchmarks/deploy.py --parts speed,paths --settings avx2-forced --models DiT-S/2
    python benchmarks/deploy.py --parts speed --models DiT-XL/2 --resume-dir ~/robuq-deploy   # hours; rerun to resume
    python benchmarks/deploy.py --parts sizes,linears,speed --settings native --models toy --size-models toy \
        --linear-width 48 --linear-tokens 16 --repeats 1   # a 2-block toy DiT: checks the script, measures nothing

Speed and memory are measured per CPU setting, each in a subprocess: ``native`` (the CPU as it is) and
``avx2-forced`` (PyTorch, oneDNN, MKL and fbgemm held to AVX2 by their environment variables, robuq's C
kernels built with -march=haswell: what an AVX2-only CPU runs, on this CPU's cores). Beside fp32 eager,
each exported model is timed against the peers a CPU user would pick instead (``PEERS``: PyTorch's dynamic
int8 model, ``quantize_dynamic`` on every nn.Linear; the fp32 model under ``torch.compile``; torchao's int8
dynamic-activation ``quantize_`` under ``torch.compile``); the per-path table times every
integer GEMM path robuq has on the block linears' shapes; the breakdown part times each role in a block
(linears, attention core, adaLN, elementwise) in the fp32 and the exported forward, and the exported forward
by kernel (input pass, integer GEMM, epilogue, attention, elementwise), so that what bounds the speed-up shows.

Time: about 25 minutes on 2 cores without the compiled peers; each compiled peer adds a minute of
compilation per model and setting, and on a CPU without VNNI torchao's peer runs at a fraction of fp32's
speed (15 s a DiT-S/2 forward on a 2-core EPYC), which takes hours on DiT-B/2: ``--peers
dynamic_int8,fp32_compiled`` leaves it out.

Random weights are fine here: sizes and speeds do not depend on the values. Each speed figure is a
ratio of two timings taken alternately in one run.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import inspect
import json
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from common import (
    CPU_SETTINGS,
    create_model,
    header,
    invocation,
    machine,
    parse_config,
    setting_environment,
    time_ms,
    write_result,
)
from robuq.core.options import option
import robuq
from robuq.deploy import gemm
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
    quantized = {
        id(m.weight): m for m in model.modules() if isinstance(m, QuantLinear) and m.quantized_weight() is not None
    }
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
            rows.append(
                {
                    "name": name,
                    "layout": layout,
                    "packing": packing,
                    "file_bytes": report["file_bytes"],
                    "size_ratio_fp32": report["ratio_fp32"],
                    "size_ratio_fp16": report["ratio_fp16"],
                    "information_bytes": info,
                    "overhead_vs_information": report["file_bytes"] / info - 1,
                }
            )
            path.unlink()
            del model
    return rows


def linear_rows(repeats: int, tokens: int = 2048, width: int = 1152) -> list[dict]:
    """Each block-linear shape of a DiT of ``width`` (DiT-XL/2's by default, batch 8 × 256 tokens): fp32
    nn.Linear vs IntegerLinear."""
    rows = []
    shapes = {"qkv": (width, 3 * width), "proj": (width, width), "fc1": (width, 4 * width), "fc2": (4 * width, width)}
    for name, (cin, cout) in shapes.items():
        linear = torch.nn.Linear(cin, cout)
        q = QuantLinear.from_linear(
            linear,
            LinearQuantConfig(act_bits=2, act_rule="gaussian", hadamard=True, hadamard_signs=True, lowrank_rank=16),
        )
        integer = IntegerLinear(q)
        x = torch.randn(tokens, cin)
        with torch.no_grad():
            fp, it = [], []
            for _ in range(3):
                fp.append(time_ms(lambda: linear(x), repeats))
                it.append(time_ms(lambda: integer(x), repeats))
        rows.append(
            {
                "layer": name,
                "shape": [tokens, cin, cout],
                "fp32_ms": statistics.median(fp),
                "integer_ms": statistics.median(it),
                "speedup": statistics.median(fp) / statistics.median(it),
            }
        )
    return rows


PARTS = ("sizes", "linears", "speed", "paths", "memory", "breakdown")
# The block linears of DiT-S/2 and DiT-B/2 (in, out), at batch 8 × 256 tokens.
PATH_SHAPES = {
    "DiT-S/2": {"qkv": (384, 1152), "proj": (384, 384), "fc1": (384, 1536), "fc2": (1536, 384)},
    "DiT-B/2": {"qkv": (768, 2304), "proj": (768, 768), "fc1": (768, 3072), "fc2": (3072, 768)},
}


def dynamic_int8(model: torch.nn.Module) -> torch.nn.Module:
    """PyTorch's dynamic int8 model of ``model`` (a copy): every nn.Linear through fbgemm's int8 GEMM."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notices
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)


# Peers a CPU user would try today besides PyTorch's (deprecated) dynamic int8 model: the fp32 model under
# torch.compile, and torchao's int8 dynamic-activation quantization (every nn.Linear) under torch.compile.
PEERS = ("dynamic_int8", "fp32_compiled", "torchao_int8_compiled")


def peer_model(peer: str, fp: torch.nn.Module) -> torch.nn.Module:
    """``peer`` of the fp32 model ``fp`` (a copy); ImportError where torchao is not installed."""
    if peer == "dynamic_int8":
        return dynamic_int8(fp)
    model = copy.deepcopy(fp)
    if peer == "torchao_int8_compiled":
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        quantize_(model, Int8DynamicActivationInt8WeightConfig())
    return torch.compile(model)


def build_peers(peers: list[str], fp: torch.nn.Module, inputs: tuple) -> tuple[dict, dict, dict]:
    """(name → model, name → seconds of its first call (compilation included), name → why it is missing):
    a peer that cannot be built or compiled here is reported, not timed."""
    models, first_call, missing = {}, {}, {}
    for peer in peers:
        try:
            model = peer_model(peer, fp)
            start = time.perf_counter()
            with torch.no_grad():
                model(*inputs)
            first_call[peer] = time.perf_counter() - start
            models[peer] = model
        except Exception as error:  # noqa: BLE001 - any failure of a peer is a row of the report, not a crash
            missing[peer] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]
    return models, first_call, missing


def export_random(name: str, path: Path, act_bits: int = 2) -> Path:
    """A randomly initialised ``name`` at the paper's layout (W1.58, ``act_bits``), exported with 2-bit packing."""
    config = robuq.preset("robuq", act_bits=act_bits)
    model = robuq.quantize_(create_model(name), config, initialize=False)
    return export_model(model, config, path, "ternary-2bit", "fp16")


def end_to_end(
    name: str,
    repeats: int,
    tmp: Path,
    act_bits: int = 2,
    clock: str = "wall",
    rounds: int = 5,
    peers: list[str] = list(PEERS),
    batch: int = 8,
) -> dict:
    """fp32 forward vs its peers (``PEERS``) vs the exported forward, alternately; also fp32 with robuq's
    elementwise C kernels (GELU, LayerNorm+modulate, gated residuals), which the exported model uses, so that
    the part of the speed-up that does not come from quantization shows.

    Each round times every model once, in reversed order every other round; a speed-up is the median over
    rounds of that round's ratio, so that a machine that slows down for a while (shared, noisy) slows both
    sides of a ratio, and its spread over rounds is kept."""
    torch.manual_seed(0)
    fp = create_model(name).eval()
    c = fp.config
    x = torch.randn(batch, c.in_channels, c.input_size, c.input_size)
    t, y = torch.randint(0, 1000, (batch,)), torch.randint(0, c.num_classes, (batch,))
    peer_models, first_call, missing = build_peers(peers, fp, (x, t, y))
    models = {"fp32": fp, "fp32_native_elementwise": use_native_kernels(copy.deepcopy(fp)), **peer_models}
    path = export_random(name, tmp / f"{name.replace('/', '_')}.safetensors", act_bits)
    models["exported"] = load_exported(path)
    times = {kind: [] for kind in models}
    with torch.no_grad():
        for r in range(rounds):
            for kind, model in models.items() if r % 2 == 0 else reversed(models.items()):
                times[kind].append(time_ms(lambda: model(x, t, y), repeats, clock=clock))
    ms = {kind: statistics.median(v) for kind, v in times.items()}
    paths = {m.gemm for m in models["exported"].modules() if isinstance(m, IntegerLinear)}
    layer_paths = sorted({m.path.name for m in models["exported"].modules() if isinstance(m, IntegerLinear)})

    def ratio(kind: str) -> tuple[float, list[float]]:
        per_round = [a / b for a, b in zip(times[kind], times["exported"])]
        return statistics.median(per_round), per_round

    (fp32, fp32_rounds), (elementwise, _) = (ratio(k) for k in ("fp32", "fp32_native_elementwise"))
    result = {
        **{f"{kind}_ms": v for kind, v in ms.items()},
        "act_bits": act_bits,
        "batch": batch,
        "gemm_path": ",".join(sorted(paths)),
        "layer_paths": layer_paths,
        "rounds_ms": times,
        "cpu_speedup": fp32,
        "cpu_speedup_rounds": fp32_rounds,
        "cpu_speedup_vs_fp32_native_elementwise": elementwise,
        "export_path": str(path),
        "peers": {
            peer: dict(zip(("speedup", "rounds"), ratio(peer)), first_call_s=first_call[peer]) for peer in peer_models
        },
        "peers_missing": missing,
    }
    if "dynamic_int8" in peer_models:  # the keys results written before the other peers carry
        result["speedup_vs_dynamic_int8"], result["speedup_vs_dynamic_int8_rounds"] = ratio("dynamic_int8")
    return result


# Where a forward's time goes: each DiT block's modules by role (suffixes of their names in a block).
BREAKDOWN = {
    "block linears (+ GELU)": ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.act", "mlp.fc2"),
    "attention core (QKᵀ, softmax, ·V)": ("attn.core",),
    "adaLN modulation": ("adaLN_modulation",),
    "LayerNorm+modulate, gated residuals": ("norm1", "norm2", "residual"),
}


def time_parts(model: torch.nn.Module, x, t, y, repeats: int) -> dict:
    """ms per forward spent in each BREAKDOWN role (forward hooks on the blocks' modules), the whole forward,
    and the rest (embedders, final layer, Python between modules)."""
    spent = {role: 0.0 for role in BREAKDOWN}
    started = {}
    handles = []
    for name, module in model.named_modules():
        parts = name.split(".")
        if parts[0] != "blocks" or len(parts) < 3:
            continue
        role = next((r for r, suffixes in BREAKDOWN.items() if ".".join(parts[2:]) in suffixes), None)
        if role is None:
            continue
        handles.append(module.register_forward_pre_hook(lambda m, _i: started.__setitem__(id(m), time.perf_counter())))
        handles.append(
            module.register_forward_hook(
                lambda m, _i, _o, role=role: spent.__setitem__(role, spent[role] + time.perf_counter() - started[id(m)])
            )
        )
    try:
        with torch.no_grad():
            model(x, t, y)  # warm-up
            spent.update({role: 0.0 for role in BREAKDOWN})
            begin = time.perf_counter()
            for _ in range(repeats):
                model(x, t, y)
            total = time.perf_counter() - begin
    finally:
        for h in handles:
            h.remove()
    ms = {role: 1000 * v / repeats for role, v in spent.items()}
    return {**ms, "rest": 1000 * total / repeats - sum(ms.values()), "forward": 1000 * total / repeats}


# The exported forward's kernels by what they do in the model: robuq.kernels.native's entry points, and
# the integer GEMM by whichever path robuq.deploy.gemm.matmul takes (on the AVX2 path, ternary layers at 4
# bits or fewer run input pass, GEMM and epilogue as one kernel, native.linear_ternary).
KERNELS = {
    "ternary linear, fused (input pass, lookup GEMM, epilogue)": (native.linear_ternary,),
    "input pass (Hadamard, quantize, V·x)": (native.hadamard_quantize, native.hadamard),
    "integer GEMM": (gemm.matmul,),
    "epilogue (rescale, U·branch, GELU)": (native.rescale, native.gelu_tanh),
    "attention (8-bit, fused)": (native.attention,),
    "LayerNorm+modulate, gated residuals": (native.layer_norm_modulate, native.gated_residual),
}


def time_kernels(model: torch.nn.Module, x, t, y, repeats: int) -> dict:
    """ms per forward inside each KERNELS group (the functions' cumulative time under cProfile, which
    ctypes calls do not leave), the whole forward, and the rest (PyTorch ops, Python, embedders)."""
    import cProfile
    import pstats

    with torch.no_grad():
        model(x, t, y)  # warm-up
        profile = cProfile.Profile()
        begin = time.perf_counter()
        profile.enable()
        for _ in range(repeats):
            model(x, t, y)
        profile.disable()
        total = time.perf_counter() - begin
    stats = pstats.Stats(profile).stats  # (file, first line, name) → (calls, …, cumulative seconds, callers)
    # unwrap: the kernels' entry points are wrapped (kept out of torch.compile's graphs); cProfile keys the
    # functions' own code.
    codes = {group: [inspect.unwrap(f).__code__ for f in functions] for group, functions in KERNELS.items()}
    spent = {
        group: sum(stats.get((c.co_filename, c.co_firstlineno, c.co_name), (0, 0, 0, 0.0))[3] for c in group_codes)
        for group, group_codes in codes.items()
    }
    ms = {group: 1000 * v / repeats for group, v in spent.items()}
    return {**ms, "rest": 1000 * total / repeats - sum(ms.values()), "forward": 1000 * total / repeats}


def breakdown(name: str, repeats: int, tmp: Path, act_bits: int) -> dict:
    """``time_parts`` of the fp32 model and of its export, at the speed part's batch and latents, and the
    export's ``time_kernels``."""
    torch.manual_seed(0)
    fp = create_model(name).eval()
    exported = load_exported(export_random(name, tmp / f"{name.replace('/', '_')}_parts.safetensors", act_bits))
    c = fp.config
    x = torch.randn(8, c.in_channels, c.input_size, c.input_size)
    t, y = torch.randint(0, 1000, (8,)), torch.randint(0, c.num_classes, (8,))
    return {
        "fp32": time_parts(fp, x, t, y, repeats),
        "exported": time_parts(exported, x, t, y, repeats),
        "exported_kernels": time_kernels(exported, x, t, y, repeats),
    }


def available_paths() -> list[str]:
    """The GEMM paths this process can run (avx2 needs robuq's C kernels built with AVX2)."""
    return [p for p in gemm.PATHS if p != "avx2" or native.integer_isa() in ("avx2", "avx512_vnni")]


def path_rows(
    repeats: int, tokens: int = 2048, models: tuple[str, ...] = tuple(PATH_SHAPES), clock: str = "wall"
) -> list[dict]:
    """Every available GEMM path on the block linears' shapes (int8 levels 0…7, ternary weights), beside an
    fp32 matmul of the same shape and PyTorch's dynamic int8 linear (which also quantizes its input)."""
    rows = []
    for model, shapes in ((m, PATH_SHAPES[m]) for m in models):
        for layer, (cin, cout) in shapes.items():
            torch.manual_seed(0)
            a, b = (
                torch.randint(0, 8, (tokens, cin), dtype=torch.int8),
                torch.randint(-1, 2, (cin, cout), dtype=torch.int8),
            )
            sums = b.sum(dim=0, dtype=torch.int32)
            x, w = torch.randn(tokens, cin), torch.randn(cin, cout)
            peer = dynamic_int8(torch.nn.Sequential(torch.nn.Linear(cin, cout)))
            runs = {"fp32_matmul": lambda: x @ w, "dynamic_int8_linear": lambda: peer(x)}
            # as an exported layer calls it: AVX2 weights packed once, 3-bit levels known to be unsigned (the
            # avx2 path's ternary lookup kernel), and beside it the multiply-add kernel it takes for other weights
            avx2 = "avx2" in available_paths()
            packed = gemm.pack_avx2(b, act_shift=0, act_top=7) if avx2 else None
            runs.update(
                {
                    f"{p}_gemm": (lambda p=p: gemm.matmul(p, a, b, sums, 1, packed=packed, act_shift=0, act_top=7))
                    for p in available_paths()
                }
            )
            if avx2:
                madd = native.pack_gemm_weights(b)
                runs["avx2_multiply_add_gemm"] = lambda: native.gemm_s8(a, madd, cout, sums, 0, gemm.avx2_flush(1, 7))
            times = {kind: [] for kind in runs}
            with torch.no_grad():
                for _ in range(3):
                    for kind, fn in runs.items():
                        times[kind].append(time_ms(fn, repeats, clock=clock))
            rows.append(
                {
                    "model": model,
                    "layer": layer,
                    "shape": [tokens, cin, cout],
                    **{f"{kind}_ms": statistics.median(v) for kind, v in times.items()},
                }
            )
    return rows


# Peak resident memory from VmHWM: ru_maxrss would be wrong here, because Linux carries it over from the
# parent across fork and exec (this benchmark has built DiT-XL/2 by then).
PEAK_SCRIPT = """
import sys, torch, robuq
sys.path.insert(0, sys.argv[4])  # benchmarks/, for common.create_model
from common import create_model
from robuq.io.model_files import load_any
from robuq.deploy.elementwise import use_native_kernels
from robuq.deploy.allocator import retain_freed_memory
def high_water():
    status = open("/proc/self/status").read()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024
kind, path, name = sys.argv[1:4]
torch.set_num_threads(1)
retain_freed_memory()  # both models under the allocator setting that load_exported applies
baseline = high_water()
model = create_model(name).eval() if kind == "fp32" else load_any(path)
robuq.generate(model, torch.arange(4) % model.config.num_classes, 4, "ddim", 3, 1.5, 0, progress=False)
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
            out = subprocess.run(
                [sys.executable, "-c", PEAK_SCRIPT, kind, export_path, name, str(Path(__file__).parent)],
                capture_output=True,
                text=True,
                check=True,
            )
            baseline, peak = map(int, out.stdout.strip().splitlines()[-1].split())
            baselines.append(baseline)
            peaks.append(peak)
        peak, baseline = statistics.median(peaks), statistics.median(baselines)
        result.update(
            {
                f"{kind}_peak_bytes": peak,
                f"{kind}_peak_above_import_bytes": peak - baseline,
                f"{kind}_peak_bytes_runs": peaks,
            }
        )
    result["peak_mem_ratio"] = result["fp32_peak_bytes"] / result["exported_peak_bytes"]
    result["peak_mem_ratio_above_import"] = (
        result["fp32_peak_above_import_bytes"] / result["exported_peak_above_import_bytes"]
    )
    return result


def measure_setting(args: argparse.Namespace, tmp: Path) -> dict:
    """Speed, per-path and memory figures of this process's CPU setting (run as a worker subprocess). With
    ``--resume-dir``, each model's figures are kept there as they finish and taken from there on a rerun
    with the same options: DiT-XL/2 takes hours on 2 cores."""
    result = {"machine": machine(), "models": {}, "paths": []}
    for name in args.models:
        result["models"][name] = resumable(args, name, lambda name=name: model_entry(args, name, tmp))
        for batch in sorted(set(args.batches) - {8}) if "speed" in args.parts else ():  # batch 8: the entry's own
            result["models"][f"{name} at batch {batch}"] = resumable(
                args,
                f"{name}-batch-{batch}",
                lambda name=name, batch=batch: end_to_end(
                    name, args.repeats, tmp, args.act_bits, args.clock, args.rounds, args.peers, batch
                ),
            )
    for name in set(args.memory_models) - set(args.models) if "memory" in args.parts else ():
        result["models"][name] = resumable(
            args,
            f"{name}-memory",
            lambda name=name: peak_memory_ratio(
                name, str(export_random(name, tmp / "memory.safetensors", args.act_bits)), args.memory_runs
            ),
        )
    if "paths" in args.parts:
        result["paths"] = path_rows(args.repeats, clock=args.clock)
    return result


def model_entry(args: argparse.Namespace, name: str, tmp: Path) -> dict:
    entry = {}
    if "speed" in args.parts and 8 in args.batches:
        entry.update(end_to_end(name, args.repeats, tmp, args.act_bits, args.clock, args.rounds, args.peers))
    if "breakdown" in args.parts:
        entry["breakdown"] = breakdown(name, args.repeats, tmp, args.act_bits)
    if "memory" in args.parts and name in args.memory_models:
        path = entry.get("export_path") or str(export_random(name, tmp / "memory.safetensors", args.act_bits))
        entry.update(peak_memory_ratio(name, path, args.memory_runs))
    entry.pop("export_path", None)
    return entry


def resumable(args: argparse.Namespace, what: str, measure) -> dict:
    """``measure()``, or what an earlier run with the same options and setting kept in ``--resume-dir``."""
    if not args.resume_dir:
        return measure()
    options = {
        k: getattr(args, k)
        for k in (
            "parts",
            "repeats",
            "rounds",
            "act_bits",
            "clock",
            "threads",
            "peers",
            "memory_runs",
            "memory_models",
            "batches",
        )
    }
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True
    ).stdout
    key = hashlib.sha256(json.dumps([options, commit.strip()], sort_keys=True).encode()).hexdigest()[:12]
    kept = Path(args.resume_dir) / f"{args.worker.stem}-{what.replace('/', '_')}-{key}.json"
    if kept.is_file():
        print(f"[deploy] {what} under {args.worker.stem}: kept from {kept}", flush=True)
        return json.loads(kept.read_text())
    entry = measure()
    kept.parent.mkdir(parents=True, exist_ok=True)
    partial = kept.with_suffix(".partial")
    partial.write_text(json.dumps(entry))
    partial.replace(kept)
    return entry


def run_setting(setting: str, args: argparse.Namespace, tmp: Path) -> dict:
    """``measure_setting`` in a fresh process under ``setting``'s environment (PyTorch reads its
    capability once, at import)."""
    out = tmp / f"{setting}.json"
    worker = [
        sys.executable,
        __file__,
        "--worker",
        str(out),
        "--threads",
        str(args.threads),
        "--repeats",
        str(args.repeats),
        "--rounds",
        str(args.rounds),
        "--act-bits",
        str(args.act_bits),
        "--clock",
        args.clock,
        "--memory-runs",
        str(args.memory_runs),
        "--peers",
        ",".join(args.peers),
        "--batches",
        ",".join(map(str, args.batches)),
        *(["--resume-dir", args.resume_dir] if args.resume_dir else []),
        "--parts",
        ",".join(args.parts),
        "--models",
        ",".join(args.models),
        "--memory-models",
        ",".join(args.memory_models),
    ]
    subprocess.run(worker, env=setting_environment(setting), check=True)
    return {"setting": setting, "environment": CPU_SETTINGS[setting], **json.loads(out.read_text())}


def _spread(entry: dict, key: str) -> str:
    """(lowest–highest round), where the result has its rounds (older results do not)."""
    rounds = entry.get(key)
    return f" ({min(rounds):.2f}–{max(rounds):.2f})" if rounds else ""


def _mib(v: float) -> str:
    return f"{v / 2**20:.0f}"


PEER_NAMES = {
    "dynamic_int8": "PyTorch dynamic int8 (torch.ao, eager)",
    "fp32_compiled": "fp32, torch.compile",
    "torchao_int8_compiled": "torchao int8 dynamic activations + int8 weights, torch.compile",
}


def peers_of(entry: dict) -> dict:
    """A speed entry's peers; results written before the compiled peers had the dynamic int8 model alone."""
    if "peers" in entry:
        return entry["peers"]
    return {
        "dynamic_int8": {
            "speedup": entry["speedup_vs_dynamic_int8"],
            "rounds": entry.get("speedup_vs_dynamic_int8_rounds"),
            "first_call_s": None,
        }
    }


def markdown(sizes: list[dict], linears: list[dict], settings: list[dict], args: argparse.Namespace) -> str:
    lines = []
    for s in settings:
        m = s["machine"]
        lines.append(
            f"- **{s['setting']}**: {m['cpu_model']}, CPU flags {', '.join(m['cpu_isa'])}; PyTorch capability "
            f"{m['torch_cpu_capability']}, robuq's C kernels {m['robuq_gemm']['robuq_kernels']}, GEMM path chosen "
            f"`{m['robuq_gemm']['chosen']}`"
            + (
                f" (ternary A3 layers `{m['robuq_gemm']['chosen_ternary_a3']}`)"
                if "chosen_ternary_a3" in m["robuq_gemm"]
                else ""
            )
            + (f"; forced by {m['forced']}" if m["forced"] else "")
            + "."
        )
    if any(s["setting"] == "avx2-forced" for s in settings):
        lines += [
            "",
            "The avx2-forced figures are forced, not native: this CPU's PyTorch, oneDNN, MKL and fbgemm held "
            "to AVX2 by their environment variables and robuq's C kernels built with -march=haswell, on cores that "
            "have AVX-512. Held so, oneDNN still runs `torch._int_mm` at about an fp32 matmul's speed, so its "
            "column does not show the 33× slow-down measured once on a native AVX2-only CPU.",
        ]
    if sizes:
        lines += [
            "",
            "| model | layout | packing | MiB | ×fp32 | ×fp16 | over information |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in sizes:
            lines.append(
                f"| {r['name']} | {r['layout']} | {r['packing']} | {r['file_bytes'] / 2**20:.1f} | {r['size_ratio_fp32']:.1f} "
                f"| {r['size_ratio_fp16']:.1f} | {100 * r['overhead_vs_information']:.2f}% |"
            )
    speed = [(s, name, e) for s in settings for name, e in s["models"].items() if "cpu_speedup" in e]
    if speed:
        clock = "CPU time of the process" if args.clock == "cpu" else "wall time"
        # Results written before the rounds were kept hold ratios of medians.
        method = (
            "ms: medians over alternating rounds; a speed-up is the median of the rounds' ratios, lowest–highest "
            "round in brackets"
            if all("cpu_speedup_rounds" in e for _, _, e in speed)
            else "ms"
        )
        lines += [
            "",
            f"Forward at 32×32 latents (batch 8 unless the model's name says otherwise; batch 2 is one image with "
            f"guidance), `robuq` preset at A{args.act_bits}, {args.threads} threads, {clock} ({method}):",
            "",
            "| setting | model | fp32 eager ms | exported ms | GEMM path | layer paths | × fp32 "
            "| × fp32 with robuq's elementwise kernels |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for s, name, e in speed:
            lines.append(
                f"| {s['setting']} | {name} | {e['fp32_ms']:.0f} | {e['exported_ms']:.0f} | {e['gemm_path']} "
                f"| {', '.join(e.get('layer_paths', [])) or '—'} | **{e['cpu_speedup']:.2f}×**{_spread(e, 'cpu_speedup_rounds')} "
                f"| {e['cpu_speedup_vs_fp32_native_elementwise']:.2f}× |"
            )
        lines += [
            "",
            "The exported model against the peers a CPU user would try instead, timed in the same rounds "
            "(× = the peer's time ÷ the exported model's: above 1 robuq is faster, below 1 the peer is; first call = "
            "its compilation, where it has one):",
            "",
            "| setting | model | peer | peer ms | exported ms | exported × peer | first call s |",
            "|---|---|---|---|---|---|---|",
        ]
        for s, name, e in speed:
            for peer, p in peers_of(e).items():
                first = "—" if p.get("first_call_s") is None else f"{p['first_call_s']:.0f}"
                lines.append(
                    f"| {s['setting']} | {name} | {PEER_NAMES.get(peer, peer)} | {e[f'{peer}_ms']:.0f} "
                    f"| {e['exported_ms']:.0f} | **{p['speedup']:.2f}×**{_spread(p, 'rounds')} | {first} |"
                )
            for peer, why in e.get("peers_missing", {}).items():
                lines.append(f"| {s['setting']} | {name} | {PEER_NAMES.get(peer, peer)} | not run: {why} | | | |")
    memory = [(s, name, e) for s in settings for name, e in s["models"].items() if "peak_mem_ratio" in e]
    if memory:
        lines += [
            "",
            "Peak resident memory of a short sampling run (medians of processes; exported peaks per process):",
            "",
            "| setting | model | fp32 MiB | exported MiB | fp32 ÷ exported | same, above the import footprint | exported runs |",
            "|---|---|---|---|---|---|---|",
        ]
        for s, name, e in memory:
            lines.append(
                f"| {s['setting']} | {name} | {_mib(e['fp32_peak_bytes'])} | {_mib(e['exported_peak_bytes'])} "
                f"| {e['peak_mem_ratio']:.2f}× | {e['peak_mem_ratio_above_import']:.2f}× "
                f"({_mib(e['fp32_peak_above_import_bytes'])} / {_mib(e['exported_peak_above_import_bytes'])}) "
                f"| {', '.join(_mib(b) for b in e['exported_peak_bytes_runs'])} |"
            )
    parts = [(s, name, e["breakdown"]) for s in settings for name, e in s["models"].items() if "breakdown" in e]
    if parts:
        lines += [
            "",
            "Where a forward's time goes (ms per forward, one timed loop with forward hooks on the blocks' "
            "modules; the rest is embedders, final layer and Python between modules):",
            "",
            "| setting | model | part | fp32 ms | exported ms | share of the exported forward |",
            "|---|---|---|---|---|---|",
        ]
        for s, name, b in parts:
            for role in [*BREAKDOWN, "rest", "forward"]:
                lines.append(
                    f"| {s['setting']} | {name} | {role} | {b['fp32'][role]:.0f} | {b['exported'][role]:.0f} "
                    f"| {100 * b['exported'][role] / b['exported']['forward']:.0f}% |"
                )
    kernels = [(s, name, b["exported_kernels"]) for s, name, b in parts if "exported_kernels" in b]
    if kernels:
        lines += [
            "",
            "The exported forward by kernel (ms per forward, a loop under cProfile: each kernel's wrapper in "
            "robuq.kernels.native, the C call included, and the integer GEMM by whichever path it takes; the rest "
            "is PyTorch ops, Python and the embedders):",
            "",
            "| setting | model | kernel | ms | share of the forward |",
            "|---|---|---|---|---|",
        ]
        for s, name, k in kernels:
            for group in [*(g for g in KERNELS if k.get(g)), "rest", "forward"]:  # the kernels this setting ran
                lines.append(
                    f"| {s['setting']} | {name} | {group} | {k[group]:.0f} | {100 * k[group] / k['forward']:.0f}% |"
                )
    kinds = ["fp32_matmul", "dynamic_int8_linear", *[f"{p}_gemm" for p in gemm.PATHS], "avx2_multiply_add_gemm"]
    for s in settings:
        if not s["paths"]:
            continue
        present = [k for k in kinds if f"{k}_ms" in s["paths"][0]]
        lines += [
            "",
            f"Each GEMM path on the block linears' shapes, **{s['setting']}** (ms; × fp32 matmul in brackets; "
            "the dynamic int8 linear also quantizes its float input; avx2 gemm is the path as a ternary 3-bit layer takes "
            "it, the table-lookup kernel, and avx2 multiply add gemm the vpmaddubsw kernel it uses for other weights; "
            "where a column is missing, that run did not time it):",
            "",
            "| model | layer | tokens×in×out | " + " | ".join(k.replace("_", " ") for k in present) + " |",
            "|---|---|---|" + "---|" * len(present),
        ]
        for r in s["paths"]:
            cells = [
                f"{r[f'{k}_ms']:.1f}" + ("" if k == "fp32_matmul" else f" ({r['fp32_matmul_ms'] / r[f'{k}_ms']:.2f}×)")
                for k in present
            ]
            lines.append(f"| {r['model']} | {r['layer']} | {r['shape']} | " + " | ".join(cells) + " |")
    if linears:
        lines += ["", "| DiT-XL/2 linear | tokens×in×out | fp32 ms | integer ms | speedup |", "|---|---|---|---|---|"]
        for r in linears:
            lines.append(
                f"| {r['layer']} | {r['shape']} | {r['fp32_ms']:.1f} | {r['integer_ms']:.1f} | {r['speedup']:.2f}× |"
            )
    lines += [
        "",
        f"Models ran with glibc's allocator thresholds raised (robuq.deploy.allocator); threads: {args.threads}; "
        f"timings are medians, taken alternately in one process per setting.",
    ]
    return "\n".join(lines)


def render(path: Path) -> None:
    """results/<name>.md again from results/<name>.json (its own command, date and machine kept)."""
    data = json.loads(path.read_text())
    args = argparse.Namespace(act_bits=data["act_bits"], threads=data["threads"], clock=data.get("clock", "wall"))
    text = markdown(data["sizes"], data["linears"], data["settings"], args)
    path.with_suffix(".md").write_text(header(path.stem, data) + text + "\n")


@dataclass
class DeployConfig:
    """Options of this benchmark."""

    quick: bool = option(False, "DiT-S/2 only, 3 repeats, one memory process")
    threads: int = option(2, "CPU threads")
    parts: str = option(",".join(PARTS), f"what to measure, comma-separated: {','.join(PARTS)}")
    settings: str = option(",".join(CPU_SETTINGS), f"CPU settings, comma-separated: {','.join(CPU_SETTINGS)}")
    models: str | None = option(None, "models timed end to end, comma-separated (default DiT-S/2,DiT-B/2)")
    memory_models: str | None = option(None, "models whose peak memory is measured (default DiT-XL/2,DiT-B/2,DiT-S/2)")
    size_models: str | None = option(None, "models whose export sizes are reported (default DiT-XL/2,DiT-B/2,DiT-S/2)")
    repeats: int | None = option(None, "timed repeats per measurement (default 5, quick 3)")
    memory_runs: int | None = option(None, "processes per peak-memory measurement (default 3, quick 1)")
    rounds: int | None = option(None, "alternating rounds of the end-to-end timing (default 5, quick 3)")
    act_bits: int = option(3, "activation bits of the exported models")
    batches: str = option("8", "batches of the end-to-end timing, comma-separated (2: one image with guidance)")
    peers: str = option(
        ",".join(PEERS),
        f"models the export is timed against, comma-separated: {','.join(PEERS)} "
        "(torchao_int8_compiled needs the bench extra: pip install 'robuq[bench]')",
    )
    resume_dir: str | None = option(
        None,
        "keep each model's figures here as they finish; a rerun with the same options "
        "takes them from here (for DiT-XL/2, hours on 2 cores)",
    )
    clock: str = option(
        "wall",
        "wall, or cpu: time by the process's CPU time (with --threads 1, immune to a crowded machine)",
        choices=("wall", "cpu"),
    )
    name: str = option("deploy", "results/<name>.json and .md")
    render: str | None = option(None, "rewrite the .md of a results JSON from its numbers")
    linear_width: int = option(1152, "block-linear rows at this model width (DiT-XL/2's)")
    linear_tokens: int = option(2048, "tokens of the block-linear rows (batch 8 × 256)")
    results_dir: str | None = option(None, "where results/<name>.json and .md go (default results/)")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    worker = None
    if argv[:1] == ["--worker"]:  # this script's own child process for one setting (run_setting): its output file
        worker, argv = Path(argv[1]), argv[2:]
    config = parse_config(DeployConfig, argv, __doc__)
    lists = ("parts", "settings", "models", "memory_models", "size_models", "peers", "batches")
    args = argparse.Namespace(
        **{
            **dataclasses.asdict(config),
            "worker": worker,
            **{k: [v for v in getattr(config, k).split(",") if v] if getattr(config, k) else None for k in lists},
        }
    )
    if args.render:
        render(Path(args.render))
        return
    if (
        unknown := set(args.parts) - set(PARTS)
        or set(args.settings) - set(CPU_SETTINGS)
        or set(args.peers or []) - set(PEERS)
    ):
        raise SystemExit(f"unknown parts or settings: {', '.join(sorted(unknown))}")
    args.repeats = args.repeats or (3 if args.quick else 5)
    args.memory_runs = args.memory_runs or (1 if args.quick else 3)
    args.rounds = args.rounds or (3 if args.quick else 5)
    args.models = args.models or (["DiT-S/2"] if args.quick else ["DiT-S/2", "DiT-B/2"])
    args.memory_models = args.memory_models or (["DiT-S/2"] if args.quick else ["DiT-XL/2", "DiT-B/2", "DiT-S/2"])
    args.peers = args.peers or []
    args.batches = sorted({int(b) for b in args.batches or ["8"]})
    torch.set_num_threads(args.threads)
    # load_exported raises glibc's allocator thresholds for the process; doing it first puts the fp32
    # model under the same setting, so the ratios compare the models and not the allocator.
    retain_freed_memory()
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        if args.worker:
            args.worker.write_text(json.dumps(measure_setting(args, tmp)))
            return
        size_models = args.size_models or (["DiT-S/2"] if args.quick else ["DiT-XL/2", "DiT-B/2", "DiT-S/2"])
        sizes = (
            size_rows(size_models, "ternary-trits", tmp) + size_rows(size_models, "ternary-2bit", tmp)
            if "sizes" in args.parts
            else []
        )
        linears = linear_rows(args.repeats, args.linear_tokens, args.linear_width) if "linears" in args.parts else []
        worker_parts = set(args.parts) & {"speed", "paths", "memory", "breakdown"}
        settings = [run_setting(s, args, tmp) for s in args.settings] if worker_parts else []
    text = markdown(sizes, linears, settings, args)
    write_result(
        args.name,
        {
            "clock": args.clock,
            "sizes": sizes,
            "linears": linears,
            "settings": settings,
            "quick": args.quick,
            "threads": args.threads,
            "act_bits": args.act_bits,
            "parts": args.parts,
            "repeats": args.repeats,
            "cpu_kernels": native.enabled(),
        },
        text,
        Path(args.results_dir) if args.results_dir else None,
        invocation(__file__, argv),
    )
    print(text)


if __name__ == "__main__":
    main()
