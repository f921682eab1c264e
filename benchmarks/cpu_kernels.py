"""robuq's C kernels against the PyTorch code they replace, at DiT-S/2 and DiT-XL/2 shapes.

    python benchmarks/cpu_kernels.py         # → results/cpu_kernels.json and .md
    python benchmarks/cpu_kernels.py --models toy --tokens 16 --repeats 1   # a check of the script, not a measurement

Each row times the same call with the kernels on and off (``ROBUQ_NATIVE``), alternately, on the same
inputs: the block linear's input pass (Hadamard + per-token quantization, and the low-rank branch's first
matmul), a whole IntegerLinear (fc1's with its GELU in the epilogue), the 8-bit attention core, tanh-GELU,
and a block's elementwise work (LayerNorm + modulate, gated residuals).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from common import invocation, model_config, parse_config, time_ms, write_result
from robuq.core.options import option
from robuq.deploy.elementwise import NativeGELU, use_native_kernels
from robuq.deploy.allocator import retain_freed_memory
from robuq.deploy.integer_linear import IntegerLinear
from robuq.kernels import native
from robuq.models.dit import DiTBlock
from robuq.quant.attention import QuantAttentionCore
from robuq.quant.linear import LinearQuantConfig, QuantLinear

ROBUQ_LINEAR = LinearQuantConfig(act_bits=2, act_rule="gaussian", hadamard=True, hadamard_signs=True, lowrank_rank=16)


def side_by_side(fn, repeats: int) -> tuple[float, float]:
    """(ms with the C kernels, ms with PyTorch's code), medians of alternating rounds."""
    on, off = [], []
    for _ in range(3):
        with native.use(True):
            on.append(time_ms(fn, repeats))
        with native.use(False):
            off.append(time_ms(fn, repeats))
    return statistics.median(on), statistics.median(off)


MODELS = ("DiT-S/2", "DiT-XL/2")


def cases(tokens: int, models: tuple[str, ...] = MODELS) -> list[tuple[str, str, object]]:
    """(model, what, call) for each kernel at the shapes of each model, ``tokens`` tokens in batches of 8."""
    torch.manual_seed(0)
    rows = []
    for model in models:
        width, heads = model_config(model).hidden_size, model_config(model).num_heads
        for name, n_in, n_out in (("qkv", width, 3 * width), ("fc1", width, 4 * width), ("fc2", 4 * width, width)):
            layer = IntegerLinear(QuantLinear.from_linear(torch.nn.Linear(n_in, n_out), ROBUQ_LINEAR))
            layer.gelu = name == "fc1"  # as use_native_kernels sets it
            x = torch.randn(tokens, n_in)
            if name != "fc1":
                rows.append(
                    (
                        model,
                        f"{name} input pass: Hadamard + A2 levels ({tokens}×{n_in})",
                        lambda layer=layer, x=x: layer.input_levels(x),
                    )
                )
            gelu = " + GELU" if layer.gelu else ""
            rows.append(
                (
                    model,
                    f"{name} IntegerLinear{gelu}, whole ({tokens}×{n_in}→{n_out})",
                    lambda layer=layer, x=x: layer(x),
                )
            )
        qkv = torch.randn(8, tokens // 8, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        core = QuantAttentionCore(8)
        rows.append(
            (
                model,
                f"8-bit attention core (8×{heads} heads, {tokens // 8} tokens)",
                lambda core=core, qkv=qkv: core(qkv[0], qkv[1], qkv[2]),
            )
        )
        hidden = torch.randn(tokens, 4 * width)
        rows.append((model, f"tanh-GELU ({tokens}×{4 * width})", lambda h=hidden: NativeGELU()(h)))
        block = DiTBlock(width, heads)
        block.attn, block.mlp = torch.nn.Identity(), torch.nn.Identity()  # the block's elementwise work alone
        block = use_native_kernels(torch.nn.Sequential(block))[0]
        tokens_x, c = torch.randn(8, tokens // 8, width), torch.randn(8, width)
        rows.append(
            (
                model,
                f"block elementwise: 2× LayerNorm+modulate, 2× gated residual (8×{tokens // 8}×{width})",
                lambda block=block, x=tokens_x, c=c: block(x, c),
            )
        )
    return rows


@dataclass
class CPUKernelsConfig:
    """Options of this benchmark."""

    models: str = option(",".join(MODELS), "comma-separated; 'toy' checks the script in seconds")
    tokens: int = option(2048, "a multiple of 8 (batches of 8 for the attention and block rows)")
    repeats: int = option(5, "timed repeats per measurement")
    threads: int = option(2, "CPU threads")
    results_dir: str | None = option(None, "where the JSON and Markdown go (default: results/)")


def main(argv: list[str] | None = None) -> None:
    config = parse_config(CPUKernelsConfig, argv, __doc__)
    torch.set_num_threads(config.threads)
    retain_freed_memory()  # as load_exported does; both paths run under it
    results = []
    with torch.no_grad():
        for model, what, fn in cases(config.tokens, tuple(config.models.split(","))):
            c_ms, torch_ms = side_by_side(fn, config.repeats)
            results.append(
                {"model": model, "what": what, "c_kernels_ms": c_ms, "pytorch_ms": torch_ms, "speedup": torch_ms / c_ms}
            )
    lines = ["| model | what | C kernels ms | PyTorch ms | speed-up |", "|---|---|---|---|---|"]
    lines += [
        f"| {r['model']} | {r['what']} | {r['c_kernels_ms']:.2f} | {r['pytorch_ms']:.2f} | {r['speedup']:.2f}× |"
        for r in results
    ]
    write_result(
        "cpu_kernels",
        {"rows": results, "threads": config.threads, "tokens": config.tokens, "repeats": config.repeats},
        "\n".join(lines),
        Path(config.results_dir) if config.results_dir else None,
        invocation(__file__, argv),
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
