"""FID, sFID, Inception Score, precision/recall and PSNR — computed the way the standard suites do.

The Fréchet distance follows pytorch-fid and the ADM evaluator: SciPy's ``sqrtm`` of Σ₁Σ₂; if the
result is not finite, add ε·I to both covariances; drop an imaginary part only when it is numerically
zero on the diagonal (|imag| ≤ 1e-3), else fail — a complex result means the statistics are broken.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from scipy import linalg

from robuq.core.files import save_npz
from robuq.core.errors import RobuqError


@dataclass
class FeatureStats:
    """Mean and covariance of a feature set (what FID needs), cached as .npz (``mu``, ``sigma``)."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int

    @classmethod
    def of(cls, features: np.ndarray) -> "FeatureStats":
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or len(features) < 2:
            raise RobuqError(f"need at least 2 feature vectors as an (N, D) array, got shape {features.shape}")
        return cls(features.mean(axis=0), np.cov(features, rowvar=False), len(features))

    def save(self, path: str | os.PathLike) -> Path:
        return save_npz(path, mu=self.mu, sigma=self.sigma, count=self.count)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FeatureStats":
        with np.load(path) as data:
            if "mu" not in data or "sigma" not in data:
                raise RobuqError(f"{path} holds no 'mu'/'sigma' statistics")
            return cls(data["mu"], data["sigma"], int(data["count"]) if "count" in data else -1)


class StatsAccumulator:
    """Mean and covariance of features that arrive in batches, in float64, without keeping them all.

    Sums are taken around the first batch's mean, so that Σxxᵀ − nμμᵀ does not cancel catastrophically.
    """

    def __init__(self) -> None:
        self.count, self.shift, self.total, self.outer = 0, None, None, None

    def add(self, features: np.ndarray) -> None:
        x = np.asarray(features, dtype=np.float64)
        if self.shift is None:
            self.shift = x.mean(axis=0)
            self.total, self.outer = np.zeros_like(self.shift), np.zeros((x.shape[1], x.shape[1]))
        x = x - self.shift
        self.count += len(x)
        self.total += x.sum(axis=0)
        self.outer += x.T @ x

    def result(self) -> FeatureStats:
        if self.count < 2:
            raise RobuqError(f"need at least 2 feature vectors, got {self.count}")
        mean = self.total / self.count
        sigma = (self.outer - self.count * np.outer(mean, mean)) / (self.count - 1)
        return FeatureStats(mean + self.shift, sigma, self.count)


def _sqrtm(matrix: np.ndarray) -> np.ndarray:
    # SciPy < 1.16 returned (sqrtm, error) with disp=False; newer releases return the matrix alone.
    with warnings.catch_warnings():
        # Singular covariances (fewer samples than features) are expected here; the evaluation says what they
        # mean for the number, in words, instead of SciPy's "Matrix is singular".
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        result = linalg.sqrtm(matrix)
    return result[0] if isinstance(result, tuple) else result


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁Σ₂)^½)."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise RobuqError(f"statistics of different feature sizes: {mu1.shape} vs {mu2.shape}")
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise RobuqError(f"the matrix square root has a large imaginary part ({np.max(np.abs(covmean.imag)):.3g})")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid(real: FeatureStats, fake: FeatureStats) -> float:
    return frechet_distance(real.mu, real.sigma, fake.mu, fake.sigma)


def _split_score(p: np.ndarray, log_p: np.ndarray, eps: float) -> float:
    """exp(E_x KL(p(y|x) ‖ p(y))) of one split, p(y) its mean prediction."""
    log_marginal = np.log(p.mean(axis=0, keepdims=True) + eps)
    return math.exp((p * (log_p - log_marginal)).sum(axis=1).mean())


def inception_score(probabilities: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) ‖ p(y))), mean and standard deviation over ``splits`` chunks (as the IS paper).

    The chunks come from a fixed shuffle: sample files are often ordered by class (contiguously or
    interleaved), and a chunk that holds one class has p(y) = p(y|x), which scores ≈ 1 however good the
    images are.
    """
    p = np.asarray(probabilities, dtype=np.float64)
    p = p[np.random.default_rng(0).permutation(len(p))]
    scores = [_split_score(chunk, np.log(chunk + 1e-12), 1e-12) for chunk in np.array_split(p, splits)]
    return float(np.mean(scores)), float(np.std(scores))


def inception_score_consecutive(logits: np.ndarray, split_size: int = 5000) -> tuple[float, float]:
    """The ADM evaluator's IS: softmax of ``logits``, consecutive splits of ``split_size`` samples (the last one
    may be shorter), the mean (and standard deviation) of the splits' scores. log p comes from log-softmax, so
    it stays finite where ADM's float32 softmax would underflow to 0 (and its log to −inf)."""
    logits = np.asarray(logits, dtype=np.float64)
    log_p = logits - logits.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    p = np.exp(log_p)
    scores = [_split_score(p[i : i + split_size], log_p[i : i + split_size], 0.0) for i in range(0, len(p), split_size)]
    return float(np.mean(scores)), float(np.std(scores))


PR_DTYPES = ("float64", "float16")


def _pairwise_sq_distances(a: np.ndarray, b: np.ndarray, dtype: str) -> np.ndarray:
    """Squared distances between the rows of ``a`` and ``b``. "float16" is the ADM evaluator's arithmetic:
    features rounded to half precision, ‖u‖² − 2u·v + ‖v‖² with every step rounded to half (its GPU sums the
    products in float32), and float32 instead for a block where half overflows."""
    if dtype == "float16":
        half = np.float16
        a16, b16 = a.astype(half).astype(np.float32), b.astype(half).astype(np.float32)
        norm_a, norm_b = (a16 * a16).sum(1).astype(half), (b16 * b16).sum(1).astype(half)
        twice = (2 * (a16 @ b16.T)).astype(half)
        with np.errstate(over="ignore", invalid="ignore"):
            sq = ((norm_a[:, None] - twice).astype(half) + norm_b[None, :]).astype(half)
        if np.isfinite(sq).all():
            return np.maximum(sq, 0).astype(np.float32)
        a32, b32 = a.astype(np.float32), b.astype(np.float32)
        return np.maximum((a32 * a32).sum(1)[:, None] + (b32 * b32).sum(1)[None, :] - 2 * a32 @ b32.T, 0)
    a, b = a.astype(np.float64), b.astype(np.float64)
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.maximum(sq, 0)


def _blocks(count: int, size: int) -> Iterator[slice]:
    for start in range(0, count, size):
        yield slice(start, min(count, start + size))


def _kth_neighbour_radii(features: np.ndarray, k: int, chunk: int, dtype: str) -> np.ndarray:
    """Squared distance of each point to its k-th nearest neighbour in ``features`` (itself excluded), over
    blocks of ``chunk`` × ``chunk`` pairs: memory stays bounded however many points there are."""
    radii = np.empty(len(features))
    for rows in _blocks(len(features), chunk):
        nearest = None  # the k + 1 smallest distances of each row so far (the point itself among them)
        for cols in _blocks(len(features), chunk):
            d = _pairwise_sq_distances(features[rows], features[cols], dtype)
            d = d if nearest is None else np.concatenate([nearest, d], axis=1)
            nearest = np.partition(d, k, axis=1)[:, : k + 1] if d.shape[1] > k + 1 else d
        radii[rows] = np.sort(nearest, axis=1)[:, k]
    return radii


def _covered(points: np.ndarray, centres: np.ndarray, radii: np.ndarray, chunk: int, dtype: str) -> np.ndarray:
    """Whether each point lies in some centre's ball (squared ``radii``), over blocks of pairs."""
    inside = np.zeros(len(points), dtype=bool)
    for rows in _blocks(len(points), chunk):
        for cols in _blocks(len(centres), chunk):
            d = _pairwise_sq_distances(points[rows], centres[cols], dtype)
            inside[rows] |= (d <= radii[None, cols]).any(axis=1)
    return inside


def precision_recall(
    real: np.ndarray, fake: np.ndarray, k: int = 3, chunk: int = 1000, dtype: str = "float64"
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019): k-NN balls around each set's points.

    Precision: the fraction of fake samples inside the real manifold; recall: the converse. Distances are
    computed ``chunk`` × ``chunk`` at a time from the features as given (float32 features stay float32 until a
    block is computed), so the memory beyond the features is bounded at any number of samples. ``dtype``
    "float16" computes them as the ADM evaluator does, whose rounding puts more boundary ties inside a ball.
    """
    if dtype not in PR_DTYPES:
        raise RobuqError(f"precision/recall dtype must be one of {', '.join(PR_DTYPES)}, not {dtype!r}")
    real, fake = np.asarray(real), np.asarray(fake)
    if min(len(real), len(fake)) <= k:
        raise RobuqError(f"precision/recall with k={k} needs more than {k} samples in each set")
    real_radii, fake_radii = _kth_neighbour_radii(real, k, chunk, dtype), _kth_neighbour_radii(fake, k, chunk, dtype)
    precision = _covered(fake, real, real_radii, chunk, dtype).mean()
    recall = _covered(real, fake, fake_radii, chunk, dtype).mean()
    return float(precision), float(recall)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB between two uint8 image sets of the same shape."""
    if a.shape != b.shape:
        raise RobuqError(f"PSNR needs images of one shape, got {a.shape} and {b.shape}")
    return psnr_of_mse(float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


def psnr_of_mse(mse: float) -> float:
    """PSNR in dB of 8-bit images whose mean squared difference is ``mse`` (infinite when they are equal)."""
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)
