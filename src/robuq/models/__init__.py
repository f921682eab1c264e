from robuq.models.checkpoint import CheckpointError, load_dit
from robuq.models.dit import DIT_MODELS, DiT, DiTConfig, create_dit

__all__ = ["DIT_MODELS", "CheckpointError", "DiT", "DiTConfig", "create_dit", "load_dit"]
