"""Evidence for RobustQuantizer's premise: after a Hadamard transform, tokens look Gaussian.

Takes real activations of the teacher — the inputs of every block linear (qkv, proj, fc1, fc2) while
it denoises Fashion-MNIST test images noised at timesteps spread over [0, 1000) — and reports, before
and after the (normalised, orthogonal) Hadamard transform: per-token excess kurtosis, max|x − μ|/σ, and
the relative MSE of 2/3/4-bit per-token quantization (min–max and Gaussian-optimal scale rules).
Because H is orthogonal, the error measured in the rotated basis equals the error of the layer input.
"after" is H·x; "after_signs" is H·D·x with random signs D, as robuq's presets use by default.

    python benchmarks/activation_stats.py   # → results/activation_stats.{json,md,png}
    python benchmarks/activation_stats.py --ckpt tiny.safetensors --images 4 --timesteps 100,900 --data-dir DIR   # a check
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common import ROOT, invocation, parse_config, write_result
from robuq.core.options import option
from robuq.data.fashion_mnist import FashionMNIST
from robuq.diffusion.gaussian import create_diffusion
from robuq.models.checkpoint import load_dit
from robuq.quant.activation import quantize_activation
from robuq.quant.hadamard import hadamard_transform, random_signs
from robuq.core.runtime import default_teacher_path

ROLES = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
BASIS_LABELS = {"before": "x", "after": "H·x", "after_signs": "H·D·x (random signs D)"}


def token_stats(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-token excess kurtosis and max deviation in standard deviations; x is (tokens, C)."""
    centred = x - x.mean(dim=1, keepdim=True)
    var = centred.pow(2).mean(dim=1).clamp_min(1e-12)
    return {
        "kurtosis": centred.pow(4).mean(dim=1) / var.pow(2) - 3.0,
        "max_over_std": centred.abs().amax(dim=1) / var.sqrt(),
    }


def relative_mse(x: torch.Tensor, bits: int, rule: str) -> float:
    centred_var = (x - x.mean(dim=1, keepdim=True)).pow(2).mean()
    return ((quantize_activation(x, bits, "token", rule)[0] - x).pow(2).mean() / centred_var).item()


@torch.no_grad()
def collect(model, images, labels, timesteps, seed: int) -> dict[str, torch.Tensor]:
    """Inputs of every block linear, (tokens, C) per layer, over all images and timesteps."""
    captured: dict[str, list[torch.Tensor]] = defaultdict(list)
    hooks = []
    for name, module in model.named_modules():
        if name.endswith(ROLES) and name.startswith("blocks."):
            hooks.append(
                module.register_forward_hook(
                    lambda m, a, o, n=name: captured[n].append(a[0].reshape(-1, a[0].shape[-1]))
                )
            )
    diffusion = create_diffusion(learn_sigma=model.out_channels != model.in_channels)
    g = torch.Generator().manual_seed(seed)
    try:
        for t in timesteps:
            tt = torch.full((len(images),), int(t))
            noisy = diffusion.q_sample(images, tt, noise=torch.randn(images.shape, generator=g))
            model(noisy, tt, labels)
    finally:
        for h in hooks:
            h.remove()
    return {k: torch.cat(v) for k, v in captured.items()}


@dataclass
class ActivationStatsConfig:
    """Options of this benchmark."""

    ckpt: str | None = option(None, "model file (default: the shipped teacher)")
    images: int = option(32, "test images")
    timesteps: str = option("50,250,500,750,950", "diffusion timesteps, comma-separated")
    data_dir: str | None = option(None, "folder of the Fashion-MNIST IDX files")
    seed: int = option(0, "seed of the noise and the sign flips")
    results_dir: str = option(str(ROOT / "results"), "where the JSON, Markdown and figure go")


def main(argv: list[str] | None = None) -> None:
    config = parse_config(ActivationStatsConfig, argv, __doc__)
    torch.manual_seed(config.seed)
    model = load_dit(config.ckpt or default_teacher_path()).eval()
    size = model.x_embedder.grid_size * model.patch_size
    data = FashionMNIST("test", size, config.data_dir, indices=np.arange(config.images))
    timesteps = [int(t) for t in config.timesteps.split(",")]
    acts = collect(model, data.images, data.labels, timesteps, config.seed)

    per_layer, pooled = {}, defaultdict(lambda: defaultdict(list))
    for name, x in acts.items():
        rotated = hadamard_transform(x)
        flipped = hadamard_transform(x, random_signs(x.shape[1], config.seed))
        row = {"tokens": x.shape[0], "channels": x.shape[1]}
        for basis, tensor in (("before", x), ("after", rotated), ("after_signs", flipped)):
            stats = token_stats(tensor)
            for key, values in stats.items():
                row[f"{key}_{basis}"] = values.median().item()
                pooled[basis][key].append(values)
            for bits in (2, 3, 4):
                for rule in ("minmax", "gaussian"):
                    row[f"mse_a{bits}_{rule}_{basis}"] = relative_mse(tensor, bits, rule)
        per_layer[name] = row

    def mean_over(role: str, key: str) -> float:
        return float(np.mean([r[key] for n, r in per_layer.items() if n.endswith(role)]))

    keys = ["kurtosis", "max_over_std"] + [f"mse_a{b}_{r}" for b in (2, 3, 4) for r in ("minmax", "gaussian")]
    bases = ("before", "after", "after_signs")
    by_role = {
        role: {f"{k}_{basis}": mean_over(role, f"{k}_{basis}") for k in keys for basis in bases} for role in ROLES
    }
    lines = [
        "Per-role means over layers of the per-layer median token statistic (kurtosis, max/σ) and of the relative "
        "quantization MSE (error power ÷ token variance). Gaussian tokens have excess kurtosis 0. Each cell reads "
        "x / H·x / H·D·x (D: random signs).",
        "",
        "| layer | kurtosis | max/σ | A2 min–max | A2 Gaussian | A3 min–max | A3 Gaussian | A4 min–max | A4 Gaussian |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(r: dict, key: str, fmt: str) -> str:
        return " / ".join(format(r[f"{key}_{basis}"], fmt) for basis in bases)

    for role, r in by_role.items():
        quant_cells = [cell(r, f"mse_a{b}_{rule}", ".4f") for b in (2, 3, 4) for rule in ("minmax", "gaussian")]
        lines.append(
            f"| {role} | {cell(r, 'kurtosis', '.2f')} | {cell(r, 'max_over_std', '.1f')} | "
            + " | ".join(quant_cells)
            + " |"
        )
    figure = Path(config.results_dir) / "activation_stats.png"
    figure.parent.mkdir(parents=True, exist_ok=True)
    plot(pooled, acts, figure)
    write_result(
        "activation_stats",
        {
            "ckpt": str(config.ckpt or default_teacher_path().name),
            "images": config.images,
            "timesteps": timesteps,
            "by_role": by_role,
            "per_layer": per_layer,
            "figure": figure.name,
        },
        "\n".join(lines) + f"\n\n![histograms]({figure.name})",
        figure.parent,
        invocation(__file__, argv),
    )
    print("\n".join(lines))


def plot(pooled, acts, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for basis, colour in (("before", "tab:red"), ("after", "tab:orange"), ("after_signs", "tab:blue")):
        k = torch.cat(pooled[basis]["kurtosis"]).clamp(-2, 30).numpy()
        label = BASIS_LABELS[basis]
        axes[0].hist(k, bins=120, alpha=0.5, color=colour, label=label, density=True)
        m = torch.cat(pooled[basis]["max_over_std"]).clamp(max=40).numpy()
        axes[1].hist(m, bins=120, alpha=0.5, color=colour, label=label, density=True)
    axes[0].set(title="per-token excess kurtosis (all block linears)", xlabel="excess kurtosis (Gaussian = 0)")
    axes[1].set(title="per-token max |x − μ| / σ", xlabel="max deviation in σ")
    name = max(acts, key=lambda n: token_stats(hadamard_transform(acts[n]))["kurtosis"].median().item())
    x = acts[name]
    token = token_stats(x)["kurtosis"].argmax()
    signs = random_signs(x.shape[1], 0)
    shown = (
        (x[token], "tab:red", BASIS_LABELS["before"]),
        (hadamard_transform(x[token]), "tab:orange", BASIS_LABELS["after"]),
        (hadamard_transform(x[token], signs), "tab:blue", BASIS_LABELS["after_signs"]),
    )
    for tensor, colour, label in shown:
        z = ((tensor - tensor.mean()) / tensor.std()).numpy()
        axes[2].hist(z, bins=80, alpha=0.5, color=colour, label=label, density=True)
    grid = np.linspace(-5, 5, 200)
    axes[2].plot(grid, np.exp(-(grid**2) / 2) / np.sqrt(2 * np.pi), "k--", label="N(0, 1)")
    axes[2].set(title=f"most heavy-tailed token of {name}", xlabel="standardised value", xlim=(-8, 8))
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
