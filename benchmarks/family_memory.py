"""GPU memory of RobuQ QAT for each family at its real size, on 1 and on 8 80-GB GPUs: an estimate computed from
the published configurations' parameter counts, not a measurement.

    python benchmarks/family_memory.py              # seconds; writes results/family_memory.{json,md}

Per GPU, in bytes, with P the model's parameters and R the low-rank branches robuq adds (the paper's share,
16 of 1,152 of each layer's width):

- the student's latent weights in fp32 (4·(P+R)), their fp32 gradients (4·(P+R)), AdamW's two moments
  (8·(P+R)) and the EMA (4·(P+R)) — divided by the GPU count under ``--shard fsdp``, whole on each GPU
  under DDP (1 GPU: whole);
- the frozen teacher in bf16 (2·P), sharded like the student under ``--shard fsdp``;
- under FSDP, the largest block gathered whole, the student's (fp32) and the teacher's (bf16), twice
  (the next one is prefetched);
- activations under bf16 autocast with ``--grad-checkpoint``: each block's input kept (fp32 residual stream,
  4·s·h per sample per block) and one block's activations during its recomputation, by the per-layer rule of
  Korthikanti et al. (2022) at 16 bits, s·h·(34 + 5·a·s/h) bytes, plus 28·s·h for the fake-quantized linears'
  rotated and quantized input copies; attention scores are not fused (robuq's 8-bit attention forms QKᵀ).

s is the token count of a 1,024-pixel image with its caption (image tokens + text tokens), h the width, a the
heads. Batch: per GPU, as stated. The estimates are what to check on a GPU first; ``gpu_check.py`` measures.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common import ROOT, invocation, parse_config, write_result
import robuq
from families import REAL, FamiliesConfig, build
from robuq.core.options import option
from robuq.models.skeleton import meta_skeleton
from robuq.quant.linear import QuantLinear

GB = 1e9
PAPER_SHARE = 16 / 1152
# family → (image tokens at 1,024 pixels, text tokens): FLUX/SD3/PixArt latents /8 patched 2×2; Sana /32, patch 1.
TOKENS = {"pixart": (4096, 300), "sd3": (4096, 333), "flux": (4096, 512), "flux2": (4096, 512), "sana": (1024, 300)}
QUANTIZER_COPIES = 28  # bytes per token and unit of width: the block linears' rotated and quantized inputs


@dataclass
class MemoryConfig:
    batches: str = option("1,4", "batches per GPU (comma-separated)")
    gpus: str = option("1,8,16", "GPU counts (comma-separated)")
    gpu_gb: float = option(80.0, "memory of one GPU in GB")
    families: str = option(",".join(REAL), "families (comma-separated)")
    results_dir: str = option(str(ROOT / "results"), "where family_memory.{json,md} go")


def shape_of(family: str) -> dict:
    """Parameters, low-rank additions, width, heads, depth and the largest block of the family's real model."""
    with meta_skeleton():
        model = build(family, FamiliesConfig())
        params = sum(p.numel() for p in model.parameters())
        robuq.quantize_(model, robuq.preset("robuq", act_bits=4, lowrank_share=PAPER_SHARE), initialize=False)
    lowrank = sum(m.rank * (m.in_features + m.out_features) for m in model.modules() if isinstance(m, QuantLinear))
    blocks = [b for name, lst in model.named_children() if name.endswith("blocks") for b in lst]
    largest = max(sum(p.numel() for p in b.parameters()) for b in blocks)
    config = model.config
    heads = config.num_attention_heads
    width = heads * config.attention_head_dim
    return {
        "params": params,
        "lowrank": lowrank,
        "width": width,
        "heads": heads,
        "blocks": len(blocks),
        "largest": largest,
    }


def per_gpu(shape: dict, family: str, batch: int, gpus: int) -> dict:
    trained = shape["params"] + shape["lowrank"]
    sharded = gpus > 1
    state = 20 * trained / (gpus if sharded else 1)  # fp32 weights, grads, AdamW m and v, EMA
    teacher = 2 * shape["params"] / (gpus if sharded else 1)
    gathered = 2 * (4 + 2) * shape["largest"] if sharded else 0  # a student block (fp32) and a teacher block
    s = sum(TOKENS[family])
    h, a, layers = shape["width"], shape["heads"], shape["blocks"]
    kept = layers * 4 * s * h * batch
    recompute = batch * s * h * (34 + QUANTIZER_COPIES + 5 * a * s / h)
    activations = kept + recompute
    total = state + teacher + gathered + activations
    return {
        "batch": batch,
        "gpus": gpus,
        "shard": "fsdp" if sharded else "none",
        "state_gb": state / GB,
        "teacher_gb": teacher / GB,
        "gathered_gb": gathered / GB,
        "activations_gb": activations / GB,
        "total_gb": total / GB,
    }


def markdown(payload: dict, gpu_gb: float) -> str:
    lines = [
        "## Estimated memory per GPU of RobuQ QAT at the families' real sizes",
        "",
        "Estimates from parameter counts (see the script's docstring for every term), not measurements. "
        f"'fits' compares the total with {gpu_gb:.0f} GB. The sharded rows assume each process builds and loads "
        "only its shards (a bf16 teacher included); robuq does not yet: its processes build whole fp32 copies "
        "before sharding, so the sharded totals are not reachable at these sizes today.",
        "",
        "| model | parameters | GPUs | shard | batch/GPU | weights, grads, AdamW, EMA | teacher (bf16) | "
        "gathered block | activations | total | fits |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in payload["rows"]:
        for r in row["per_gpu"]:
            lines.append(
                f"| {row['model']} | {row['params'] / 1e9:.2f} B | {r['gpus']} | {r['shard']} | {r['batch']} | "
                f"{r['state_gb']:.1f} GB | {r['teacher_gb']:.1f} GB | {r['gathered_gb']:.1f} GB | "
                f"{r['activations_gb']:.1f} GB | {r['total_gb']:.1f} GB | {'yes' if r['total_gb'] <= gpu_gb else 'no'} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    config = parse_config(MemoryConfig, argv, __doc__)
    batches = [int(b) for b in config.batches.split(",")]
    gpus = [int(g) for g in config.gpus.split(",")]
    rows = []
    for family in config.families.split(","):
        shape = shape_of(family)
        rows.append(
            {
                "family": family,
                "model": REAL[family][2],
                **shape,
                "tokens": TOKENS[family],
                "per_gpu": [per_gpu(shape, family, b, g) for g in gpus for b in batches],
            }
        )
    payload = {"gpu_gb": config.gpu_gb, "lowrank_share": PAPER_SHARE, "rows": rows}
    markdown_text = markdown(payload, config.gpu_gb)
    write_result("family_memory", payload, markdown_text, Path(config.results_dir), invocation(__file__, argv))
    return payload


if __name__ == "__main__":
    main()
