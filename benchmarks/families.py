"""Today's DiT families at their real sizes: what RobuQ quantizes, what the export weighs, and how fast one
real-width block runs on integers against the PyTorch paths a CPU user would try.

    python benchmarks/families.py                      # sizes (seconds) and block speed (≈ 15 min on 2 cores)
    python benchmarks/families.py --parts sizes        # sizes only

Sizes: each family's published configuration is built on the meta device (no weights are allocated) and
quantized with the ``robuq`` preset; parameters are counted by role (block linears, modulation, full
precision, the low-rank branches robuq adds), and the export's bytes are computed from the packers' sizes
and the file's rules (fp16 for everything not packed), against bf16 and against a W4A4 layout (4-bit
weights with an fp16 scale per output channel on the same layers, the rest bf16, no low-rank branch).

Speed: a model of the family with one block at its real width (its embedders and head around it, which cost
little beside the block), batch 1, at the token count of a 512-pixel image (1,024 for Sana's 1,024 pixels),
random weights: fp32 eager, fp32 under torch.compile, torchao's int8 dynamic-activation quantize_ under
torch.compile, and robuq's export (W1.58A4, integer kernels), each timed once per round in alternating order;
a speed-up is the median over rounds of that round's ratio. Time it only on a quiet machine.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from common import ROOT, invocation, parse_config, time_ms, write_result
import robuq
from robuq.core.options import option
from robuq.deploy.export import _weight_format
from robuq.deploy.packing import PACKERS
from robuq.models.families import family_of
from robuq.models.families.flux import packed_inputs
from robuq.models.families.base import diffusers_module
from robuq.models.skeleton import meta_skeleton
from robuq.quant.linear import QuantLinear

# family → (diffusers class, the published configuration robuq is sized against, its name)
REAL = {
    "pixart": (
        "PixArtTransformer2DModel",
        dict(caption_channels=4096, sample_size=128, interpolation_scale=2, use_additional_conditions=False),
        "PixArt-Σ XL/2 1024",
    ),
    "sd3": (
        "SD3Transformer2DModel",
        dict(
            sample_size=128,
            patch_size=2,
            in_channels=16,
            num_layers=38,
            attention_head_dim=64,
            num_attention_heads=38,
            joint_attention_dim=4096,
            caption_projection_dim=2432,
            pooled_projection_dim=2048,
            out_channels=16,
            pos_embed_max_size=192,
            qk_norm="rms_norm",
        ),
        "SD3.5 Large",
    ),
    "flux": ("FluxTransformer2DModel", dict(guidance_embeds=True), "FLUX.1 [dev]"),
    "flux2": ("Flux2Transformer2DModel", dict(), "FLUX.2 [dev]"),
    "sana": ("SanaTransformer2DModel", dict(), "Sana 1.6B 1024"),
}
# One block of each family for the speed part: (family, label, config changes, image tokens, text tokens).
BLOCKS = [
    ("pixart", "PixArt-Σ block (1152)", dict(num_layers=1, sample_size=64), 1024, 300),
    ("sd3", "SD3.5 Large block (2432)", dict(num_layers=1, sample_size=64), 1024, 333),
    ("flux", "FLUX.1 double block (3072)", dict(num_layers=1, num_single_layers=0), 1024, 512),
    ("flux", "FLUX.1 single block (3072)", dict(num_layers=0, num_single_layers=1), 1024, 512),
    ("flux2", "FLUX.2 double block (6144)", dict(num_layers=1, num_single_layers=0), 1024, 512),
    ("sana", "Sana 1.6B block (2240)", dict(num_layers=1), 1024, 300),
]
TOY_SIZES = {
    "pixart": dict(
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=8,
        caption_channels=32,
        cross_attention_dim=16,
        sample_size=8,
    ),
    "sd3": dict(
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=8,
        joint_attention_dim=32,
        caption_projection_dim=16,
        pooled_projection_dim=32,
        sample_size=8,
        pos_embed_max_size=16,
    ),
    "flux": dict(
        num_layers=1,
        num_single_layers=1,
        num_attention_heads=2,
        attention_head_dim=16,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=(4, 4, 8),
        in_channels=4,
    ),
    "flux2": dict(
        num_layers=1,
        num_single_layers=1,
        num_attention_heads=2,
        attention_head_dim=16,
        joint_attention_dim=32,
        axes_dims_rope=(4, 4, 4, 4),
        in_channels=4,
    ),
    "sana": dict(
        num_layers=1,
        num_attention_heads=2,
        attention_head_dim=4,
        num_cross_attention_heads=2,
        cross_attention_head_dim=4,
        cross_attention_dim=8,
        caption_channels=8,
        in_channels=4,
        out_channels=4,
    ),
}


@dataclass
class FamiliesConfig:
    """The families benchmark's options."""

    parts: str = option("sizes,speed", "what to measure: sizes, speed, or both (comma-separated)")
    families: str = option(",".join(REAL), "families to measure (comma-separated)")
    act_bits: int = option(4, "activation bits of the quantized models")
    rounds: int = option(3, "speed: rounds, each timing every path once")
    repeats: int = option(2, "speed: forwards per path and round (their median is the round's time)")
    blocks: str = option("all", "speed: the blocks to time, by words of their labels (comma-separated, e.g. 'FLUX.1')")
    peers: str = option(
        "fp32_compiled,torchao_int8_compiled",
        "speed: PyTorch paths beside fp32 eager and the export (comma-separated; empty for none)",
    )
    results_dir: str = option(str(ROOT / "results"), "where families.{json,md} go")
    toy: bool = option(False, "tiny configurations and token counts everywhere (tests)", cli=True)


def build(family: str, config: FamiliesConfig, **changes) -> torch.nn.Module:
    name, real, _ = REAL[family]
    kwargs = {**real, **(TOY_SIZES[family] if config.toy else {}), **changes}
    return getattr(diffusers_module(), name)(**kwargs)


# ------------------------------------------------------------------------------------------------ sizes


def _layer_bytes(layer: QuantLinear) -> tuple[int, int]:
    """(bytes of the packed layer in an fp16 export, of which its low-rank branch's), read off its shape."""
    count, out = layer.in_features * layer.out_features, layer.out_features
    packed = PACKERS[_weight_format(layer, "ternary-2bit")].packed_bytes(count) + out * 2  # levels, fp16 scales
    lowrank = layer.rank * (layer.in_features + out) * 2
    extras = (out * 2 if layer.bias is not None else 0) + (layer.in_features if layer.hadamard_signs is not None else 0)
    return packed + lowrank + extras, lowrank


def size_row(family: str, config: FamiliesConfig) -> dict:
    with meta_skeleton():
        model = build(family, config)
        fp_params = sum(p.numel() for p in model.parameters())
        policy = robuq.preset("robuq", act_bits=config.act_bits)
        robuq.quantize_(model, policy, initialize=False)
    fam = family_of(model)
    roles = {"block linears": 0, "modulation": 0, "full precision": 0, "low-rank branches (added)": 0}
    export_bytes, w4a4_bytes, lowrank_bytes, block_bytes = 0, 0, 0, 0
    inside = set()
    for name, module in model.named_modules():
        if not isinstance(module, QuantLinear):
            continue
        inside.update(id(p) for p in module.parameters())
        count = module.in_features * module.out_features
        bias = module.out_features if module.bias is not None else 0
        adaln = fam.role_of(name) == "adaln"
        roles["modulation" if adaln else "block linears"] += count + bias
        roles["low-rank branches (added)"] += module.rank * (module.in_features + module.out_features)
        size, lowrank = _layer_bytes(module)
        export_bytes += size
        lowrank_bytes += lowrank
        if not adaln:
            block_bytes += size - lowrank
        w4a4_bytes += count // 2 + module.out_features * 2 + bias * 2
    rest = sum(p.numel() for p in model.parameters() if id(p) not in inside)
    roles["full precision"] = rest
    saved_buffers = sum(
        b.numel() for n, b in model.named_buffers() if "hadamard_signs" not in n and b.is_floating_point()
    )
    export_bytes += (rest + saved_buffers) * 2  # e.g. SD3's positional table is a saved buffer
    w4a4_bytes += (rest + saved_buffers) * 2
    block_weights = roles["block linears"]
    return {
        "family": family,
        "model": REAL[family][2],
        "class": REAL[family][0],
        "fp_params": fp_params,
        "params_by_role": roles,
        "export_bytes": export_bytes,
        "bf16_bytes": fp_params * 2,
        "w4a4_bytes": w4a4_bytes,
        "lowrank_bytes": lowrank_bytes,
        "block_bits_per_weight": block_bytes * 8 / block_weights if block_weights else 0.0,
        "ratio_bf16": fp_params * 2 / export_bytes,
        "ratio_w4a4": w4a4_bytes / export_bytes,
        "quantized_share": (roles["block linears"] + roles["modulation"]) / fp_params,
        "kept": dict(fam.kept),
        "notes": list(fam.notes),
    }


# ------------------------------------------------------------------------------------------------ speed


def block_inputs(model: torch.nn.Module, image_tokens: int, text_tokens: int) -> dict:
    """The family's example inputs with ``image_tokens`` image tokens and ``text_tokens`` caption tokens."""
    fam = family_of(model)
    inputs = fam.example_inputs(model, 1)
    x = inputs["hidden_states"]
    if x.ndim == 4:  # (B, C, H, W): a square latent of that many patches
        side = int(image_tokens**0.5) * (getattr(model.config, "patch_size", 1) or 1)
        inputs["hidden_states"] = torch.randn(1, x.shape[1], side, side)
        inputs["encoder_hidden_states"] = torch.randn(1, text_tokens, inputs["encoder_hidden_states"].shape[-1])
        return inputs
    return packed_inputs(model, 1, image_tokens, text_tokens)  # FLUX.1 and FLUX.2: tokens with their RoPE ids


def _peer(peer: str, fp: torch.nn.Module) -> torch.nn.Module:
    """A peer of ``fp``. torch.compile leaves the module as it is, so the compiled fp32 peer shares its
    weights; torchao's is a copy whose fp32 weights give way to int8 ones (a FLUX.2 block is 4 GB in fp32)."""
    if peer != "torchao_int8_compiled":
        return torch.compile(fp)
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    model = copy.deepcopy(fp)
    quantize_(model, Int8DynamicActivationInt8WeightConfig())
    return torch.compile(model)


def speed_row(
    family: str, label: str, changes: dict, image_tokens: int, text_tokens: int, config: FamiliesConfig, tmp: Path
) -> dict:
    torch.manual_seed(0)
    fp = build(family, config, **changes).eval()
    if config.toy:
        image_tokens, text_tokens = 16, 8
    inputs = block_inputs(fp, image_tokens, text_tokens)
    policy = robuq.preset("robuq", act_bits=config.act_bits)
    quantized = robuq.quantize_(copy.deepcopy(fp), policy, initialize=False)
    path = robuq.export_model(quantized, policy, tmp / "m.safetensors")
    del quantized  # only the export is timed: its fp32 latent weights would double the memory held
    models = {"fp32 eager": fp, "robuq export": robuq.load_exported(path)}
    missing = {}
    for peer in [p for p in config.peers.split(",") if p]:
        try:
            model = _peer(peer, fp)
            with torch.no_grad():
                model(**inputs, return_dict=False)  # compiles
            models[peer] = model
        except Exception as error:  # noqa: BLE001 - a peer that cannot run here is a row of the report
            missing[peer] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:200]
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.no_grad():
        for r in range(config.rounds):
            for kind, model in models.items() if r % 2 == 0 else reversed(models.items()):
                times[kind].append(time_ms(lambda: model(**inputs, return_dict=False), config.repeats, warmup=1))
    export = times["robuq export"]
    speedups = {k: statistics.median(t / e for t, e in zip(v, export)) for k, v in times.items() if k != "robuq export"}
    return {
        "family": family,
        "block": label,
        "image_tokens": image_tokens,
        "text_tokens": text_tokens,
        "ms": {k: statistics.median(v) for k, v in times.items()},
        "speedup_of_export": speedups,
        "missing": missing,
    }


# ------------------------------------------------------------------------------------------------ report


def markdown(payload: dict) -> str:
    lines = []
    if payload.get("sizes"):
        lines += [
            "## What is quantized, and what the export weighs",
            "",
            f"The `robuq` preset at A{payload['act_bits']} (block linears ternary, modulation W4A4), "
            "built from each model's published configuration on the meta device.",
            "",
            "| model | parameters | block linears | modulation | full precision | low-rank (added) | export | "
            "bits/weight (block linears) | × smaller than bf16 | × smaller than W4A4 |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in payload["sizes"]:
            p = r["params_by_role"]
            lines.append(
                f"| {r['model']} | {r['fp_params'] / 1e9:.2f} B | {p['block linears'] / 1e9:.2f} B | "
                f"{p['modulation'] / 1e9:.3f} B | {p['full precision'] / 1e9:.3f} B | "
                f"{p['low-rank branches (added)'] / 1e6:.1f} M | {r['export_bytes'] / 2**30:.2f} GiB | "
                f"{r['block_bits_per_weight']:.2f} | {r['ratio_bf16']:.1f}× | {r['ratio_w4a4']:.2f}× |"
            )
        lines += ["", "Kept in full precision, per family:", ""]
        for r in payload["sizes"]:
            kept = "; ".join(f"`{k}` ({v})" for k, v in r["kept"].items())
            notes = "".join(f"; {n}" for n in r["notes"])
            lines.append(f"- **{r['model']}**: {kept}{notes}.")
    if payload.get("speed"):
        lines += [
            "",
            "## One real-width block, batch 1, on this CPU",
            "",
            "Median over rounds of each round's ratio (alternating order); `ms`: median time of a forward.",
            "",
            "| block | tokens (image + text) | fp32 eager ms | export ms | export vs fp32 eager | vs fp32 compiled | "
            "vs torchao int8 compiled |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in payload["speed"]:
            s = r["speedup_of_export"]
            cell = lambda k: f"{s[k]:.2f}×" if k in s else "not run"  # noqa: E731
            lines.append(
                f"| {r['block']} | {r['image_tokens']} + {r['text_tokens']} | {r['ms']['fp32 eager']:.0f} | "
                f"{r['ms']['robuq export']:.0f} | {cell('fp32 eager')} | {cell('fp32_compiled')} | "
                f"{cell('torchao_int8_compiled')} |"
            )
        earlier = [r for r in payload["speed"] if "measured" in r]
        if earlier:
            lines += [
                "",
                "Rows timed by an earlier run of this benchmark on this machine: "
                + "; ".join(f"{r['block']} ({r['measured']['date']})" for r in earlier)
                + ".",
            ]
        missing = {f"{r['block']}: {k}": v for r in payload["speed"] for k, v in r["missing"].items()}
        if missing:
            lines += ["", "Peers that could not run: " + "; ".join(f"{k} ({v})" for k, v in missing.items())]
    return "\n".join(lines)


def keep_earlier_rows(payload: dict, previous: Path) -> None:
    """Blocks timed by an earlier run of this benchmark and not now keep their rows, each with that run's date
    and command (so that a long speed run can be split into parts on a quiet machine)."""
    if "speed" not in payload or not previous.is_file():
        return
    earlier = json.loads(previous.read_text())
    measured = {r["block"] for r in payload["speed"]}
    for row in earlier.get("speed", []):
        if row["block"] not in measured:
            row.setdefault("measured", {"date": earlier.get("date"), "command": earlier.get("command")})
            payload["speed"].append(row)
    if "sizes" not in payload and "sizes" in earlier:
        payload["sizes"] = earlier["sizes"]


def main(argv: list[str] | None = None) -> dict:
    config = parse_config(FamiliesConfig, argv, __doc__)
    parts = {p.strip() for p in config.parts.split(",") if p.strip()}
    families = [f.strip() for f in config.families.split(",") if f.strip()]
    unknown = [f for f in families if f not in REAL]
    if unknown or not parts <= {"sizes", "speed"}:
        raise SystemExit(
            f"unknown families {unknown} or parts {sorted(parts - {'sizes', 'speed'})}; "
            f"families: {', '.join(REAL)}; parts: sizes, speed"
        )
    payload = {"act_bits": config.act_bits, "settings": dataclasses.asdict(config)}
    if "sizes" in parts:
        payload["sizes"] = [size_row(f, config) for f in families]
    if "speed" in parts:
        with tempfile.TemporaryDirectory() as tmp:
            wanted = [b.strip() for b in config.blocks.split(",") if b.strip() and config.blocks != "all"]
            payload["speed"] = [
                speed_row(f, label, changes, it, tt, config, Path(tmp))
                for f, label, changes, it, tt in BLOCKS
                if f in families and (not wanted or any(w in label for w in wanted))
            ]
    keep_earlier_rows(payload, Path(config.results_dir) / "families.json")
    write_result("families", payload, markdown(payload), Path(config.results_dir), invocation(__file__, argv))
    return payload


if __name__ == "__main__":
    main(sys.argv[1:])
