"""Image files on disk: which files count as images, and ADM's centre crop (shared by training data and evaluation)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


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
