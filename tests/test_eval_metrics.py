import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import linalg

from robuq.eval.metrics import FeatureStats, fid, frechet_distance, inception_score, precision_recall, psnr


def test_identical_sets_have_zero_fid_and_full_precision_recall():
    x = np.random.default_rng(0).normal(size=(400, 16))
    stats = FeatureStats.of(x)
    assert fid(stats, stats) == pytest.approx(0.0, abs=1e-6)
    assert precision_recall(x, x) == (1.0, 1.0)


@settings(max_examples=25, deadline=None)
@given(d=st.integers(1, 8), shift=st.floats(-3, 3), s1=st.floats(0.2, 3), s2=st.floats(0.2, 3))
def test_closed_form_for_isotropic_gaussians(d, shift, s1, s2):
    # N(0, s1²I) vs N(shift·1, s2²I): d·shift² + d·(s1 − s2)².
    value = frechet_distance(np.zeros(d), s1**2 * np.eye(d), np.full(d, shift), s2**2 * np.eye(d))
    assert value == pytest.approx(d * shift**2 + d * (s1 - s2) ** 2, rel=1e-6, abs=1e-8)


def test_matches_the_reference_formula_on_made_up_features():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(300, 12)), rng.normal(size=(300, 12)) @ rng.normal(size=(12, 12)) * 0.5 + 0.3
    m1, s1, m2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real  # pytorch-fid's formula, written out
    expected = ((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(expected, rel=1e-9)


def test_stats_cache_round_trip(tmp_path):
    stats = FeatureStats.of(np.random.default_rng(2).normal(size=(50, 4)))
    loaded = FeatureStats.load(stats.save(tmp_path / "ref.npz"))
    assert np.array_equal(loaded.mu, stats.mu) and np.array_equal(loaded.sigma, stats.sigma) and loaded.count == 50
    np.savez(tmp_path / "bad.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="no 'mu'"):
        FeatureStats.load(tmp_path / "bad.npz")


def test_inception_score_does_not_depend_on_sample_order():
    # Confident samples sorted by class, contiguously (as robuq's benchmark writes them) or interleaved.
    contiguous, interleaved = np.repeat(np.eye(10), 500, axis=0), np.tile(np.eye(10), (500, 1))
    assert inception_score(contiguous)[0] == pytest.approx(10.0, rel=0.02)
    assert inception_score(interleaved)[0] == pytest.approx(10.0, rel=0.02)


def test_inception_score_extremes():
    confident = np.eye(10)[np.random.default_rng(1).integers(0, 10, 20_000)]
    assert inception_score(confident, splits=10)[0] == pytest.approx(10.0, rel=0.01)
    uniform = np.full((1000, 10), 0.1)
    assert inception_score(uniform)[0] == pytest.approx(1.0)


def test_precision_recall_of_a_collapsed_generator():
    rng = np.random.default_rng(3)
    real = rng.normal(size=(500, 2))
    collapsed = rng.normal(size=(500, 2)) * 0.05  # all mass at the mode: precise, but recalls little
    precision, recall = precision_recall(real, collapsed)
    assert precision > 0.95 and recall < 0.3


def test_psnr():
    a = np.zeros((2, 4, 4, 3), np.uint8)
    assert psnr(a, a) == float("inf")
    assert psnr(a, a + 255) == pytest.approx(0.0)


def _adm_sq_distance(u: np.ndarray, v: np.ndarray) -> np.float16:
    """One pair's squared distance as ADM's float16 graph computes it, written out scalar by scalar: inputs in
    half precision, each sum of products in float32 then rounded to half, each step of ‖u‖² − 2u·v + ‖v‖² in half."""
    u16, v16 = u.astype(np.float16), v.astype(np.float16)
    dot = lambda x, y: np.float16(sum(np.float32(a) * np.float32(b) for a, b in zip(x, y)))  # noqa: E731
    return max(np.float16(np.float16(dot(u16, u16) - np.float16(2 * dot(u16, v16))) + dot(v16, v16)), np.float16(0))


def test_float16_precision_recall_is_adms_arithmetic_and_differs_from_float64_at_boundary_ties():
    rng = np.random.default_rng(5)
    real = rng.normal(size=(40, 6)) * 3
    # Fakes a hair outside a real point's k-NN ball: outside in float64, inside once rounded to half precision.
    radii = np.sort(((real[:, None] - real[None]) ** 2).sum(-1), axis=1)[:, 3]
    direction = rng.normal(size=(40, 6))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    fake = real + direction * np.sqrt(radii)[:, None] * (1 + 2e-4)
    for rows in (slice(0, 5), slice(5, 9)):
        block = np.asarray([[_adm_sq_distance(u, v) for v in real] for u in fake[rows]], dtype=np.float32)
        from robuq.eval.metrics import _pairwise_sq_distances

        assert np.array_equal(_pairwise_sq_distances(fake[rows], real, "float16"), block)
    p64, _ = precision_recall(real, fake, dtype="float64")
    p16, _ = precision_recall(real, fake, dtype="float16")
    assert p16 > p64  # ADM's rounding counts boundary ties as covered, as the issue measured (+0.001–0.003 there)
    with pytest.raises(ValueError, match="float64, float16"):
        precision_recall(real, fake, dtype="bfloat16")


def test_precision_recall_is_the_same_at_any_block_size():
    rng = np.random.default_rng(6)
    real, fake = rng.normal(size=(700, 8)).astype(np.float32), (rng.normal(size=(650, 8)) * 1.2).astype(np.float32)
    expected = precision_recall(real, fake, chunk=10_000)  # one block
    assert precision_recall(real, fake, chunk=97) == expected and precision_recall(real, fake, chunk=256) == expected
