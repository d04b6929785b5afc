"""evaluate/metrics/frechet.py: against a direct scipy formula, a symmetric eigh formula and closed forms."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import linalg
from scipy.stats import ortho_group

from atoken.evaluate.metrics.frechet import FrechetStats, frechet_distance, frechet_from_stats


def direct_frechet(x: np.ndarray, y: np.ndarray) -> float:
    """The textbook formula on raw features: np.cov and scipy's sqrtm of the product."""
    mu1, mu2 = x.mean(axis=0), y.mean(axis=0)
    cov1, cov2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(cov1 + cov2 - 2 * linalg.sqrtm(cov1 @ cov2).real))


def symmetric_frechet(mu1, cov1, mu2, cov2) -> float:
    """Tr (Σ1 Σ2)^½ = Tr (Σ1^½ Σ2 Σ1^½)^½: eigh only, valid for singular PSD matrices too."""
    values, vectors = np.linalg.eigh(cov1)
    root1 = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    inner = np.clip(np.linalg.eigvalsh(root1 @ cov2 @ root1), 0, None)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2 * np.sqrt(inner).sum())


def correlated(rng, n: int, dim: int, shift: float = 0.0) -> np.ndarray:
    return rng.normal(size=(n, dim)) @ rng.normal(size=(dim, dim)) + shift


@pytest.mark.parametrize("seed", range(3))
def test_matches_direct_scipy_formula_on_random_features(seed):
    rng = np.random.default_rng(seed)
    x, y = correlated(rng, 300, 12), correlated(rng, 250, 12, shift=0.5)
    a, b = FrechetStats(12), FrechetStats(12)
    a.update(x)
    b.update(y)
    expected = direct_frechet(x, y)
    assert frechet_from_stats(a, b) == pytest.approx(expected, rel=1e-9)
    assert frechet_from_stats(a, b) == pytest.approx(symmetric_frechet(*a.mean_and_covariance(),
                                                                       *b.mean_and_covariance()), rel=1e-9)


def test_closed_form_for_diagonal_gaussians():
    # Commuting covariances: Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½) = Σ (σ1 − σ2)², σ the standard deviations.
    rng = np.random.default_rng(1)
    sd1, sd2 = rng.uniform(0.1, 3, 20), rng.uniform(0.1, 3, 20)
    mu1, mu2 = rng.normal(size=20), rng.normal(size=20)
    expected = np.sum((sd1 - sd2) ** 2) + np.sum((mu1 - mu2) ** 2)
    assert frechet_distance(mu1, np.diag(sd1**2), mu2, np.diag(sd2**2)) == pytest.approx(expected, rel=1e-10)
    # The distance is invariant to a rotation of feature space: the same value for rotated, non-diagonal Σ.
    rotation = ortho_group.rvs(20, random_state=2)
    rotated = frechet_distance(rotation @ mu1, rotation @ np.diag(sd1**2) @ rotation.T,
                               rotation @ mu2, rotation @ np.diag(sd2**2) @ rotation.T)
    assert rotated == pytest.approx(expected, rel=1e-8)


def test_identical_gaussians_are_at_distance_zero_and_a_shift_adds_its_square():
    rng = np.random.default_rng(3)
    x = correlated(rng, 200, 8)
    cov, mu = np.cov(x, rowvar=False), x.mean(axis=0)
    assert frechet_distance(mu, cov, mu, cov) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(mu, cov, mu + 2.0, cov) == pytest.approx(8 * 4.0, rel=1e-9)


def test_samples_of_known_gaussians_approach_the_closed_form():
    rng = np.random.default_rng(4)
    sd1, sd2 = np.array([1.0, 2.0, 0.5]), np.array([1.5, 1.0, 0.5])
    a, b = FrechetStats(3), FrechetStats(3)
    for _ in range(10):  # 200k samples each, fed in batches
        a.update(rng.normal(size=(20_000, 3)) * sd1)
        b.update(rng.normal(size=(20_000, 3)) * sd2 + [1.0, 0.0, 0.0])
    assert frechet_from_stats(a, b) == pytest.approx(0.25 + 1.0 + 0.0 + 1.0, abs=0.02)


def test_stats_equal_numpy_mean_and_unbiased_covariance_whatever_the_batching():
    rng = np.random.default_rng(5)
    x = correlated(rng, 101, 6, shift=3.0).astype(np.float32)
    whole, batched = FrechetStats(6), FrechetStats(6)
    whole.update(x)
    for start in range(0, 101, 17):
        batched.update(x[start:start + 17])
    for stats in (whole, batched):
        mean, cov = stats.mean_and_covariance()
        np.testing.assert_allclose(mean, x.astype(np.float64).mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(cov, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-10)
    assert whole.count == batched.count == 101


def test_merging_accumulators_equals_one_accumulator():
    rng = np.random.default_rng(6)
    x = correlated(rng, 90, 5)
    one = FrechetStats(5)
    one.update(x)
    parts = [FrechetStats(5) for _ in range(3)]
    for part, chunk in zip(parts, np.array_split(x, 3), strict=True):
        part.update(chunk)
    merged = parts[0].merge(parts[1]).merge(parts[2])
    assert merged.count == one.count
    np.testing.assert_allclose(merged.total, one.total, rtol=1e-12)
    np.testing.assert_allclose(merged.outer, one.outer, rtol=1e-12)
    other = FrechetStats(5)
    other.update(correlated(rng, 50, 5, shift=1.0))
    assert frechet_from_stats(merged, other) == pytest.approx(frechet_from_stats(one, other), rel=1e-10)


def test_fewer_samples_than_dimensions_stays_finite_and_close_to_the_exact_value():
    # rFID on a small set: both covariances singular; pytorch-fid's eps regularisation moves the value little.
    rng = np.random.default_rng(7)
    a, b = FrechetStats(64), FrechetStats(64)
    a.update(correlated(rng, 10, 64))
    b.update(correlated(rng, 12, 64, shift=0.3))
    value = frechet_from_stats(a, b)
    exact = symmetric_frechet(*a.mean_and_covariance(), *b.mean_and_covariance())
    assert np.isfinite(value)
    assert value == pytest.approx(exact, rel=1e-3)


def test_a_covariance_needs_two_samples():
    stats = FrechetStats(4)
    stats.update(np.ones((1, 4)))
    with pytest.raises(ValueError, match="at least 2"):
        stats.mean_and_covariance()
