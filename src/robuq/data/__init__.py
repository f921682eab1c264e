"""Training data: Fashion-MNIST by name, or a folder of the user's images."""

from __future__ import annotations

from robuq.data.fashion_mnist import CLASS_NAMES, DataNotFoundError, FashionMNIST, load_fashion_mnist, read_idx
from robuq.data.image_folder import CorruptImageError, adm_center_crop
from robuq.data.image_stream import StreamingImageFolder
from robuq.data.latents import LatentDataset, read_index


def build_dataset(
    name: str,
    input_size: int,
    data_dir: str | None = None,
    conditional: bool = True,
    split: str = "train",
    channels: int = 3,
) -> FashionMNIST | StreamingImageFolder:
    """``"fashion-mnist"`` (small, held in memory) or the path of an image folder (read from disk as it is used)."""
    if name == "fashion-mnist":
        return FashionMNIST(split, input_size, data_dir, conditional)
    return StreamingImageFolder(name, input_size, channels=channels, conditional=conditional)


__all__ = [
    "CLASS_NAMES",
    "CorruptImageError",
    "DataNotFoundError",
    "FashionMNIST",
    "LatentDataset",
    "StreamingImageFolder",
    "adm_center_crop",
    "build_dataset",
    "load_fashion_mnist",
    "read_idx",
    "read_index",
]
