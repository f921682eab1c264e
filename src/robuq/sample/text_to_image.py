"""Samples of a text-to-image family through its own diffusers pipeline, from cached prompt embeddings.

robuq never loads a text encoder: the user encodes prompts once with their own encoders and saves the
pipeline's embedding arguments (``prompt_embeds`` and, where the family has them, ``pooled_prompt_embeds``,
``prompt_attention_mask`` and their ``negative_`` forms) as a safetensors file. The pipeline's VAE and
scheduler come from a local pipeline folder; the transformer is robuq's (exported, quantized or not).
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from robuq.core.files import load_tensors
from robuq.models.families import family_of
from robuq.models.families.base import diffusers_module
from robuq.core.errors import RobuqError, RobuqFileNotFoundError

# Pipeline components robuq leaves out: prompts arrive as embeddings.
TEXT_COMPONENTS = (
    "text_encoder",
    "text_encoder_2",
    "text_encoder_3",
    "tokenizer",
    "tokenizer_2",
    "tokenizer_3",
    "image_encoder",
    "feature_extractor",
)


def family_pipeline(model: nn.Module, pipeline_dir: str | os.PathLike):
    """The model's family pipeline (e.g. ``FluxPipeline``) with ``model`` as its transformer, the VAE and
    scheduler of the local folder ``pipeline_dir``, and no text encoders."""
    family = family_of(model)
    if family.pipeline is None:
        raise RobuqError(f"the {family.name} family has no text-to-image pipeline")
    if not (Path(pipeline_dir) / "model_index.json").is_file():
        raise RobuqFileNotFoundError(
            f"{pipeline_dir} is not a diffusers pipeline folder (no model_index.json); give the "
            f"folder a {family.pipeline}.save_pretrained wrote, with its vae/ and scheduler/"
        )
    cls = getattr(diffusers_module(), family.pipeline)
    wanted = set(inspect.signature(cls.__init__).parameters)
    left_out = {name: None for name in TEXT_COMPONENTS if name in wanted}
    return cls.from_pretrained(str(pipeline_dir), transformer=model, local_files_only=True, **left_out)


def read_prompt_embeddings(path: str | os.PathLike, pipeline) -> dict[str, torch.Tensor]:
    """The embedding arguments in the safetensors file ``path``, checked against what ``pipeline`` takes."""
    tensors, _ = load_tensors(path)
    accepted = set(inspect.signature(pipeline.__call__).parameters)
    unknown = sorted(set(tensors) - accepted)
    if unknown:
        takes = sorted(a for a in accepted if "embeds" in a or "mask" in a)
        raise RobuqError(
            f"{path}: {type(pipeline).__name__} takes no {', '.join(unknown)}; it takes {', '.join(takes)}"
        )
    if "prompt_embeds" not in tensors:
        raise RobuqError(f"{path} holds no prompt_embeds (one row per prompt, as the family's text encoders give them)")
    return tensors


def sample_text_to_image(
    model: nn.Module,
    pipeline_dir: str | os.PathLike,
    embeddings_file: str | os.PathLike,
    steps: int = 20,
    height: int | None = None,
    width: int | None = None,
    seed: int = 0,
    guidance_scale: float | None = None,
) -> np.ndarray:
    """One image per row of the cached prompt embeddings, as uint8 (N, H, W, 3)."""
    pipeline = family_pipeline(model, pipeline_dir)
    pipeline.set_progress_bar_config(disable=True)
    embeddings = read_prompt_embeddings(embeddings_file, pipeline)
    device = next(model.parameters()).device
    kwargs = {k: v.to(device) for k, v in embeddings.items()}
    if guidance_scale is not None:
        kwargs["guidance_scale"] = guidance_scale
    takes = inspect.signature(pipeline.__call__).parameters
    if "negative_prompt" in takes and "negative_prompt_embeds" in kwargs:
        kwargs["negative_prompt"] = None  # some pipelines default it to "" and refuse it beside negative_prompt_embeds
    if "use_resolution_binning" in takes:
        kwargs["use_resolution_binning"] = False  # sizes as asked, not snapped to the family's aspect-ratio table
    with torch.no_grad():
        images = pipeline(
            **kwargs,
            num_inference_steps=steps,
            height=height,
            width=width,
            output_type="np",
            generator=torch.Generator(device="cpu").manual_seed(seed),
        ).images
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
