"""A small text encoder for the text-to-image miniature: word embeddings and a few transformer layers.

It plays the part T5 or CLIP play for the real families: trained with the teacher, then frozen, and its
outputs cached once as prompt embeddings (per token, and pooled over the caption's words), which is all
robuq's quantization-aware training ever reads.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn


@dataclass
class TextEncoderConfig:
    vocab_size: int
    dim: int = 128
    layers: int = 2
    heads: int = 4
    max_tokens: int = 12

    def to_dict(self) -> dict:
        return asdict(self)


def attended_positions(present: torch.Tensor) -> torch.Tensor:
    """Where a caption is attended to, from where its tokens are (``present``, (batch, positions) bool): its
    tokens, and an empty caption (the unconditional prompt) its first position, not nothing (softmax over
    no positions would give NaNs). The text encoder and the transformer's attention mask share this rule."""
    empty = ~present.any(dim=1, keepdim=True)
    return present | (empty & (torch.arange(present.shape[1], device=present.device) == 0))


class TextEncoder(nn.Module):
    """Word ids (N × L, 0 = padding) → per-token embeddings (N × L × dim) and pooled embeddings (N × dim)."""

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.config = config
        self.words = nn.Embedding(config.vocab_size, config.dim)
        self.positions = nn.Parameter(torch.zeros(1, config.max_tokens, config.dim))
        layer = nn.TransformerEncoderLayer(
            config.dim, config.heads, 4 * config.dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.layers = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.dim)
        nn.init.normal_(self.words.weight, std=0.02)
        nn.init.normal_(self.positions, std=0.02)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pad = ~attended_positions(ids != 0)
        x = self.words(ids) + self.positions[:, : ids.shape[1]]
        x = self.norm(self.layers(x, src_key_padding_mask=pad))
        keep = (~pad).unsqueeze(-1).to(x.dtype)
        pooled = (x * keep).sum(1) / keep.sum(1)
        return x, pooled
