"""robuq: ternary-weight, low-bit-activation quantization-aware training for Diffusion Transformers.

Importing robuq also registers its C and Triton kernels as back-ends of the quantization primitives
(``robuq.kernels``); nothing else happens at import.
"""

import robuq.kernels  # noqa: F401  (registers the kernels' back-ends)
from robuq.core.errors import RobuqError
from robuq.core.runtime import default_teacher_path as shipped_teacher
from robuq.core.version import __version__  # noqa: F401
from robuq.data.image_stream import StreamingImageFolder
from robuq.data.latents import LatentDataset
from robuq.deploy.export import export_model, load_exported
from robuq.diffusion.gaussian import GaussianDiffusion, create_diffusion
from robuq.io.model_files import load_any
from robuq.io.quantized import load_quantized, save_quantized
from robuq.models.checkpoint import CheckpointError, load_dit
from robuq.models.dit import DIT_MODELS, DiT, DiTConfig, create_dit
from robuq.data.vae import load_vae
from robuq.quant.linear import LinearQuantConfig
from robuq.precision import (
    BitPlan,
    PlanError,
    QuantConfig,
    QuantRule,
    cost_summary,
    preset,
    quantize_,
    register_preset,
    resolve_policy,
)
from robuq.integrations.diffusers import DiffusersConfig, register_diffusers
from robuq.sample.generate import generate
from robuq.data.encode_latents import LatentsConfig, encode_latents
from robuq.train.trainer import TrainConfig, train


__all__ = [
    "DIT_MODELS",
    "BitPlan",
    "CheckpointError",
    "DiT",
    "DiTConfig",
    "DiffusersConfig",
    "GaussianDiffusion",
    "LatentDataset",
    "LatentsConfig",
    "LinearQuantConfig",
    "PlanError",
    "QuantConfig",
    "QuantRule",
    "RobuqError",
    "StreamingImageFolder",
    "TrainConfig",
    "cost_summary",
    "create_diffusion",
    "create_dit",
    "encode_latents",
    "export_model",
    "generate",
    "load_any",
    "load_dit",
    "load_exported",
    "load_quantized",
    "load_vae",
    "preset",
    "quantize_",
    "register_diffusers",
    "register_preset",
    "resolve_policy",
    "save_quantized",
    "shipped_teacher",
    "train",
]
