"""Generator metrics against closed forms and constructed sets (n2a_core.evaluation.metrics)."""

from __future__ import annotations

import numpy as np
import pytest

from n2a_core.evaluation.metrics import (
    Gaussian,
    conditional_accuracy,
    frechet_distance,
    kernel_inception_distance,
    knn_classify,
    mmd2_unbiased,
    precision_recall,
)


def test_identical_sets_have_frechet_distance_zero():
    x = np.random.default_rng(0).normal(size=(50, 8))
    g = Gaussian.fit(x)
    assert frechet_distance(g, g) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_of_two_gaussians_matches_the_closed_form():
    # Commuting (diagonal) covariances: Tr((Σa Σb)^½) = Σ sqrt(a_i b_i), so
    # d² = |μa − μb|² + Σ (sqrt(a_i) − sqrt(b_i))².
    mean_a, mean_b = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    var_a, var_b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = ((mean_a - mean_b) ** 2).sum() + ((np.sqrt(var_a) - np.sqrt(var_b)) ** 2).sum()
    got = frechet_distance(Gaussian(mean_a, np.diag(var_a)), Gaussian(mean_b, np.diag(var_b)))
    assert got == pytest.approx(expected)


def test_frechet_distance_with_non_commuting_covariances_matches_the_2x2_closed_form():
    # For 2 x 2 PSD matrices, Tr(sqrt(M)) = sqrt(Tr M + 2 sqrt(det M)) with M = Σa Σb.
    cov_a = np.array([[2.0, 0.7], [0.7, 1.0]])
    cov_b = np.array([[1.0, -0.4], [-0.4, 3.0]])
    product = cov_a @ cov_b
    trace_sqrt = np.sqrt(np.trace(product) + 2 * np.sqrt(np.linalg.det(product)))
    expected = 0.25 + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt
    got = frechet_distance(Gaussian(np.zeros(2), cov_a), Gaussian(np.array([0.5, 0.0]), cov_b))
    assert got == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_from_samples_approaches_the_population_value():
    rng = np.random.default_rng(1)
    a = rng.normal(0.0, 1.0, size=(20000, 2))
    b = rng.normal([3.0, 0.0], [2.0, 1.0], size=(20000, 2))
    expected = 9.0 + (1 - 2) ** 2  # |Δμ|² + (σa − σb)²
    assert frechet_distance(Gaussian.fit(a), Gaussian.fit(b)) == pytest.approx(expected, rel=0.03)


def test_frechet_distance_survives_rank_deficient_covariances():
    # Fewer images than feature dimensions: singular covariances, where sqrtm of the product
    # is ill-conditioned. The result must be finite, non-negative, and 0 for identical sets.
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(10, 64)), rng.normal(size=(10, 64)) + 0.5
    same = frechet_distance(Gaussian.fit(x), Gaussian.fit(x))
    different = frechet_distance(Gaussian.fit(x), Gaussian.fit(y))
    assert same == pytest.approx(0.0, abs=1e-8)
    assert np.isfinite(different) and different > 64 * 0.25 * 0.9  # at least about |Δμ|² = 16


def test_unbiased_mmd_matches_the_population_value_of_the_cubic_kernel():
    # d = 1: k(x, y) = (xy + 1)³ = x³y³ + 3x²y² + 3xy + 1, so MMD² = (EX³ − EY³)²
    # + 3 (EX² − EY²)² + 3 (EX − EY)². X ~ N(0, 1), Y ~ N(μ, 1): EY = μ, EY² = 1 + μ²,
    # EY³ = μ³ + 3μ. Small subsets (m = 16) make the bias of the plain (V-statistic)
    # estimate, 2 (E k(x,x) − E k(x,x')) / m = 2 (28 − 4) / 16 = 3, far larger than the tolerance.
    mu = 0.5
    expected = (mu**3 + 3 * mu) ** 2 + 3 * mu**4 + 3 * mu**2
    rng = np.random.default_rng(3)
    # Independent draws, so the standard error of their mean is exact.
    estimates = np.array([mmd2_unbiased(rng.normal(size=(16, 1)), rng.normal(mu, 1.0, size=(16, 1)))
                          for _ in range(2000)])
    standard_error = estimates.std(ddof=1) / np.sqrt(len(estimates))
    assert abs(estimates.mean() - expected) < 4 * standard_error
    assert standard_error < 0.5  # 4 SE stays well below the V-statistic's bias of 3


def test_kid_of_one_distribution_is_zero_within_its_standard_error():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(2000, 16)), rng.normal(size=(2000, 16))
    kid = kernel_inception_distance(x, y, subsets=50, subset_size=200)
    assert abs(kid.mean) < 4 * kid.standard_error
    shifted = kernel_inception_distance(x, y + 0.5, subsets=50, subset_size=200)
    assert shifted.mean > 10 * shifted.standard_error


def test_unbiased_mmd_leaves_out_the_diagonal():
    # Two points each, 1-d: by hand, with k(a, b) = (ab + 1)³.
    x, y = np.array([[0.0], [1.0]]), np.array([[1.0], [2.0]])
    k = lambda a, b: (a * b + 1) ** 3  # noqa: E731
    expected = k(0, 1) + k(1, 2) - 2 * (k(0, 1) + k(0, 2) + k(1, 1) + k(1, 2)) / 4
    assert mmd2_unbiased(x, y) == pytest.approx(expected)


def _two_clusters(rng):
    a = rng.normal(0.0, 0.1, size=(50, 2))
    b = rng.normal(10.0, 0.1, size=(50, 2))
    return a, b


def test_precision_recall_of_a_generator_that_drops_a_mode():
    a, b = _two_clusters(np.random.default_rng(5))
    real = np.concatenate([a, b])
    pr = precision_recall(real, a.copy(), k=3)
    assert pr.precision == 1.0  # every generated point is a real point
    assert pr.recall == 0.5  # cluster b is nowhere near a generated point


def test_precision_recall_of_a_generator_with_junk():
    rng = np.random.default_rng(6)
    a, b = _two_clusters(rng)
    real = np.concatenate([a, b])
    junk = rng.normal(100.0, 0.1, size=(100, 2))
    pr = precision_recall(real, np.concatenate([real, junk]), k=3)
    assert pr.precision == 0.5  # the junk half lies outside every real ball
    assert pr.recall == 1.0


def test_precision_recall_of_identical_sets_is_one():
    x = np.random.default_rng(7).normal(size=(40, 5))
    pr = precision_recall(x, x, k=3)
    assert (pr.precision, pr.recall) == (1.0, 1.0)


def test_knn_classifier_and_conditional_accuracy():
    rng = np.random.default_rng(8)
    a, b = _two_clusters(rng)
    features = np.concatenate([a, b])
    labels = ["a"] * 50 + ["b"] * 50
    queries = np.array([[0.05, 0.0], [9.9, 10.1], [0.0, 0.1], [10.0, 10.0]])
    assert knn_classify(features, labels, queries, k=5) == ["a", "b", "a", "b"]
    assert conditional_accuracy(features, labels, queries, ["a", "b", "b", "b"], k=5) == 0.75


def test_metrics_refuse_bad_shapes():
    with pytest.raises(ValueError, match="N x D"):
        Gaussian.fit(np.zeros(5))
    with pytest.raises(ValueError, match="k=3"):
        precision_recall(np.zeros((3, 2)), np.zeros((10, 2)))
