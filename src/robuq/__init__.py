"""robuq: ternary-weight, low-bit-activation quantization-aware training for Diffusion Transformers."""
from robuq.cost import cost_summary
from robuq.diffusion.gaussian import GaussianDiffusion, create_diffusion
from robuq.models.checkpoint import CheckpointError, load_dit
from robuq.models.dit import DIT_MODELS, DiT, DiTConfig, create_dit
from robuq.quant.linear import LinearQuantConfig
from robuq.quantize import PlanError, QuantConfig, QuantRule, preset, quantize_
from robuq.quantized_io import load_quantized, save_quantized
from robuq.sampling import generate
from robuq.train.trainer import TrainConfig, train

__version__ = "0.1.0"

__all__ = [
    "DIT_MODELS", "CheckpointError", "DiT", "DiTConfig", "GaussianDiffusion", "LinearQuantConfig", "PlanError",
    "QuantConfig", "QuantRule", "TrainConfig", "cost_summary", "create_diffusion", "create_dit", "generate",
    "load_dit", "load_quantized", "preset", "quantize_", "save_quantized", "train",
]
