"""A small Fashion-MNIST CNN whose activations stand in for Inception's on this dataset.

Penultimate features (256-d) → FID and precision/recall; a spatial map of an intermediate layer (8
channels × 7 × 7) → sFID; softmax → Inception Score. Trained by ``robuq eval train-classifier`` and
shipped with robuq, so the embedded benchmark needs nothing from the network.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from robuq.core.options import option
from robuq.data.fashion_mnist import FashionMNIST
from robuq.core.files import load_tensors, save_tensors
from robuq.core.errors import RobuqError, RobuqFileNotFoundError

ASSET = Path(__file__).resolve().parents[1] / "assets" / "fmnist-classifier.safetensors"
INPUT_SIZE = 28


class FashionClassifier(nn.Module):
    def __init__(self, width: int = 16, feature_dim: int = 256, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.conv3 = nn.Conv2d(2 * width, 4 * width, 3, padding=1)
        self.fc = nn.Linear(4 * width * 7 * 7, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)
        self.dropout = nn.Dropout(0.3)

    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: (N, 1, 28, 28) in [−1, 1] → {"pool": (N, 256), "spatial": (N, 392), "logits": (N, 10)}."""
        h = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)  # (N, 2w, 14, 14)
        h = F.max_pool2d(F.relu(self.conv3(h)), 2)  # (N, 4w, 7, 7)
        spatial = h[:, :8].flatten(1)  # like ADM's sFID: the first channels of a mid-level map
        pool = F.relu(self.fc(h.flatten(1)))
        return {"pool": pool, "spatial": spatial, "logits": self.head(self.dropout(pool))}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)["logits"]


def to_classifier_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 NHWC (RGB or gray, any size) or float NCHW in [−1, 1] → float (N, 1, 28, 28) in [−1, 1]."""
    if isinstance(images, np.ndarray):
        x = torch.tensor(images, dtype=torch.float32)  # a copy: read-only arrays (np.load) stay untouched
        x = x.mean(dim=-1) if x.dim() == 4 else x  # RGB replicated from gray → gray
        x = (x / 127.5 - 1).unsqueeze(1)
    else:
        x = images.float()
        x = x.mean(dim=1, keepdim=True) if x.shape[1] != 1 else x
    if x.shape[-1] != INPUT_SIZE:
        h = x.shape[-1]
        if h > INPUT_SIZE and (h - INPUT_SIZE) % 2 == 0:  # robuq pads 28 → 32 with background: crop it back
            pad = (h - INPUT_SIZE) // 2
            x = x[..., pad : pad + INPUT_SIZE, pad : pad + INPUT_SIZE]
        else:
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
    return x


@torch.no_grad()
def batch_features(model: FashionClassifier, images) -> dict[str, np.ndarray]:
    """``pool``, ``spatial`` and ``probs`` of one batch of images (as ``to_classifier_input`` takes them)."""
    model.eval()
    f = model.features(to_classifier_input(images))
    return {"pool": f["pool"].numpy(), "spatial": f["spatial"].numpy(), "probs": f["logits"].softmax(dim=1).numpy()}


def extract(model: FashionClassifier, images, batch_size: int = 500) -> dict[str, np.ndarray]:
    """Features of a whole image set, in batches."""
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(images), batch_size):
        for key, value in batch_features(model, images[start : start + batch_size]).items():
            parts.setdefault(key, []).append(value)
    return {k: np.concatenate(v) for k, v in parts.items()}


@dataclass
class ClassifierTrainConfig:
    """``robuq eval train-classifier``: the Fashion-MNIST CNN whose features the metrics use."""

    epochs: int = option(5, "passes over the training split")
    batch_size: int = option(128, "images per step")
    lr: float = option(3e-3, "peak learning rate (one-cycle schedule)")
    # ≈ 0.9 M parameters, 3.6 MB: a few CPU minutes to train, > 90 % test accuracy
    width: int = option(16, "channels of the first convolution (the network's width)")
    seed: int = option(0, "seed of the initial weights and the data order")
    data_dir: str | None = option(None, "folder of the Fashion-MNIST IDX files")
    # Not the shipped asset: every classifier FID robuq reports depends on it, so replacing it takes an explicit path.
    out: str = option(
        "fmnist-classifier.safetensors",
        "where to write the weights (accuracy and settings go in the "
        "file's header); score with them by `robuq eval metrics --classifier PATH`",
    )


def accuracy(model: FashionClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        predictions = torch.cat([model(images[i : i + 1000]).argmax(1) for i in range(0, len(images), 1000)])
    return float((predictions == labels).float().mean())


def train_classifier(config: ClassifierTrainConfig, progress: bool = True) -> dict:
    """Train on the Fashion-MNIST training split, report test accuracy, save weights + JSON."""
    with torch.random.fork_rng(devices=[]):  # seeded for the run, and the caller's RNG left as it was
        torch.manual_seed(config.seed)
        return _train_classifier(config, progress)


def _train_classifier(config: ClassifierTrainConfig, progress: bool) -> dict:
    train_set = FashionMNIST("train", INPUT_SIZE, config.data_dir)
    test_set = FashionMNIST("test", INPUT_SIZE, config.data_dir)
    model = FashionClassifier(config.width)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=1e-4)
    steps = config.epochs * (len(train_set) // config.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=steps)
    g = torch.Generator().manual_seed(config.seed)
    t0 = time.perf_counter()
    bar = tqdm(total=steps, desc="classifier", disable=not progress, dynamic_ncols=True)
    for _ in range(config.epochs):
        model.train()
        order = torch.randperm(len(train_set), generator=g)
        for i in range(len(train_set) // config.batch_size):
            idx = order[i * config.batch_size : (i + 1) * config.batch_size]
            x = train_set.images[idx]
            # Light augmentation: horizontal flips keep garments garments.
            flip = torch.rand(len(idx), generator=g) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            loss = F.cross_entropy(model(x), train_set.labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    result = {
        "test_accuracy": accuracy(model, test_set.images, test_set.labels),
        "seconds": time.perf_counter() - t0,
        "config": asdict(config),
    }
    save_tensors(config.out, model.state_dict(), {"kind": "fmnist-classifier", "width": config.width, **result})
    return result


def load_classifier(path: str | Path | None = None) -> FashionClassifier:
    path = Path(path) if path else ASSET
    if not path.is_file():
        raise RobuqFileNotFoundError(
            f"the Fashion-MNIST classifier {path} is missing; train it with `robuq eval train-classifier`"
        )
    tensors, meta = load_tensors(path)
    if meta.get("kind") != "fmnist-classifier":
        raise RobuqError(f"{path} is not a robuq Fashion-MNIST classifier (its header says {meta.get('kind')!r})")
    model = FashionClassifier(int(meta["width"]))
    model.load_state_dict(tensors)
    return model.eval()
