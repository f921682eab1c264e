"""Where robuq's shipped files live, which device "auto" means and how a precision is set up: the few facts
every layer asks for."""

from __future__ import annotations

import gc

import contextlib
import os
from pathlib import Path

import torch
from robuq.core.errors import RobuqFileNotFoundError

PRECISIONS = ("fp32", "tf32", "bf16")
DEVICE_HELP = "'auto' (this rank's GPU when CUDA is available, else the CPU), 'cpu' or 'cuda[:N]'"
ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_TEACHER = ASSETS / "teacher-fmnist-dit-t4.safetensors"


def default_teacher_path() -> Path:
    """The Fashion-MNIST DiT-T/4 shipped with robuq, which every quantization experiment starts from."""
    if not DEFAULT_TEACHER.is_file():
        raise RobuqFileNotFoundError(
            f"the shipped teacher {DEFAULT_TEACHER} is missing; reinstall robuq or pass --ckpt"
        )
    return DEFAULT_TEACHER


def resolve_device(name: str = "auto") -> torch.device:
    """ "auto" means this rank's GPU when CUDA is available (``LOCAL_RANK`` under torchrun), else the CPU.

    The device is returned, not made current: callers that want ``torch.cuda.set_device`` say so
    themselves (the trainer does, inside a ``torch.cuda.device`` context).
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def device_context(device: torch.device):
    """``device`` made the current CUDA device for the ``with`` block (a no-op off CUDA): NCCL, autocast and
    Triton launches use the current device, not the one a tensor lives on."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@contextlib.contextmanager
def precision_context(precision: str, device: torch.device):
    """Autocast for bf16 (CUDA, and the CPU for tests); on CUDA, TF32 matmuls and convolutions for tf32 and bf16
    and neither for fp32 (PyTorch's default runs convolutions in TF32), the settings restored afterwards."""
    cuda = device.type == "cuda"
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision in ("tf32", "bf16")
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            yield
    finally:
        if cuda:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def release_memory() -> None:
    """Hand back what a finished stage held (its models, optimizer, batches) before the next one allocates: Python's
    cycles collected, and the CUDA caching allocator's free blocks returned to the driver."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
