"""Conversion between robuq's DiT (the facebookresearch/DiT layout) and diffusers' ``DiTTransformer2DModel``.

What differs, read off diffusers 0.42 (``dit_transformer_2d.py``, ``attention.BasicTransformerBlock``,
``normalization.AdaLayerNormZero``, ``embeddings.CombinedTimestepLabelEmbeddings``):
- qkv is one linear in the reference, ``to_q``/``to_k``/``to_v`` in diffusers (rows q, then k, then v);
- the timestep and class embedders are shared in the reference and copied into every block's
  ``norm1.emb`` in diffusers (the final layer uses block 0's);
- diffusers' timestep features use frequencies 10000^(−i/127) (``downscale_freq_shift=1``), the
  reference 10000^(−i/128), and its pre-MLP LayerNorm has ``norm_eps`` (1e-5 by default) where the
  reference has 1e-6: robuq's ``DiTConfig.timestep_freq_shift`` and ``mlp_norm_eps`` carry both;
- the positional table is a parameter in the reference and a recomputed, unsaved buffer in diffusers;
- diffusers always keeps the null-class row of the label table and has no unconditional DiT.
diffusers is imported only when a diffusers model is built, so robuq works without it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from robuq.models.dit import DiT, DiTConfig
from robuq.core.errors import RobuqError

DIFFUSERS_CLASS = "DiTTransformer2DModel"

# reference name → diffusers name, per block (qkv is split apart) and outside the blocks.
_BLOCK_KEYS = {
    "attn.proj": "attn1.to_out.0",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
    "adaLN_modulation.1": "norm1.linear",
}
_EMBEDDER_KEYS = {
    "t_embedder.mlp.0": "norm1.emb.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "norm1.emb.timestep_embedder.linear_2",
    "y_embedder.embedding_table": "norm1.emb.class_embedder.embedding_table",
}
_TOP_KEYS = {
    "x_embedder.proj": "pos_embed.proj",
    "final_layer.adaLN_modulation.1": "proj_out_1",
    "final_layer.linear": "proj_out_2",
}
_DIFFUSERS_SHIFT = 1  # CombinedTimestepLabelEmbeddings' Timesteps(downscale_freq_shift=1), not configurable


def _diffusers():
    try:
        import diffusers
    except ImportError:
        raise RobuqError("diffusers models need diffusers: pip install 'robuq[diffusers]'") from None
    return diffusers


def is_diffusers_dit(model: nn.Module) -> bool:
    """Whether ``model`` is a diffusers DiT transformer (checked by its config, not by importing diffusers)."""
    config = getattr(model, "config", None)
    return getattr(config, "_class_name", None) == DIFFUSERS_CLASS or type(model).__name__ == DIFFUSERS_CLASS


def diffusers_config(config: DiTConfig) -> dict[str, Any]:
    """The ``DiTTransformer2DModel`` keyword arguments of a DiTConfig (ValueError if diffusers cannot hold it)."""
    if config.num_classes <= 0:
        raise RobuqError(
            "DiTTransformer2DModel is always class-conditional; an unconditional DiT has no diffusers form"
        )
    if config.mlp_ratio != 4.0:
        raise RobuqError(f"DiTTransformer2DModel's MLP is 4× wide; this DiT's mlp_ratio is {config.mlp_ratio}")
    return {
        "num_attention_heads": config.num_heads,
        "attention_head_dim": config.hidden_size // config.num_heads,
        "in_channels": config.in_channels,
        "out_channels": config.in_channels * (2 if config.learn_sigma else 1),
        "num_layers": config.depth,
        "sample_size": config.input_size,
        "patch_size": config.patch_size,
        "num_embeds_ada_norm": config.num_classes,
        "norm_eps": config.mlp_norm_eps,
    }


def dit_config_from_diffusers(config: Any) -> DiTConfig:
    """The DiTConfig of a ``DiTTransformer2DModel`` config (its ``.config`` or the dict of its config.json)."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    checks = {
        "norm_type": "ada_norm_zero",
        "activation_fn": "gelu-approximate",
        "attention_bias": True,
        "upcast_attention": False,
        "norm_elementwise_affine": False,
    }
    wrong = [f"{k}={get(k)!r}" for k, v in checks.items() if get(k, v) != v]
    if wrong:
        raise RobuqError(
            f"this DiTTransformer2DModel has {', '.join(wrong)}; robuq's DiT supports the defaults "
            f"({', '.join(f'{k}={v!r}' for k, v in checks.items())})"
        )
    in_channels = get("in_channels", 4)
    out_channels = get("out_channels") or in_channels
    if out_channels not in (in_channels, 2 * in_channels):
        raise RobuqError(f"out_channels {out_channels} is neither in_channels nor twice it (learned sigma)")
    heads, head_dim = get("num_attention_heads", 16), get("attention_head_dim", 72)
    return DiTConfig(
        input_size=get("sample_size", 32),
        patch_size=get("patch_size", 2),
        in_channels=in_channels,
        hidden_size=heads * head_dim,
        depth=get("num_layers", 28),
        num_heads=heads,
        mlp_ratio=4.0,
        class_dropout_prob=0.1,
        num_classes=get("num_embeds_ada_norm", 1000),
        learn_sigma=out_channels == 2 * in_channels,
        timestep_freq_shift=float(_DIFFUSERS_SHIFT),
        mlp_norm_eps=float(get("norm_eps", 1e-5)),
    )


def dit_state_to_diffusers(state: dict[str, torch.Tensor], config: DiTConfig) -> dict[str, torch.Tensor]:
    """A reference-layout state_dict as ``DiTTransformer2DModel`` keys (the positional table is dropped:
    diffusers recomputes it)."""
    out: dict[str, torch.Tensor] = {}
    for old, new in _TOP_KEYS.items():
        for p in ("weight", "bias"):
            out[f"{new}.{p}"] = state[f"{old}.{p}"]
    table = state["y_embedder.embedding_table.weight"]
    if table.shape[0] == config.num_classes:  # no null-class row (dropout 0): diffusers always has one
        table = torch.cat([table, table.new_zeros(1, table.shape[1])])
    for i in range(config.depth):
        b, d = f"blocks.{i}", f"transformer_blocks.{i}"
        for p in ("weight", "bias"):
            q, k, v = state[f"{b}.attn.qkv.{p}"].chunk(3, dim=0)
            out[f"{d}.attn1.to_q.{p}"], out[f"{d}.attn1.to_k.{p}"], out[f"{d}.attn1.to_v.{p}"] = q, k, v
            for old, new in _BLOCK_KEYS.items():
                out[f"{d}.{new}.{p}"] = state[f"{b}.{old}.{p}"]
            for old, new in list(_EMBEDDER_KEYS.items())[:2]:
                out[f"{d}.{new}.{p}"] = state[f"{old}.{p}"]
        out[f"{d}.{_EMBEDDER_KEYS['y_embedder.embedding_table']}.weight"] = table
    return {k: v.clone() for k, v in out.items()}


def diffusers_state_to_dit(state: dict[str, torch.Tensor], config: DiTConfig) -> dict[str, torch.Tensor]:
    """A ``DiTTransformer2DModel`` state_dict in the reference layout (without ``pos_embed``, which is fixed).

    The reference shares one timestep and class embedder; diffusers' forward uses every block's for that
    block, so the blocks must carry the same ones (as converted checkpoints do), else ValueError.
    """
    out: dict[str, torch.Tensor] = {}
    for old, new in _TOP_KEYS.items():
        for p in ("weight", "bias"):
            out[f"{old}.{p}"] = state[f"{new}.{p}"]
    for old, new in _EMBEDDER_KEYS.items():
        for p in ("weight",) if old.startswith("y_") else ("weight", "bias"):
            first = state[f"transformer_blocks.0.{new}.{p}"]
            differ = [
                i for i in range(1, config.depth) if not torch.equal(state[f"transformer_blocks.{i}.{new}.{p}"], first)
            ]
            if differ:
                raise RobuqError(
                    f"transformer_blocks {differ[:4]} have another {new}.{p} than block 0; robuq's DiT "
                    "(like the reference) shares one timestep/class embedder, so this model has no exact DiT form"
                )
            out[f"{old}.{p}"] = first
    for i in range(config.depth):
        b, d = f"blocks.{i}", f"transformer_blocks.{i}"
        for p in ("weight", "bias"):
            out[f"{b}.attn.qkv.{p}"] = torch.cat([state[f"{d}.attn1.to_{n}.{p}"] for n in "qkv"])
            for old, new in _BLOCK_KEYS.items():
                out[f"{b}.{old}.{p}"] = state[f"{d}.{new}.{p}"]
    return {k: v.clone() for k, v in out.items()}


def dit_to_diffusers(model: DiT) -> nn.Module:
    """A ``DiTTransformer2DModel`` that computes what ``model`` computes.

    diffusers fixes its timestep-frequency shift at 1 (no config field holds it). For a DiT with the
    reference's shift 0 the returned model's embedders are set to shift 0 too, so its output equals
    ``model``'s; that setting is lost by ``save_pretrained`` — a reloaded model uses diffusers'
    convention, exactly like the models of diffusers' own conversion script.
    """
    diffusers = _diffusers()
    config = model.config
    transformer = diffusers.DiTTransformer2DModel(**diffusers_config(config))
    state = dit_state_to_diffusers(model.state_dict(), config)
    transformer.load_state_dict(state, strict=True)
    for block in transformer.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = config.timestep_freq_shift
    return transformer.to(next(model.parameters()).device).train(model.training)


def diffusers_to_dit(transformer: nn.Module) -> DiT:
    """robuq's DiT computing what ``transformer`` (a ``DiTTransformer2DModel``) computes."""
    config = dit_config_from_diffusers(transformer.config)
    shifts = {float(b.norm1.emb.time_proj.downscale_freq_shift) for b in transformer.transformer_blocks}
    if len(shifts) == 1:
        config = DiTConfig(**{**config.to_dict(), "timestep_freq_shift": shifts.pop()})
    model = DiT(config)
    state = diffusers_state_to_dit(transformer.state_dict(), config)
    state["pos_embed"] = transformer.pos_embed.pos_embed.detach().clone()
    model.load_state_dict(state, strict=True)
    return model.to(next(transformer.parameters()).device).train(transformer.training)


def is_diffusers_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder written by ``DiTTransformer2DModel.save_pretrained``."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("_class_name") == DIFFUSERS_CLASS
    except (json.JSONDecodeError, AttributeError):
        return False


def load_diffusers_dit(path: str | os.PathLike) -> DiT:
    """robuq's DiT from a local ``save_pretrained`` folder of a ``DiTTransformer2DModel`` (no download)."""
    transformer = _diffusers().DiTTransformer2DModel.from_pretrained(
        str(path), local_files_only=True, low_cpu_mem_usage=False
    )
    return diffusers_to_dit(transformer)


def diffusers_model_from_config(config: dict[str, Any]) -> nn.Module:
    """A ``DiTTransformer2DModel`` built from its stored config dict (random weights)."""
    return _diffusers().DiTTransformer2DModel.from_config(config)


__all__ = [
    "diffusers_config",
    "diffusers_model_from_config",
    "diffusers_state_to_dit",
    "diffusers_to_dit",
    "dit_config_from_diffusers",
    "dit_state_to_diffusers",
    "dit_to_diffusers",
    "is_diffusers_dit",
    "is_diffusers_folder",
    "load_diffusers_dit",
]
