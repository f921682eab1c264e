"""ImageNet-style folders at any scale: one sub-folder per class, decoded one image at a time.

``StreamingImageFolder`` holds only the list of paths, so a 1.28M-image ImageNet costs a few hundred MB
of file names; a ``torch.utils.data.DataLoader`` with workers does the decoding. Class indices are the
sorted sub-folder names, which for ImageNet's synset folders (n01440764, …) is the label order every DiT
checkpoint uses.

Mirrored images are further indices rather than a random switch inside the dataset: index ``len(ds) + i``
is image i flipped left–right. Whoever draws the indices (the training loop, per sample and epoch from its
seed) thus decides the flips, and a worker process holds no random state that a resumed run would lose.

A corrupt or unreadable image stops the run with its path (``CorruptImageError``): skipping it would
silently change which images — and, near a shard boundary, which labels — a latent cache or a training
run holds. Remove or repair the file and run again (``robuq latents`` resumes where it stopped).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from robuq.data.image_folder import IMAGE_SUFFIXES, adm_center_crop, image_files, read_image
from robuq.core.errors import RobuqError, RobuqFileNotFoundError


def list_class_folder(root: str | os.PathLike) -> tuple[tuple[str, ...], list[tuple[str, int]]]:
    """(class names in sorted order, [(image path, class index)]) of a folder with one sub-folder per class."""
    root = Path(root)
    if not root.is_dir():
        raise RobuqFileNotFoundError(f"image folder {root} does not exist")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir())
    if not class_dirs:
        raise RobuqError(f"{root} has no sub-folders; put each class's images in a sub-folder of its own")
    files = [(str(f), label) for label, d in enumerate(class_dirs) for f in image_files(d)]
    if not files:
        raise RobuqFileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {root}")
    return tuple(d.name for d in class_dirs), files


class StreamingImageFolder(Dataset):
    """(image in [-1, 1] of shape (C, S, S), label) pairs read from disk on demand, ADM-centre-cropped to S.

    Indices ``len(self) + i`` give image i mirrored (``has_mirrors``), which the training loop uses for
    random horizontal flips. ``channels=1`` reads grayscale. Unconditional (``conditional=False``) data may
    also be a flat folder of images; every label is then 0.
    """

    has_mirrors = True

    def __init__(self, root: str | os.PathLike, image_size: int = 256, channels: int = 3, conditional: bool = True):
        if channels not in (1, 3):
            raise RobuqError(f"channels must be 1 (grayscale) or 3 (RGB), not {channels}")
        root = Path(root)
        flat = not conditional and root.is_dir() and not any(d.is_dir() for d in root.iterdir())
        if flat:  # unlabelled images
            files = image_files(root)
            if not files:
                raise RobuqFileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {root}")
            self.class_names, self.files = ("all",), [(str(f), 0) for f in files]
        else:
            self.class_names, self.files = list_class_folder(root)
        self.num_classes = len(self.class_names)
        self.image_size = self.input_size = image_size
        self.in_channels = channels
        labels = [label for _, label in self.files] if conditional else [0] * len(self.files)
        self.labels = torch.tensor(labels, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> np.ndarray:
        """Image ``index`` (mirrored from ``len(self)`` on) as uint8 (S, S, C), centre-cropped; raises
        ``CorruptImageError`` with the path."""
        n = len(self.files)
        if not 0 <= index < 2 * n:
            raise IndexError(f"index {index} out of range for {n} images and their {n} mirrored copies")
        arr = adm_center_crop(
            read_image(self.files[index % n][0], "L" if self.in_channels == 1 else "RGB"), self.image_size
        )
        arr = arr.reshape(self.image_size, self.image_size, self.in_channels)
        return arr[:, ::-1] if index >= n else arr

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = int(index)
        arr = np.array(self.load(index))  # a writable copy: PIL's buffer is read-only
        x = torch.from_numpy(arr).permute(2, 0, 1).float().div(127.5).sub(1.0)
        return x, self.labels[index % len(self.files)]
