"""Grids name their rows: a reader sees which class each row was asked for."""

import numpy as np
from PIL import Image

from conftest import tiny_config
from robuq.data.fashion_mnist import CLASS_NAMES
from robuq.models.dit import DiT
from robuq.sample.generate import row_names, save_grid


def test_rows_are_named_by_class():
    assert row_names(DiT(tiny_config(num_classes=10, in_channels=1))) == list(CLASS_NAMES)
    assert row_names(DiT(tiny_config(num_classes=3, in_channels=4))) == ["class 0", "class 1", "class 2"]
    assert row_names(DiT(tiny_config(num_classes=0))) is None


def test_labelled_grid_keeps_the_images_and_adds_a_margin(tmp_path):
    images = np.random.default_rng(0).integers(0, 255, (6, 8, 8, 3), dtype=np.uint8)
    plain = Image.open(save_grid(images, tmp_path / "a.png", 2))
    named = Image.open(save_grid(images, tmp_path / "b.png", 2, row_labels=["one", "two", "three"]))
    margin = named.width - plain.width
    assert margin > 0 and named.height == plain.height
    assert np.array_equal(np.asarray(named)[:, margin:], np.asarray(plain))
    assert np.asarray(named)[:, :margin].min() < 255  # the labels are drawn
