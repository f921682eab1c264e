"""What a model family declares so that RobuQ maps onto it, and the helpers its declarations share.

A family says, in one place each: which linears are block linears (ternary weights, Hadamard, the
RobustQuantizer, a low-rank branch; AMPN picks their activation bits), which are modulation (W4A4, as
adaLN in DiT), which stay in full precision and why, which attention modules run their softmax matmuls
at 8 bits, which linears read a join of different sources (split into parts with their own quantizers),
which 1×1 convolutions are linears, and the forward arguments of one call. Everything else in robuq
reads these declarations and stays family-agnostic.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from robuq.core.errors import RobuqError

# The kinds a block linear's role ends in; a role may carry a stream before it ("txt.qkv": the text stream
# of a joint block, "cross.qkv": a cross-attention's projections), with its own quantizers and AMPN bits.
BLOCK_KINDS = ("qkv", "proj", "fc1", "fc2")


def role_kind(role: str) -> str:
    """ "qkv", "proj", "fc1" or "fc2" of a role such as "txt.fc1"."""
    return role.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class Family:
    """How RobuQ maps onto one model family (see the module docstring)."""

    name: str
    summary: str
    matches: Callable[[nn.Module], bool]
    block_linears: dict[str, tuple[str, ...]]  # role → name patterns
    modulation: tuple[str, ...]
    kept: dict[str, str]  # name pattern → why it stays in full precision
    attention: tuple[str, ...]  # attention modules whose softmax matmuls the policy quantizes
    example_inputs: Callable[[nn.Module, int], dict[str, Any]]  # forward keyword arguments of a batch
    run: Callable[[nn.Module, dict[str, Any]], torch.Tensor]  # the model's prediction for those arguments
    record: Callable[[nn.Module], dict[str, Any]]
    build: Callable[[dict[str, Any]], nn.Module]
    # A linear reading a join of sources: pattern → function of (model, module name) giving (part, width)s.
    joined_inputs: dict[str, Callable[[nn.Module, str], tuple[tuple[str, int], ...]]] = field(default_factory=dict)
    pointwise_convs: tuple[str, ...] = ()  # 1×1 convolutions quantized as linears
    pipeline: str | None = None  # the diffusers pipeline class that runs the family
    notes: tuple[str, ...] = ()  # what the map leaves in full precision beyond ``kept``, said in the summary
    timestep_scale: float = 1000.0  # the forward's timestep at the start of the schedule (FLUX takes [0, 1])
    # Training: "ddpm" (ε, and the variance where the output has twice the input's channels, on the DDPM
    # schedule) or "flow" (velocity on the rectified-flow schedule, its noise levels shifted by ``flow_shift``).
    objective: str = "ddpm"
    flow_shift: Callable[[int, int], float] = lambda height, width: 1.0  # of the latents' height and width
    # The forward arguments for latents (B, C, H, W) at forward timesteps t with text conditioning (forward
    # argument name → tensor); None where robuq does not train the family. ``latent_output`` maps the output
    # back to the latents' layout (FLUX unpacks its tokens).
    latent_arguments: Callable[[nn.Module, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]], dict] | None = None
    latent_output: Callable[[torch.Tensor, torch.Size], torch.Tensor] = lambda out, shape: out
    latent_channels: Callable[[nn.Module], int] = lambda model: model.config.in_channels  # of the (B, C, H, W) grid

    def roles(self) -> dict[str, tuple[str, ...]]:
        """Every role's patterns: the block linears, "adaln" (modulation) and "attention"."""
        return {**self.block_linears, "adaln": self.modulation, "attention": self.attention}

    def role_of(self, name: str) -> str | None:
        """The role of a module's qualified name ("kept" when the map keeps it in full precision), or None."""
        for role, patterns in self.roles().items():
            if any(fnmatch.fnmatchcase(name, p) for p in patterns):
                return role
        if any(fnmatch.fnmatchcase(name, p) for p in self.kept):
            return "kept"
        return None


def matches_any(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


# ------------------------------------------------------------------------------------------------ block layouts


def projections(prefix: str, names: tuple[str, ...] = ("to_q", "to_k", "to_v")) -> tuple[str, ...]:
    return tuple(f"{prefix}.{n}" for n in names)


def joint_block_linears(ff_in: str, ff_out: str, blocks: str = "transformer_blocks.*") -> dict[str, tuple[str, ...]]:
    """An MMDiT double-stream block's linears (SD3, FLUX.1, FLUX.2): the image stream's and, as "txt.*",
    the text stream's projections and MLP (``ff_in``/``ff_out`` under ``ff`` and ``ff_context``)."""
    attn = f"{blocks}.attn"
    return {
        "qkv": projections(attn),
        "proj": (f"{attn}.to_out.0",),
        "fc1": (f"{blocks}.ff.{ff_in}",),
        "fc2": (f"{blocks}.ff.{ff_out}",),
        "txt.qkv": projections(attn, ("add_q_proj", "add_k_proj", "add_v_proj")),
        "txt.proj": (f"{attn}.to_add_out",),
        "txt.fc1": (f"{blocks}.ff_context.{ff_in}",),
        "txt.fc2": (f"{blocks}.ff_context.{ff_out}",),
    }


def cross_attention_block_linears(
    ff_in: str, ff_out: str, blocks: str = "transformer_blocks.*"
) -> dict[str, tuple[str, ...]]:
    """A block with self-attention ``attn1``, cross-attention ``attn2`` to caption tokens and an MLP (PixArt,
    Sana). The cross-attention's query and output read the image stream ("cross.*"); its key and value
    read caption tokens, whose statistics differ, so they are a stream of their own ("txt.qkv")."""
    return {
        "qkv": projections(f"{blocks}.attn1"),
        "proj": (f"{blocks}.attn1.to_out.0",),
        "cross.qkv": (f"{blocks}.attn2.to_q",),
        "txt.qkv": projections(f"{blocks}.attn2", ("to_k", "to_v")),
        "cross.proj": (f"{blocks}.attn2.to_out.0",),
        "fc1": (f"{blocks}.ff.{ff_in}",),
        "fc2": (f"{blocks}.ff.{ff_out}",),
    }


# ------------------------------------------------------------------------------------------------ diffusers


def diffusers_module():
    try:
        import diffusers
    except ImportError:
        raise RobuqError("diffusers models need diffusers: pip install 'robuq[diffusers]'") from None
    return diffusers


def class_name(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "_class_name", None) or type(model).__name__


def is_class(*names: str) -> Callable[[nn.Module], bool]:
    """A ``matches`` test by class name (diffusers is never imported to ask)."""
    return lambda model: class_name(model) in names


def diffusers_record(family: str) -> Callable[[nn.Module], dict[str, Any]]:
    def record(model: nn.Module) -> dict[str, Any]:
        config = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
        return {"model_family": family, "model_class": class_name(model), "model_config": config}

    return record


def diffusers_build(meta: dict[str, Any]) -> nn.Module:
    """A diffusers model of the recorded class and config, with random weights."""
    name = meta.get("model_class")
    cls = getattr(diffusers_module(), str(name), None)
    if cls is None:
        raise RobuqError(f"this diffusers ({diffusers_module().__version__}) has no model class {name!r}")
    return cls.from_config(meta["model_config"])


# The embedding arguments of the families' pipelines, as their transformers' forward names them.
PIPELINE_TO_FORWARD = {
    "prompt_embeds": "encoder_hidden_states",
    "pooled_prompt_embeds": "pooled_projections",
    "prompt_attention_mask": "encoder_attention_mask",
}


def forward_embeddings(pipeline_embeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cached pipeline embeddings (``prompt_embeds``, ``pooled_prompt_embeds``, masks, ``negative_*``) as the
    transformer's forward arguments, the negative prompts' rows after the prompts' (guidance runs both)."""
    out = {}
    for name, forward in PIPELINE_TO_FORWARD.items():
        if name in pipeline_embeds:
            rows = [pipeline_embeds[name]] + (
                [pipeline_embeds[f"negative_{name}"]] if f"negative_{name}" in pipeline_embeds else []
            )
            out[forward] = torch.cat(rows)
    return out


def run_diffusers(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    return model(**inputs, return_dict=False)[0]


def grid_arguments(**extra: Any) -> Callable[..., dict]:
    """``Family.latent_arguments`` of a model that reads latents as a (B, C, H, W) grid, with ``extra`` arguments."""

    def arguments(model: nn.Module, latents: torch.Tensor, t: torch.Tensor, text: dict[str, torch.Tensor]) -> dict:
        return {"hidden_states": latents, "timestep": t, **text, **extra}

    return arguments


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def latent_grid(model: nn.Module, batch: int, default: int = 8) -> torch.Tensor:
    """A batch of (B, C, H, W) inputs at the model's sample size (small when it has none)."""
    config = model.config
    size = getattr(config, "sample_size", None) or default
    size = min(int(size), 16)  # a cost or calibration call needs the shapes, not the full resolution
    patch = getattr(config, "patch_size", 1) or 1
    size = max(patch, size - size % patch)
    return torch.randn(batch, config.in_channels, size, size, generator=torch.Generator().manual_seed(0)).to(
        device_of(model)
    )


def text_tokens(model: nn.Module, batch: int, width: int, tokens: int = 8) -> torch.Tensor:
    return torch.randn(batch, tokens, width, generator=torch.Generator().manual_seed(1)).to(device_of(model))
