import numpy as np
import pytest
import torch

from robuq.eval.classifier import (
    ClassifierTrainConfig,
    FashionClassifier,
    extract,
    load_classifier,
    to_classifier_input,
    train_classifier,
)
from robuq.core.files import save_tensors


def test_feature_shapes_and_input_conversion():
    model = FashionClassifier(width=8)
    rgb = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    x = to_classifier_input(rgb)
    assert x.shape == (5, 1, 28, 28) and x.min() >= -1 and x.max() <= 1
    features = extract(model, rgb)
    assert features["pool"].shape == (5, 256) and features["spatial"].shape == (5, 8 * 7 * 7)
    assert np.allclose(features["probs"].sum(1), 1, atol=1e-5)


def test_training_learns_the_synthetic_patterns(tmp_path, fmnist_dir):
    out = tmp_path / "clf.safetensors"
    result = train_classifier(
        ClassifierTrainConfig(epochs=15, batch_size=32, width=8, data_dir=str(fmnist_dir), out=str(out)), progress=False
    )
    assert result["test_accuracy"] > 0.5  # ten classes of bars at class-dependent heights; chance is 0.1
    model = load_classifier(out)
    assert model.conv1.out_channels == 8


def test_loader_refuses_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-classifier"):
        load_classifier(tmp_path / "missing.safetensors")
    other = save_tensors(tmp_path / "other.safetensors", {"w": torch.zeros(1)}, {"kind": "model"})
    with pytest.raises(ValueError, match="not a robuq Fashion-MNIST classifier"):
        load_classifier(other)
