"""The method's open choices (docs/method.md), measured before any training: the output error against the teacher right
after quantization (post-training initialisation), on the fixed calibration batch AMPN and the QAT probe use.

Which choice trains best is the reproduction benchmark's job; this table says where each one starts.
Rows: the RobustQuantizer's scale rule (also with full-precision weights, to isolate it) (min–max / Gaussian / Gaussian with the learnable ratio at
its initial value), sign flips before the Hadamard transform, the low-rank rank (0/8/16/32), and whether
the branch sees full-precision or quantized inputs — each at A4, A3 and A2.

    python benchmarks/open_choices.py     # → results/open_choices.{json,md}
    python benchmarks/open_choices.py --ckpt tiny.safetensors --images 8 --data-dir DIR   # a check of the script
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from common import invocation, parse_config, write_result
from robuq.core.options import option
import robuq
from robuq.train.calibration import calibration_batch, relative_error
from robuq.data import build_dataset
from robuq.core.runtime import default_teacher_path
from robuq.train.qat import build_student, calibration_images

VARIANTS = {
    "baseline (min–max, rank 16, signs)": {},
    "scale rule: Gaussian (robuq)": {"act_rule": "gaussian"},
    "no sign flips, min–max": {"hadamard_signs": False},
    "no sign flips, Gaussian": {"hadamard_signs": False, "act_rule": "gaussian"},
    "Gaussian, rank 0": {"act_rule": "gaussian", "lowrank_rank": 0},
    "Gaussian, rank 8": {"act_rule": "gaussian", "lowrank_rank": 8},
    "Gaussian, rank 32": {"act_rule": "gaussian", "lowrank_rank": 32},
    "Gaussian, branch on quantized x'": {"act_rule": "gaussian", "lowrank_input": "quantized"},
    # Full-precision weights isolate the activation quantizer, which ternary weights otherwise drown out.
    "fp weights, no Hadamard, min–max": {"weight": "fp", "hadamard": False, "lowrank_rank": 0},
    "fp weights, Hadamard+signs, min–max": {"weight": "fp", "lowrank_rank": 0},
    "fp weights, Hadamard+signs, Gaussian": {"weight": "fp", "lowrank_rank": 0, "act_rule": "gaussian"},
    "fp weights, Hadamard, no signs, Gaussian": {
        "weight": "fp",
        "lowrank_rank": 0,
        "act_rule": "gaussian",
        "hadamard_signs": False,
    },
    # A first measurement showed the Gaussian rule hurting qkv/proj and helping fc1/fc2; these rows test it.
    "fp weights, Gaussian on fc1/fc2 only": {"weight": "fp", "lowrank_rank": 0, "gaussian_roles": ("fc1", "fc2")},
    "ternary, Gaussian on fc1/fc2 only": {"gaussian_roles": ("fc1", "fc2")},
}


def policy(bits: int, changes: dict) -> robuq.QuantConfig:
    changes = dict(changes)
    gaussian_roles = changes.pop("gaussian_roles", ())
    config = robuq.preset("baseline", act_bits=bits)
    for rule in config.rules:
        if rule.role != "adaln":
            rule.linear = replace(rule.linear, **changes)
            if rule.role in gaussian_roles:
                rule.linear = replace(rule.linear, act_rule="gaussian")
    return config


@dataclass
class OpenChoicesConfig:
    """Options of this benchmark."""

    ckpt: str | None = option(None, "the teacher (default: the shipped one)")
    images: int = option(128, "calibration images (training split)")
    data_dir: str | None = option(None, "folder of the Fashion-MNIST IDX files")
    results_dir: str | None = option(None, "where the JSON and Markdown go (default: results/)")


def main(argv: list[str] | None = None) -> None:
    config = parse_config(OpenChoicesConfig, argv, __doc__)
    teacher = robuq.load_dit(config.ckpt or default_teacher_path()).eval()
    size = teacher.x_embedder.grid_size * teacher.patch_size
    dataset = build_dataset("fashion-mnist", size, config.data_dir, teacher.num_classes > 0)
    batch = calibration_batch(teacher, *calibration_images(dataset, config.images, teacher.num_classes > 0), seed=0)
    rows = []
    for name, changes in VARIANTS.items():
        row = {"variant": name, "changes": {k: list(v) if isinstance(v, tuple) else v for k, v in changes.items()}}
        for bits in (4, 3, 2):
            torch.manual_seed(0)
            row[f"a{bits}"] = relative_error(build_student(teacher, policy(bits, changes)), batch)
        rows.append(row)
        print(row)
    lines = [
        "Relative output MSE against the teacher (÷ the teacher output's variance) right after quantization, "
        f"{config.images} training images at timesteps spread over [0, 1000). Lower is better.",
        "",
        "| variant | A4 | A3 | A2 |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['variant']} | {r['a4']:.4f} | {r['a3']:.4f} | {r['a2']:.4f} |" for r in rows]
    write_result(
        "open_choices",
        {"rows": rows, "images": config.images, "ckpt": str(config.ckpt or default_teacher_path().name)},
        "\n".join(lines),
        Path(config.results_dir) if config.results_dir else None,
        invocation(__file__, argv),
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
