import gzip

import numpy as np
import pytest
import torch
from PIL import Image

from robuq.data import DataNotFoundError, FashionMNIST, StreamingImageFolder, build_dataset
from robuq.data.fashion_mnist import find_fashion_mnist, read_idx, to_model_range, write_idx


@pytest.mark.parametrize("name", ["a-idx3-ubyte", "a-idx3-ubyte.gz"])
def test_idx_round_trip(tmp_path, name):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / name, array)
    assert np.array_equal(read_idx(tmp_path / name), array)


def test_idx_reader_on_handwritten_bytes(tmp_path):
    # magic 0x00000801 (uint8, 1-D), length 3, then the labels: written byte by byte as the format says.
    (tmp_path / "labels").write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 0, 9]))
    assert read_idx(tmp_path / "labels").tolist() == [7, 0, 9]
    with gzip.open(tmp_path / "int32.gz", "wb") as f:
        f.write(bytes([0, 0, 0x0C, 1, 0, 0, 0, 2]) + (258).to_bytes(4, "big") + (-1).to_bytes(4, "big", signed=True))
    assert read_idx(tmp_path / "int32.gz").tolist() == [258, -1]


def test_idx_reader_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x89PNG....")
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 5, 1, 2]))
    with pytest.raises(ValueError, match="needs 5"):
        read_idx(tmp_path / "short")


def test_fashion_mnist_from_data_dir(fmnist_dir):
    ds = FashionMNIST("train", input_size=32, data_dir=fmnist_dir)
    assert len(ds) == 96 and ds.images.shape == (96, 1, 32, 32)
    assert ds.images.min() == -1.0 and ds.images.max() <= 1.0
    assert torch.all(ds.images[:, :, :2, :] == -1.0)  # padded with background
    x, y = ds[0]
    assert x.shape == (1, 32, 32) and 0 <= int(y) < 10
    assert len(FashionMNIST("test", input_size=28, data_dir=fmnist_dir)) == 32
    assert torch.all(FashionMNIST("train", 28, fmnist_dir, conditional=False).labels == 0)


def test_search_order_env_then_debian(fmnist_dir, monkeypatch):
    monkeypatch.setenv("ROBUQ_DATA", str(fmnist_dir))
    images, _ = find_fashion_mnist("train")
    assert images.parent == fmnist_dir


def test_a_given_data_dir_is_the_only_place_searched(fmnist_dir, monkeypatch, tmp_path):
    """A run records its --data-dir: training on data found elsewhere would make that record false."""
    monkeypatch.setenv("ROBUQ_DATA", str(fmnist_dir))
    with pytest.raises(DataNotFoundError, match="is not a folder"):
        find_fashion_mnist("train", data_dir=tmp_path / "nonexistent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataNotFoundError, match="not found in: .*empty"):
        find_fashion_mnist("train", data_dir=tmp_path / "empty")


def test_missing_data_names_both_fixes(tmp_path, monkeypatch):
    monkeypatch.delenv("ROBUQ_DATA", raising=False)
    monkeypatch.setattr("robuq.data.fashion_mnist.DEBIAN_DIR", tmp_path / "nothing")
    with pytest.raises(DataNotFoundError) as info:
        find_fashion_mnist("train", data_dir=tmp_path)
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message and "--data-dir" in message and "ROBUQ_DATA" in message


def test_resize_when_padding_does_not_fit():
    x = to_model_range(np.zeros((2, 28, 28), dtype=np.uint8), 16)
    assert x.shape == (2, 1, 16, 16) and torch.allclose(x, torch.full_like(x, -1.0))


def test_image_folder(tmp_path):
    for cls, color in (("dogs", 220), ("cats", 30)):  # made out of order: labels follow the sorted names
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(np.full((20, 30, 3), color, dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    ds = build_dataset(str(tmp_path), input_size=16, channels=3)
    assert isinstance(ds, StreamingImageFolder) and not hasattr(ds, "images")  # paths only, decoded when read
    assert len(ds) == 6 and ds.class_names == ("cats", "dogs") and ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    images = torch.stack([ds[i][0] for i in range(6)])
    assert images.shape == (6, 3, 16, 16) and images[0].mean() < 0 < images[-1].mean()
    gray = build_dataset(str(tmp_path), input_size=16, channels=1, conditional=False)
    assert gray[4][0].shape == (1, 16, 16) and gray.labels.tolist() == [0] * 6
    assert torch.allclose(gray[4][0], images[4].mean(0, keepdim=True), atol=0.01)
    with pytest.raises(FileNotFoundError, match="no images"):
        StreamingImageFolder(_empty(tmp_path), 16, conditional=False)
    with pytest.raises(ValueError, match="sub-folder"):
        StreamingImageFolder(_empty(tmp_path), 16)


def test_unconditional_flat_folder(tmp_path):
    for i, color in enumerate((10, 240)):
        Image.fromarray(np.full((12, 12, 3), color, dtype=np.uint8)).save(tmp_path / f"{i}.jpg")
    ds = build_dataset(str(tmp_path), input_size=8, conditional=False)
    assert len(ds) == 2 and ds.class_names == ("all",) and ds[1][0].shape == (3, 8, 8) and int(ds[1][1]) == 0


def _empty(tmp_path):
    (tmp_path / "empty").mkdir(exist_ok=True)
    return tmp_path / "empty"
