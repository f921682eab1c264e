"""Diffusion Transformer with adaLN-Zero, module-for-module compatible with facebookresearch/DiT.

Module names, parameter shapes and the state_dict layout follow the reference implementation so that
its checkpoints load unchanged; the code itself is written independently.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.utils.checkpoint
import torch.nn.functional as F

from robuq.core.options import check_field_types, check_known_fields, option
from robuq.core.errors import RobuqError


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class PatchEmbed(nn.Module):
    """Image to patch tokens by a strided convolution (the reference uses timm's PatchEmbed)."""

    def __init__(self, input_size: int, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        if input_size % patch_size:
            raise RobuqError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        self.patch_size = patch_size
        self.grid_size = input_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Sinusoidal timestep features followed by a two-layer MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, frequency_shift: float = 0.0):
        super().__init__()
        self.frequency_shift = frequency_shift
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0, shift: float = 0.0) -> torch.Tensor:
        """cos/sin features of ``t`` at frequencies max_period^(−i/(dim/2 − shift)); the reference uses
        shift 0, diffusers' DiT ports shift 1."""
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - shift)
        )
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size, shift=self.frequency_shift))


class LabelEmbedder(nn.Module):
    """Class embedding with one extra "null" row used for classifier-free guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


class AttentionCore(nn.Module):
    """softmax(Q Kᵀ / √d) V as its own module, so quantization can replace the two matmuls."""

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None = None,
        scale: float | None = None,
    ) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (names as in timm's Attention)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise RobuqError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.core = AttentionCore()
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        x = self.core(qkv[0], qkv[1], qkv[2])
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=True)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ModulatedLayerNorm(nn.LayerNorm):
    """modulate(LayerNorm(x), shift, scale), LayerNorm without affine weights, as its own module (like
    AttentionCore) so that inference can replace it with a fused kernel; it holds no parameters."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__(hidden_size, elementwise_affine=False, eps=eps)

    def forward(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return modulate(super().forward(x), shift, scale)


class GatedResidual(nn.Module):
    """x + gate · y, the gated residual update of adaLN-Zero, as its own module (see ModulatedLayerNorm)."""

    def forward(self, x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x + gate.unsqueeze(1) * y


class DiTBlock(nn.Module):
    """Transformer block whose LayerNorms are modulated by the conditioning (adaLN-Zero)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, mlp_norm_eps: float = 1e-6):
        super().__init__()
        self.norm1 = ModulatedLayerNorm(hidden_size, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = ModulatedLayerNorm(hidden_size, eps=mlp_norm_eps)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))
        self.residual = GatedResidual()

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = self.residual(x, gate_msa, self.attn(self.norm1(x, shift_msa, scale_msa)))
        x = self.residual(x, gate_mlp, self.mlp(self.norm2(x, shift_mlp, scale_mlp)))
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = ModulatedLayerNorm(hidden_size, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(self.norm_final(x, shift, scale))


@dataclass(frozen=True)
class DiTConfig:
    """Everything needed to rebuild a DiT; stored beside every checkpoint robuq writes."""

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    num_classes: int = 1000
    learn_sigma: bool = True
    # Two details in which diffusers' DiTTransformer2DModel differs from the reference; the defaults
    # are the reference's, robuq.models.convert_diffusers sets them for models converted from diffusers.
    timestep_freq_shift: float = option(
        0.0, "timestep features at frequencies 10000^(-i/(128 - shift)): 0 reference, 1 diffusers"
    )
    mlp_norm_eps: float = option(1e-6, "epsilon of the LayerNorm before each block's MLP (diffusers: its norm_eps)")

    def __post_init__(self) -> None:
        check_field_types(self, "model config")
        sizes = (self.input_size, self.patch_size, self.in_channels, self.hidden_size, self.depth, self.num_heads)
        if (
            min(sizes) < 1
            or self.num_classes < 0
            or self.hidden_size % self.num_heads
            or self.input_size % self.patch_size
        ):
            raise RobuqError(
                f"model config: sizes must be positive, hidden_size a multiple of num_heads and input_size of "
                f"patch_size; got {self.to_dict()}"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "DiTConfig":
        """The config a file's header records; a ValueError for unknown fields or wrong types."""
        return cls(**check_known_fields(data, cls, "model config"))


class DiT(nn.Module):
    """Class-conditional (num_classes > 0) or unconditional (num_classes == 0) DiT."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        self.in_channels = config.in_channels
        self.out_channels = config.in_channels * 2 if config.learn_sigma else config.in_channels
        self.patch_size = config.patch_size
        self.num_heads = config.num_heads
        self.num_classes = config.num_classes
        hidden = config.hidden_size

        self.x_embedder = PatchEmbed(config.input_size, config.patch_size, config.in_channels, hidden)
        self.t_embedder = TimestepEmbedder(hidden, frequency_shift=config.timestep_freq_shift)
        self.y_embedder = (
            LabelEmbedder(config.num_classes, hidden, config.class_dropout_prob) if config.num_classes > 0 else None
        )
        # Fixed sin-cos embedding, stored as a frozen parameter because reference checkpoints carry it.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, hidden), requires_grad=False)
        self.blocks = nn.ModuleList(
            [
                DiTBlock(hidden, config.num_heads, mlp_ratio=config.mlp_ratio, mlp_norm_eps=config.mlp_norm_eps)
                for _ in range(config.depth)
            ]
        )
        self.final_layer = FinalLayer(hidden, config.patch_size, self.out_channels)
        self.grad_checkpoint = False  # training: recompute each block in the backward pass (memory for time)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        def xavier_linear(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

        self.apply(xavier_linear)
        pos = sincos_pos_embed_2d(self.pos_embed.shape[-1], self.x_embedder.grid_size)
        self.pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))

        # Initialise the patch projection like a linear layer on the flattened patch.
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)

        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        # adaLN-Zero: every block starts as the identity, the output starts at zero.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p·p·C) tokens back to (N, C, H, W) images."""
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        force_drop_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (N, C, H, W) noisy input, t: (N,) timesteps, y: (N,) labels (ignored when unconditional).

        ``force_drop_ids`` (N,) of 0/1 replaces the random label dropout, so that a student and its teacher
        can be shown the same dropped labels during distillation.
        """
        x = self.x_embedder(x) + self.pos_embed
        c = self.condition(t, y, force_drop_ids)
        checkpointed = self.grad_checkpoint and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            x = torch.utils.checkpoint.checkpoint(block, x, c, use_reentrant=False) if checkpointed else block(x, c)
        return self.head(x, c)

    def condition(
        self, t: torch.Tensor, y: torch.Tensor | None = None, force_drop_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The conditioning vector c that modulates every block: timestep (+ label) embedding."""
        c = self.t_embedder(t)
        if self.y_embedder is not None:
            if y is None:
                raise RobuqError("this DiT is class-conditional: pass labels y (use num_classes for the null class)")
            c = c + self.y_embedder(y, self.training, force_drop_ids)
        return c

    def head(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Final adaLN layer and unpatchify: tokens after the last block to the output image."""
        return self.unpatchify(self.final_layer(x, c))

    def forward_with_cfg(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float, channels: int | None = None
    ) -> torch.Tensor:
        """Classifier-free guidance: the batch holds the conditional half, then the null-class half.

        ``channels=None`` guides every noise channel; ``channels=3`` is the reference's behaviour (it guides
        only the first three of the four latent channels, which its published FIDs were measured with).
        The other channels and the variance come from the conditional prediction.
        """
        half = x[: len(x) // 2]
        combined = torch.cat([half, half], dim=0)
        out = self.forward(combined, t, y)
        guide = self.in_channels if channels is None else channels
        if not 0 < guide <= self.in_channels:
            raise RobuqError(f"cannot guide {guide} channels of a {self.in_channels}-channel DiT")
        eps, rest = out[:, :guide], out[:, guide:]
        cond_eps, uncond_eps = eps.chunk(2, dim=0)
        guided = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        eps = torch.cat([guided, guided], dim=0)
        return torch.cat([eps, rest], dim=1)


def sincos_pos_embed_1d(embed_dim: int, positions: np.ndarray) -> np.ndarray:
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", positions.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_pos_embed_2d(embed_dim: int, grid_size: int) -> np.ndarray:
    """(grid_size², embed_dim) table; half the channels encode the column, half the row."""
    coords = np.arange(grid_size, dtype=np.float32)
    grid_w, grid_h = np.meshgrid(coords, coords)  # the reference puts the width coordinate first
    emb_a = sincos_pos_embed_1d(embed_dim // 2, grid_w)
    emb_b = sincos_pos_embed_1d(embed_dim // 2, grid_h)
    return np.concatenate([emb_a, emb_b], axis=1)


# name -> (depth, hidden_size, num_heads); every size is also offered at patch 2, 4 and 8.
DIT_SIZES: dict[str, tuple[int, int, int]] = {
    "XL": (28, 1152, 16),
    "L": (24, 1024, 16),
    "B": (12, 768, 12),
    "S": (12, 384, 6),
    # CPU-sized configs for robuq's own experiments; 192 = 12·16 and 768 = 12·64 keep the Hadamard
    # transform on a non-power-of-two size, as on the real models.
    "T": (6, 192, 3),
}
DIT_MODELS: tuple[str, ...] = tuple(f"DiT-{size}/{patch}" for size in DIT_SIZES for patch in (2, 4, 8))


def dit_config(
    name: str,
    input_size: int = 32,
    num_classes: int = 1000,
    learn_sigma: bool = True,
    in_channels: int = 4,
    class_dropout_prob: float = 0.1,
) -> DiTConfig:
    """The DiTConfig of a registry name such as "DiT-XL/2"."""
    try:
        prefix, patch = name.split("/")
        depth, hidden, heads = DIT_SIZES[prefix.removeprefix("DiT-")]
        patch_size = int(patch)
    except (ValueError, KeyError):
        raise RobuqError(f"unknown DiT model {name!r}; choose one of: {', '.join(DIT_MODELS)}") from None
    if patch_size not in (2, 4, 8):
        raise RobuqError(f"unknown DiT model {name!r}; patch size must be 2, 4 or 8")
    return DiTConfig(
        input_size=input_size,
        patch_size=patch_size,
        in_channels=in_channels,
        hidden_size=hidden,
        depth=depth,
        num_heads=heads,
        num_classes=num_classes,
        learn_sigma=learn_sigma,
        class_dropout_prob=class_dropout_prob if num_classes > 0 else 0.0,
    )


def create_dit(
    name: str,
    input_size: int = 32,
    num_classes: int = 1000,
    learn_sigma: bool = True,
    in_channels: int = 4,
    class_dropout_prob: float = 0.1,
) -> DiT:
    """Build a DiT by its reference registry name, e.g. ``create_dit("DiT-XL/2")``.

    ``num_classes=0`` gives an unconditional model; ``in_channels=4`` is the SD-VAE latent, use 1 or 3
    for pixel-space models.
    """
    return DiT(dit_config(name, input_size, num_classes, learn_sigma, in_channels, class_dropout_prob))


def count_parameters(model: nn.Module) -> int:
    """All parameters, frozen ones (pos_embed) included, as the DiT paper counts them."""
    return sum(p.numel() for p in model.parameters())


def forward_macs(config: DiTConfig) -> int:
    """Multiply-accumulates of one forward pass for one image, the unit the DiT paper calls "Gflops"."""
    h, n = config.hidden_size, (config.input_size // config.patch_size) ** 2
    mlp = int(h * config.mlp_ratio)
    per_block = n * (3 * h * h + h * h + 2 * h * mlp) + 2 * n * n * h + h * 6 * h
    patch = n * config.in_channels * config.patch_size**2 * h
    out_channels = config.in_channels * (2 if config.learn_sigma else 1)
    final = n * h * config.patch_size**2 * out_channels + h * 2 * h
    timestep = 256 * h + h * h
    return config.depth * per_block + patch + final + timestep
