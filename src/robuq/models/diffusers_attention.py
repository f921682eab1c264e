"""A diffusers attention processor that runs the two attention matmuls in a swappable core module.

diffusers' ``Attention`` delegates its maths to ``attn.processor``; a processor that is an ``nn.Module``
becomes a submodule (``….attn1.processor``), so its ``core`` is found by name like a DiT block's
``attn.core`` and ``quantize_`` can put robuq's ``QuantAttentionCore`` there. Nothing here imports
diffusers: the processor only calls the projections the ``Attention`` module owns.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from robuq.models.dit import AttentionCore


def is_diffusers_attention(module: nn.Module) -> bool:
    """Whether ``module`` looks like diffusers' ``Attention`` (separate q/k/v projections and a processor)."""
    return all(hasattr(module, a) for a in ("set_processor", "to_q", "to_k", "to_v", "to_out", "heads"))


def _unsupported(attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states, attention_mask) -> str | None:
    if encoder_hidden_states is not None:
        return "cross-attention (encoder_hidden_states)"
    if attention_mask is not None:
        return "an attention mask"
    for name in ("spatial_norm", "group_norm", "norm_q", "norm_k"):
        if getattr(attn, name, None) is not None:
            return f"attn.{name}"
    if getattr(attn, "residual_connection", False) or getattr(attn, "rescale_output_factor", 1.0) != 1.0:
        return "a residual connection or output rescaling inside the attention"
    if hidden_states.ndim != 3:
        return f"{hidden_states.ndim}-d hidden states (expects batch × tokens × channels)"
    head_dim = attn.to_k.out_features // attn.heads
    if abs(float(attn.scale) - head_dim**-0.5) > 1e-12:
        return f"a softmax scale {attn.scale} other than 1/√{head_dim}"
    return None


class RobuqAttnProcessor(nn.Module):
    """Self-attention of a diffusers ``Attention`` with softmax(QKᵀ/√d)V computed by ``self.core``
    (``AttentionCore``, or ``QuantAttentionCore`` for the 8-bit matmuls)."""

    def __init__(self, core: nn.Module | None = None):
        super().__init__()
        self.core = core if core is not None else AttentionCore()

    def forward(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        problem = _unsupported(attn, hidden_states, encoder_hidden_states, attention_mask)
        if problem is not None:
            raise ValueError(f"robuq's attention processor supports the self-attention of DiT blocks, not {problem}; "
                             "leave this attention out of the policy's attention_patterns")
        batch = hidden_states.shape[0]
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = k.shape[-1] // attn.heads
        q, k, v = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (q, k, v))
        out = self.core(q, k, v).transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(q.dtype)
        return attn.to_out[1](attn.to_out[0](out))  # projection, then dropout


def install_attention_core(attn: nn.Module, core: nn.Module) -> None:
    """Make ``attn`` (a diffusers ``Attention``) compute its matmuls in ``core``, through robuq's processor."""
    attn.set_processor(RobuqAttnProcessor(core))
