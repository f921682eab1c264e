"""torchrun awareness for training; it lives in robuq.core.distributed so sampling can share it."""
from robuq.core.distributed import DistInfo, barrier, init_distributed, shutdown

__all__ = ["DistInfo", "barrier", "init_distributed", "shutdown"]
