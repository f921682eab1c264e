"""`robuq eval`: FID, sFID, IS, precision/recall (and PSNR against a paired sample set) of an .npz of samples.

Reference statistics (Fashion-MNIST test split by default) are computed once per feature extractor and
cached as .npz; the samples file is the ADM format ``robuq sample`` writes (``arr_0``: uint8 NHWC).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from robuq.core.options import option
from robuq.data.fashion_mnist import load_fashion_mnist
from robuq.eval.metrics import FeatureStats, fid, inception_score, precision_recall, psnr

EXTRACTORS = ("classifier", "inception")


@dataclass
class EvalConfig:
    """``robuq eval metrics``: sample-quality metrics of an ADM-style .npz."""

    samples: str = option("samples/samples.npz", "the samples: an .npz with arr_0 uint8 N×H×W×C (as `robuq sample` writes)")
    reference: str = option("fashion-mnist-test", "reference images: 'fashion-mnist-test' or an .npz (arr_0 uint8 NHWC)")
    extractor: str = option("classifier", "features: robuq's Fashion-MNIST classifier, or the FID Inception (needs weights)",
                            choices=EXTRACTORS)
    inception_weights: str | None = option(None, "the Inception's weights (pytorch-fid's pt_inception .pth)")
    classifier: str | None = option(None, "classifier weights (default: the classifier shipped with robuq)")
    paired: str | None = option(None, "samples of the full-precision model from the same noise: adds their PSNR")
    data_dir: str | None = option(None, "folder of the Fashion-MNIST IDX files (for the default reference)")
    cache_dir: str = option(os.path.join(os.path.expanduser("~"), ".cache", "robuq"), "where reference statistics are cached")
    max_reference: int = option(10_000, "reference images used at most")


def load_images(path: str | os.PathLike) -> np.ndarray:
    try:
        with np.load(path) as data:
            images = data["arr_0"]
    except (OSError, KeyError, ValueError) as exc:
        raise ValueError(f"{path} is not an ADM-style sample file (an .npz with arr_0: uint8 N×H×W×C): {exc}") from exc
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"{path}: arr_0 must be uint8 N×H×W×C, got {images.dtype} {images.shape}")
    return images


def _extractor(config: EvalConfig) -> tuple[Callable[[np.ndarray], dict[str, np.ndarray]], str]:
    if config.extractor == "classifier":
        from robuq.eval.classifier import ASSET, extract, load_classifier

        path = Path(config.classifier or ASSET)
        model = load_classifier(path)
        return (lambda images: extract(model, images)), f"classifier-{_digest(path)}"
    if config.extractor == "inception":
        from robuq.eval.inception import extract_inception, load_fid_inception

        if not config.inception_weights:
            raise ValueError("--extractor inception needs --inception-weights PATH (pytorch-fid's pt_inception .pth)")
        model = load_fid_inception(config.inception_weights)
        return (lambda images: extract_inception(model, images)), f"inception-{_digest(Path(config.inception_weights))}"
    raise ValueError(f"unknown extractor {config.extractor!r}; use one of {', '.join(EXTRACTORS)}")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def _reference_images(config: EvalConfig) -> tuple[np.ndarray, str]:
    if config.reference == "fashion-mnist-test":
        images, _ = load_fashion_mnist("test", config.data_dir)
        images = images[: config.max_reference]
        return np.repeat(images[..., None], 3, axis=-1), f"fmnist-test-{len(images)}"
    images = load_images(config.reference)[: config.max_reference]
    return images, f"{Path(config.reference).stem}-{_digest(Path(config.reference))}"


def reference_features(config: EvalConfig, extract: Callable, extractor_id: str) -> dict[str, np.ndarray]:
    """Features of the reference set, from the cache when this extractor has seen it before."""
    images, reference_id = _reference_images(config)
    cache = Path(config.cache_dir) / f"ref-{reference_id}-{extractor_id}.npz"
    if cache.is_file():
        with np.load(cache) as data:
            return {k: data[k] for k in data.files}
    features = extract(images)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(tmp, **features)
    os.replace(tmp, cache)
    return features


def evaluate(config: EvalConfig) -> dict:
    samples = load_images(config.samples)
    extract, extractor_id = _extractor(config)
    ref = reference_features(config, extract, extractor_id)
    gen = extract(samples)
    is_mean, is_std = inception_score(gen["probs"])
    precision, recall = precision_recall(ref["pool"], gen["pool"])
    result = {
        "fid": fid(FeatureStats.of(ref["pool"]), FeatureStats.of(gen["pool"])),
        "sfid": fid(FeatureStats.of(ref["spatial"]), FeatureStats.of(gen["spatial"])),
        "is": is_mean, "is_std": is_std, "precision": precision, "recall": recall,
        "num_samples": len(samples), "num_reference": len(ref["pool"]), "extractor": extractor_id,
    }
    if config.paired:
        result["psnr_vs_paired"] = psnr(samples, load_images(config.paired))
    result["config"] = asdict(config)
    return result
