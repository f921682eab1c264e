"""Image files on disk: which files count as images, and ADM's centre crop (shared by training data and evaluation)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image
from robuq.core.errors import RobuqError, RobuqFileNotFoundError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


def image_files(root: str | os.PathLike) -> list[Path]:
    """Every image under ``root`` (recursively), sorted by path."""
    root = Path(root)
    if not root.is_dir():
        raise RobuqFileNotFoundError(f"image folder {root} does not exist")
    return sorted(f for f in root.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)


class CorruptImageError(RobuqError):
    """An image file could not be read whole; the message names its path."""


# What a complete file of the format ends with. PIL decodes a PNG whose last chunks are cut off, or a JPEG
# without its end marker, without a word: the damage would pass into training data or a reference set.
_ENDINGS = {"PNG": (b"IEND\xaeB`\x82",), "JPEG": (b"\xff\xd9",)}


def _check_complete(path: Path, image_format: str | None) -> None:
    endings = _ENDINGS.get(image_format or "")
    if endings is None:
        return  # other formats: their decoders' own checks
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 64))
        tail = f.read().rstrip(b"\x00\r\n ")  # padding some writers leave after the end marker
    if not tail.endswith(endings):
        raise OSError(f"the {image_format} file ends before its end marker: it is truncated")


def read_image(path: str | os.PathLike, mode: str = "RGB") -> Image.Image:
    """The whole image at ``path`` in PIL ``mode``, decoded; a CorruptImageError naming the file if it is
    truncated, corrupt or not an image."""
    try:
        with Image.open(path) as image:
            image.load()
            _check_complete(Path(path), image.format)
            return image.convert(mode)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise CorruptImageError(f"cannot read image {path} ({exc}); remove or replace it and run again") from exc


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
