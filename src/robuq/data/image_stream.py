"""ImageNet-style folders at scale: one sub-folder per class, decoded one image at a time.

Unlike ``ImageFolder`` (small folders, decoded once up front), ``StreamingImageFolder`` holds only the
list of paths, so a 1.28M-image ImageNet costs a few hundred MB of file names; a
``torch.utils.data.DataLoader`` with workers does the decoding. Class indices are the sorted sub-folder
names, which for ImageNet's synset folders (n01440764, …) is the label order every DiT checkpoint uses.

A corrupt or unreadable image stops the run with its path (``CorruptImageError``): skipping it would
silently change which images — and, near a shard boundary, which labels — a latent cache or a training
run holds. Remove or repair the file and run again (``robuq latents`` resumes where it stopped).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from robuq.data.image_folder import IMAGE_SUFFIXES


class CorruptImageError(ValueError):
    """An image of the folder could not be decoded; the message names its path."""


def center_crop_arr(image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's centre crop (guided-diffusion, used by DiT): halve with BOX while the short side is at least
    twice ``image_size``, resize with BICUBIC so the short side is ``image_size``, then crop the centre."""
    while min(*image.size) >= 2 * image_size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = image_size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[top : top + image_size, left : left + image_size]


def list_class_folder(root: str | os.PathLike) -> tuple[tuple[str, ...], list[tuple[str, int]]]:
    """(class names in sorted order, [(image path, class index)]) of a folder with one sub-folder per class."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir())
    if not class_dirs:
        raise ValueError(f"{root} has no sub-folders; put each class's images in a sub-folder of its own")
    files = [
        (str(f), label)
        for label, d in enumerate(class_dirs)
        for f in sorted(d.rglob("*"))
        if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()
    ]
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {root}")
    return tuple(d.name for d in class_dirs), files


class StreamingImageFolder(Dataset):
    """(image in [-1, 1] of shape (3, S, S), label) pairs read from disk on demand.

    ``flip`` mirrors an image horizontally with probability 1/2, decided by (``seed``, epoch, index) so a
    run is reproducible whichever worker reads the image (``set_epoch`` changes the draw each epoch, as
    DistributedSampler does); ``mirror=True`` returns every image mirrored (the latent cache's flipped copy).
    """

    in_channels = 3

    def __init__(self, root: str | os.PathLike, image_size: int = 256, flip: bool = False, seed: int = 0,
                 mirror: bool = False):
        self.class_names, self.files = list_class_folder(root)
        self.num_classes = len(self.class_names)
        self.image_size, self.flip, self.seed, self.mirror, self.epoch = image_size, flip, seed, mirror, 0
        self.labels = torch.tensor([label for _, label in self.files], dtype=torch.long)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.files)

    def _flipped(self, index: int) -> bool:
        if self.mirror:
            return True
        if not self.flip:
            return False
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch * 7919 + index) % (2**63 - 1))
        return bool(torch.rand((), generator=g) < 0.5)

    def load(self, index: int) -> np.ndarray:
        """Image ``index`` as uint8 (S, S, 3), centre-cropped; raises ``CorruptImageError`` with the path."""
        path = self.files[index][0]
        try:
            with Image.open(path) as image:
                arr = center_crop_arr(image.convert("RGB"), self.image_size)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise CorruptImageError(f"cannot read image {path} ({exc}); remove or replace it and run again") from exc
        return arr[:, ::-1] if self._flipped(index) else arr

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        arr = np.array(self.load(index))  # a writable copy: PIL's buffer is read-only
        x = torch.from_numpy(arr).permute(2, 0, 1).float().div(127.5).sub(1.0)
        return x, self.labels[index]
