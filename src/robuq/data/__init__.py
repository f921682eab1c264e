"""Training data: Fashion-MNIST by name, or a folder of the user's images."""
from __future__ import annotations

from robuq.data.fashion_mnist import CLASS_NAMES, DataNotFoundError, FashionMNIST, load_fashion_mnist, read_idx
from robuq.data.image_folder import ImageFolder
from robuq.data.image_stream import CorruptImageError, StreamingImageFolder, center_crop_arr
from robuq.data.latents import LatentDataset, read_index


def build_dataset(
    name: str, input_size: int, data_dir: str | None = None, conditional: bool = True, split: str = "train", channels: int = 3
) -> FashionMNIST | ImageFolder:
    """``"fashion-mnist"`` or the path of an image folder."""
    if name == "fashion-mnist":
        return FashionMNIST(split, input_size, data_dir, conditional)
    return ImageFolder(name, input_size, channels=channels, conditional=conditional)


__all__ = ["CLASS_NAMES", "CorruptImageError", "DataNotFoundError", "FashionMNIST", "ImageFolder", "LatentDataset",
           "StreamingImageFolder", "build_dataset", "center_crop_arr", "load_fashion_mnist", "read_idx", "read_index"]
