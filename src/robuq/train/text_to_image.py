"""Training a text-to-image family's transformer with its text encoder: the teachers of robuq's miniature.

A ``TextToImage`` holds a family's diffusers transformer and a small ``TextEncoder``; the loop trains both on
captioned Fashion-MNIST (``robuq.data.captions``) with the family's own objective — ε and the variance on
the DDPM schedule (PixArt), velocity on the rectified-flow schedule with the family's shift (SD3, FLUX,
Sana). Captions are dropped (replaced by the empty caption) with ``caption_dropout`` so that the model
learns the unconditional prediction classifier-free guidance needs. ``export_teacher`` then writes the
transformer as a diffusers folder and the text encoder beside it, and ``cache_prompts`` the embeddings that
quantization-aware training reads instead of a text encoder.
"""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from robuq.core.errors import RobuqError
from robuq.core.options import check_choice, option
from robuq.core.files import atomic_write_text, read_meta, save_tensors
from robuq.data.captions import (
    MAX_TOKENS,
    VOCABULARY,
    CaptionedFashionMNIST,
    prompt_set,
    tokenize,
)
from robuq.io.prompts import save_prompt_table
from robuq.models.checkpoint import read_state_dict
from robuq.models.families import family_of, predict_latents, unwrapped
from robuq.models.families.base import class_name, diffusers_module
from robuq.models.text_encoder import TextEncoder, TextEncoderConfig, attended_positions
from robuq.train.family_objective import noisy_batch
from robuq.train.trainer import LoopConfig, label_drops, train_loop

TEXT_DIM = 128
# The miniature's transformers: a few million parameters each, 49 image tokens from 28 × 28 images
# (4 × 14 × 14 latents: FLUX packs them 2 × 2, PixArt patches them 2 × 2).
MINIATURE_LAYOUTS: dict[str, tuple[str, dict[str, Any]]] = {
    "flux": (
        "FluxTransformer2DModel",
        dict(
            patch_size=1,
            in_channels=16,
            num_layers=2,
            num_single_layers=4,
            attention_head_dim=32,
            num_attention_heads=6,
            joint_attention_dim=TEXT_DIM,
            pooled_projection_dim=TEXT_DIM,
            guidance_embeds=False,
            axes_dims_rope=(8, 12, 12),
        ),
    ),
    "pixart": (
        "PixArtTransformer2DModel",
        dict(
            sample_size=14,
            patch_size=2,
            in_channels=4,
            out_channels=8,
            num_layers=6,
            attention_head_dim=32,
            num_attention_heads=6,
            cross_attention_dim=192,
            caption_channels=TEXT_DIM,
            norm_type="ada_norm_single",
            num_embeds_ada_norm=1000,
            use_additional_conditions=False,
        ),
    ),
}


@dataclass
class TextToImageRecord:
    """What rebuilds a ``TextToImage``: the transformer's class and config, the text encoder's config."""

    transformer_class: str
    transformer_config: dict
    text_encoder: dict

    def to_dict(self) -> dict:
        return asdict(self)


class TextToImage(nn.Module):
    """A family's transformer and the text encoder that conditions it, trained together."""

    def __init__(self, transformer: nn.Module, text_encoder: TextEncoder):
        super().__init__()
        self.transformer, self.text_encoder = transformer, text_encoder
        self.family = family_of(transformer)
        if self.family.latent_arguments is None:
            raise RobuqError(f"robuq does not train {self.family.name} models from text")
        self.takes = set(inspect.signature(transformer.forward).parameters)

    @property
    def config(self) -> TextToImageRecord:
        return TextToImageRecord(
            class_name(self.transformer),
            {k: v for k, v in dict(self.transformer.config).items() if not k.startswith("_")},
            self.text_encoder.config.to_dict(),
        )

    def conditioning(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """The transformer's text arguments for caption ids (0 pads; an all-zero row is the empty caption)."""
        tokens, pooled = self.text_encoder(ids)
        return forward_text(self.takes, tokens, pooled, ids != 0)

    def forward(self, latents: torch.Tensor, t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The prediction for noisy latents at forward timesteps ``t`` with the captions ``ids`` (one forward,
        so that DDP sees the text encoder's and the transformer's parameters used together)."""
        return predict_latents(self.transformer, latents, t, self.conditioning(ids))


def forward_text(takes: set[str], tokens: torch.Tensor, pooled: torch.Tensor, mask: torch.Tensor) -> dict:
    """Text embeddings under the forward argument names a transformer taking ``takes`` reads."""
    text = {"encoder_hidden_states": tokens}
    if "pooled_projections" in takes:
        text["pooled_projections"] = pooled
    if "encoder_attention_mask" in takes:
        text["encoder_attention_mask"] = attended_positions(mask).to(tokens.dtype)
    return text


def build_miniature(layout: str, seed: int = 0) -> TextToImage:
    """A freshly initialised miniature teacher in ``layout`` ("flux" or "pixart")."""
    if layout not in MINIATURE_LAYOUTS:
        raise RobuqError(f"no miniature layout {layout!r}; robuq has {', '.join(MINIATURE_LAYOUTS)}")
    name, config = MINIATURE_LAYOUTS[layout]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = getattr(diffusers_module(), name)(**config)
        text = TextEncoder(TextEncoderConfig(vocab_size=len(VOCABULARY), dim=TEXT_DIM, max_tokens=MAX_TOKENS))
    return TextToImage(transformer, text)


def text_objective(caption_dropout: float):
    """The teacher's loss: captions dropped to the empty caption with probability ``caption_dropout``."""

    def objective(model: TextToImage, x: torch.Tensor, ids: torch.Tensor, generator: torch.Generator) -> dict:
        dropped = label_drops(len(ids), caption_dropout, generator, ids.device).bool()
        ids = torch.where(dropped[:, None], torch.zeros_like(ids), ids)
        inner = unwrapped(model)  # DDP's wrapper hides the attributes; the forward goes through it
        batch = noisy_batch(inner.family, inner.transformer.config.out_channels or x.shape[1], x, generator)
        return batch.losses(model(batch.inputs, batch.timesteps, ids))

    return objective


@dataclass
class TextTeacherConfig(LoopConfig):
    """``robuq train-t2i``: a miniature text-to-image teacher on captioned Fashion-MNIST."""

    layout: str = option("flux", "the family whose transformer is trained", choices=tuple(MINIATURE_LAYOUTS))
    caption_dropout: float = option(0.1, "probability of training on the empty caption (for guidance)")
    caption_seed: int = option(0, "seed of each training image's caption")

    def validate(self, world_size: int = 1) -> None:
        super().validate(world_size)
        check_choice(self, "layout")
        if self.data != "fashion-mnist" or self.latents:
            raise RobuqError("train-t2i trains on captioned Fashion-MNIST only; leave --data and --latents unset")


def train_text_teacher(
    config: TextTeacherConfig, resume: bool = False, until: int | None = None, progress: bool = True
) -> Path:
    config.validate()
    dataset = CaptionedFashionMNIST("train", config.data_dir, config.caption_seed)
    model = build_miniature(config.layout, config.seed)
    return train_loop(
        config,
        model,
        text_objective(config.caption_dropout),
        dataset,
        resume=resume,
        until=until,
        progress=progress,
        extra_meta={"kind": "text-to-image", "family": model.family.name},
    )


def load_text_to_image(path: str | os.PathLike) -> TextToImage:
    """The ``TextToImage`` a ``train-t2i`` run wrote (``model.safetensors``: EMA weights, or a checkpoint)."""
    state, meta = read_state_dict(path)
    record = meta.get("model_config") or {}
    if "transformer_class" not in record:
        raise RobuqError(f"{path} was not written by robuq train-t2i")
    transformer = getattr(diffusers_module(), record["transformer_class"]).from_config(record["transformer_config"])
    model = TextToImage(transformer, TextEncoder(TextEncoderConfig(**record["text_encoder"])))
    model.load_state_dict(state)
    return model.eval().requires_grad_(False)


def teacher_prompts() -> list[str]:
    """The prompts a miniature teacher's table caches: the empty one, every training caption (the training
    templates' prompt set: every template, class, name and shade), every held-out evaluation prompt."""
    train = prompt_set(held_out=False)[0]
    return ["", *dict.fromkeys(sorted(set(train)) + prompt_set(held_out=True)[0] + train)]


@torch.no_grad()
def export_text_teacher(path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write a trained miniature teacher as its users need it: ``transformer/`` (a diffusers folder, which every
    robuq verb takes), ``text_encoder.safetensors``, ``prompts.safetensors`` (the prompt table of
    ``teacher_prompts``, which QAT and sampling read) and ``teacher.json`` (its layout and training step)."""
    model = load_text_to_image(path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    step = read_meta(path).get("step")
    record = {"layout": model.family.name, "step": step, "source": str(path)}
    atomic_write_text(out / "teacher.json", json.dumps(record, indent=2) + "\n")
    model.transformer.save_pretrained(out / "transformer", safe_serialization=True)
    save_tensors(
        out / "text_encoder.safetensors",
        model.text_encoder.state_dict(),
        {"kind": "text-encoder", "config": model.text_encoder.config.to_dict(), "vocabulary": list(VOCABULARY)},
    )
    prompts = teacher_prompts()
    ids = tokenize(prompts)
    tokens, pooled = model.text_encoder(ids)
    text = forward_text({"pooled_projections", "encoder_attention_mask"}, tokens, pooled, ids != 0)
    embeddings = {"prompt_embeds": tokens}
    if "pooled_projections" in model.takes:
        embeddings["pooled_prompt_embeds"] = pooled
    if "encoder_attention_mask" in model.takes:
        embeddings["prompt_attention_mask"] = text["encoder_attention_mask"]
    save_prompt_table(out / "prompts.safetensors", prompts, embeddings)
    return out
