"""Users' own images: one sub-folder per class (or a flat folder for unconditional training)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


def _center_crop_resize(image: Image.Image, size: int) -> Image.Image:
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)


class ImageFolder(Dataset):
    """Images center-cropped and resized to ``input_size``, in [-1, 1], with labels from sub-folder names.

    All images are decoded once up front: robuq's image folders are small, and this keeps every epoch cheap
    and deterministic.
    """

    def __init__(self, root: str | os.PathLike, input_size: int, channels: int = 3, conditional: bool = True):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} does not exist")
        if channels not in (1, 3):
            raise ValueError("channels must be 1 (grayscale) or 3 (RGB)")
        class_dirs = sorted(d for d in root.iterdir() if d.is_dir())
        self.class_names = tuple(d.name for d in class_dirs) if class_dirs else ("all",)
        sources = [(d, i) for i, d in enumerate(class_dirs)] if class_dirs else [(root, 0)]
        files = [(f, label) for d, label in sources for f in sorted(d.rglob("*")) if f.suffix.lower() in IMAGE_SUFFIXES]
        if not files:
            raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {root}")
        mode = "L" if channels == 1 else "RGB"
        arrays = [np.asarray(_center_crop_resize(Image.open(f).convert(mode), input_size)) for f, _ in files]
        stacked = np.stack(arrays).reshape(len(files), input_size, input_size, channels)
        self.images = torch.from_numpy(stacked).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        labels = [label for _, label in files]
        self.labels = torch.tensor(labels if conditional else [0] * len(labels), dtype=torch.long)
        self.num_classes = len(self.class_names)
        self.in_channels = channels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]


def image_files(root: str | os.PathLike) -> list[Path]:
    """Every image under ``root`` (recursively), sorted by path."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    return sorted(f for f in root.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)


def adm_center_crop(image: Image.Image, size: int) -> np.ndarray:
    """The ADM data pipeline's crop: halve by box filtering while the short side is ≥ 2·size, scale the short
    side to ``size`` bicubically, then take the centre square (uint8 H×W×C)."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    array = np.asarray(image)
    top, left = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
    return array[top : top + size, left : left + size]
