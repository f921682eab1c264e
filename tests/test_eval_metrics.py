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
