"""robuq: ternary-weight, low-bit-activation quantization-aware training for Diffusion Transformers."""
from robuq.diffusion.gaussian import GaussianDiffusion, create_diffusion
from robuq.models.checkpoint import CheckpointError, load_dit
from robuq.models.dit import DIT_MODELS, DiT, DiTConfig, create_dit
from robuq.sampling import generate
from robuq.train.trainer import TrainConfig, train

__version__ = "0.1.0"

__all__ = [
    "DIT_MODELS", "CheckpointError", "DiT", "DiTConfig", "GaussianDiffusion", "TrainConfig",
    "create_diffusion", "create_dit", "generate", "load_dit", "train",
]
