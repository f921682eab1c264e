"""Cached prompt embeddings: what a text-to-image family's quantization-aware training and sampling read
instead of a text encoder.

A prompt table is a safetensors file holding the pipeline's embedding arguments, one row per prompt:
``prompt_embeds`` (N × L × D) and, where the family has them, ``pooled_prompt_embeds`` (N × D) and
``prompt_attention_mask`` (N × L), with the prompts' texts in its header. Row 0 is the empty prompt: the
unconditional branch of classifier-free guidance, and what QAT drops captions to.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from robuq.core.errors import RobuqError
from robuq.core.files import load_tensors, save_tensors
from robuq.models.families.base import PIPELINE_TO_FORWARD

EMBEDDINGS = tuple(PIPELINE_TO_FORWARD)


@dataclass
class PromptTable:
    prompts: list[str]
    embeddings: dict[str, torch.Tensor]  # name in EMBEDDINGS → one row per prompt

    def __len__(self) -> int:
        return len(self.prompts)

    def index(self, prompts: list[str]) -> torch.Tensor:
        """The rows of ``prompts``; an error naming the first one the table lacks."""
        where = {p: i for i, p in enumerate(self.prompts)}
        missing = next((p for p in prompts if p not in where), None)
        if missing is not None:
            raise RobuqError(f"the prompt table has no embeddings for {missing!r}; cache it with the others")
        return torch.tensor([where[p] for p in prompts], dtype=torch.long)

    def forward_arguments(self, rows: torch.Tensor, takes: set[str], device: torch.device) -> dict[str, torch.Tensor]:
        """The transformer's text arguments for ``rows`` (those of its forward arguments ``takes`` names)."""
        out = {}
        for name, tensor in self.embeddings.items():
            forward = PIPELINE_TO_FORWARD[name]
            if forward in takes:
                out[forward] = tensor[rows.cpu()].to(device)
        return out


def save_prompt_table(path: str | os.PathLike, prompts: list[str], embeddings: dict[str, torch.Tensor]) -> None:
    if not prompts or prompts[0] != "":
        raise RobuqError("a prompt table's first prompt is the empty one (row 0: the unconditional branch)")
    unknown = sorted(set(embeddings) - set(EMBEDDINGS))
    if unknown or "prompt_embeds" not in embeddings:
        raise RobuqError(
            f"a prompt table holds prompt_embeds and optionally {', '.join(EMBEDDINGS[1:])}; got {unknown}"
        )
    for name, tensor in embeddings.items():
        if tensor.shape[0] != len(prompts):
            raise RobuqError(f"{name} has {tensor.shape[0]} rows for {len(prompts)} prompts")
    tensors = {k: v.detach().cpu().contiguous() for k, v in embeddings.items()}
    save_tensors(path, tensors, {"kind": "prompt-table", "prompts": list(prompts)})


def load_prompt_table(path: str | os.PathLike) -> PromptTable:
    tensors, meta = load_tensors(path)
    if meta.get("kind") != "prompt-table":
        raise RobuqError(
            f"{path} is no robuq prompt table; write one with robuq.io.prompts.save_prompt_table (prompt_embeds per "
            "prompt, the empty prompt first)"
        )
    return PromptTable(list(meta["prompts"]), {k: tensors[k] for k in EMBEDDINGS if k in tensors})
