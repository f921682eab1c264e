"""Run the softmax attention inside a diffusers attention module on a core module of robuq's.

diffusers' attention processors (self-, cross- and joint attention, RoPE, qk-norm) all end in
``torch.nn.functional.scaled_dot_product_attention``. Rather than copy each processor's ``forward``,
``route_attention`` gives the attention module a ``core`` submodule (found by name like a DiT block's
``attn.core``) and, while that module runs, sends its SDPA calls to the core: projections, norms and
rotary embeddings stay the family's own code. Nothing here imports diffusers.
"""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from robuq.core.errors import RobuqError

_SDPA = F.scaled_dot_product_attention


class _ToCore(TorchFunctionMode):
    def __init__(self, core: nn.Module, where: str):
        super().__init__()
        self.core, self.where = core, where

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not _SDPA:
            return func(*args, **kwargs)
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        call = {**dict(zip(names, args)), **kwargs}
        if call.get("is_causal") or call.get("enable_gqa") or (call.get("dropout_p") or 0.0) > 0:
            raise RobuqError(
                f"{self.where}: robuq's attention core supports neither causal masks, grouped-query "
                "attention nor attention dropout; leave this attention out of the policy"
            )
        return self.core(call["query"], call["key"], call["value"], mask=call.get("attn_mask"), scale=call.get("scale"))


def _enter(module: nn.Module, args, kwargs=None):
    mode = _ToCore(module.core, type(module).__name__)
    mode.__enter__()
    module.__dict__.setdefault("_robuq_modes", []).append(mode)


def _leave(module: nn.Module, args, output):
    module.__dict__["_robuq_modes"].pop().__exit__(None, None, None)


def is_routed(module: nn.Module) -> bool:
    return bool(getattr(module, "_robuq_routed", False))


def route_attention(attn: nn.Module, core: nn.Module) -> None:
    """Make ``attn`` compute its softmax attention in ``core`` (called as ``core(q, k, v, mask=, scale=)``
    on (batch, heads, tokens, head dim) tensors); routing an already routed module replaces its core."""
    attn.core = core
    if not is_routed(attn):
        attn.register_forward_pre_hook(_enter)
        attn.register_forward_hook(_leave, always_call=True)  # leave the mode even when the forward raises
        attn._robuq_routed = True
