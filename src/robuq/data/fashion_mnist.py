"""Fashion-MNIST from its standard IDX files (plain or gzipped), with no download at run time."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from robuq.core.errors import RobuqError, RobuqFileNotFoundError

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# IDX type codes (third byte of the magic number) we accept.
_IDX_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class DataNotFoundError(RobuqFileNotFoundError):
    """The IDX files are in none of the places robuq looks."""


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (optionally .gz) into an array of its declared shape and type."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise RobuqError(f"{path} is not an IDX file (bad magic number)")
    dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise RobuqError(f"{path} is truncated: its header is incomplete")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise RobuqError(f"{path} holds {len(data) - header} bytes of data, but its header {shape} needs {expected}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write an array as IDX (gzipped when the name ends in .gz); used for tests and small exports."""
    codes = {np.dtype(v).newbyteorder("="): k for k, v in _IDX_DTYPES.items()}
    array = np.asarray(array)
    code = codes[array.dtype.newbyteorder("=")]
    header = bytes([0, 0, code, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(np.dtype(_IDX_DTYPES[code])).tobytes()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(payload)


def candidate_dirs(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Where robuq looks: the given folder alone (falling back elsewhere would train on other data than the
    run records); without one, $ROBUQ_DATA, then the Debian package's folder."""
    if data_dir:
        return [Path(data_dir)]
    dirs = [Path(os.environ["ROBUQ_DATA"])] if os.environ.get("ROBUQ_DATA") else []
    dirs.append(DEBIAN_DIR)
    return dirs


def _find(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def find_fashion_mnist(split: str = "train", data_dir: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """Paths of the images and labels IDX files of ``split`` ("train" or "test")."""
    if split not in _FILES:
        raise RobuqError(f"unknown split {split!r}; use 'train' or 'test'")
    searched = candidate_dirs(data_dir)
    if data_dir and not Path(data_dir).is_dir():
        raise DataNotFoundError(
            f"--data-dir {data_dir} is not a folder; give the folder that holds the Fashion-MNIST "
            "IDX files (or leave --data-dir out to use $ROBUQ_DATA or the Debian package)"
        )
    for directory in searched:
        images, labels = (_find(directory, stem) for stem in _FILES[split])
        if images and labels:
            return images, labels
    names = " and ".join(f"{s}.gz" for s in _FILES[split])
    raise DataNotFoundError(
        f"Fashion-MNIST {split} files ({names}) not found in: {', '.join(map(str, searched))}.\n"
        "Get them either way:\n"
        "  - Debian/Ubuntu: sudo apt-get install dataset-fashion-mnist  (installs to /usr/share/datasets/fashion-mnist)\n"
        "  - or download the four *-ubyte.gz files from https://github.com/zalandoresearch/fashion-mnist\n"
        "    into a folder and pass --data-dir FOLDER or set ROBUQ_DATA=FOLDER"
    )


def load_fashion_mnist(
    split: str = "train", data_dir: str | os.PathLike | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(N, 28, 28) uint8 images and (N,) int64 labels."""
    images_path, labels_path = find_fashion_mnist(split, data_dir)
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise RobuqError(f"{images_path} and {labels_path} do not form an image/label pair")
    return images, labels.astype(np.int64)


def to_model_range(images: np.ndarray, input_size: int) -> torch.Tensor:
    """uint8 (N, H, W) → float (N, 1, S, S) in [-1, 1], padded with background (or resized) to S."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div(127.5).sub(1.0).unsqueeze(1)
    h = x.shape[-1]
    if input_size == h:
        return x
    if input_size > h and (input_size - h) % 2 == 0:
        pad = (input_size - h) // 2
        return torch.nn.functional.pad(x, (pad, pad, pad, pad), value=-1.0)
    return torch.nn.functional.interpolate(x, size=(input_size, input_size), mode="bilinear", align_corners=False)


class FashionMNIST(Dataset):
    """Images in [-1, 1] at the model's input size; labels, or the null class when unconditional."""

    num_classes = 10
    in_channels = 1

    def __init__(
        self,
        split: str = "train",
        input_size: int = 32,
        data_dir: str | os.PathLike | None = None,
        conditional: bool = True,
        indices: np.ndarray | None = None,
    ):
        images, labels = load_fashion_mnist(split, data_dir)
        if indices is not None:
            images, labels = images[indices], labels[indices]
        self.images = to_model_range(images, input_size)
        self.labels = torch.from_numpy(labels) if conditional else torch.zeros(len(labels), dtype=torch.long)
        self.conditional, self.split, self.input_size = conditional, split, input_size

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]
