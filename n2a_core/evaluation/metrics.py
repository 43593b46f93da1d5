"""Generator metrics on feature vectors: Fréchet distance, KID, precision/recall, and the
accuracy of a nearest-neighbour classifier on conditioned images.

Every function takes N x D features (one row per image, from any feature extractor; a
tensor or an array) and computes in float64 on the CPU, so results do not depend on the
device or on float32 rounding of large covariance matrices. The math runs in torch rather
than NumPy so that it follows torch's thread settings (NumPy's OpenBLAS starts one thread
per core, which ran 7x slower here beside a busy training process).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


def _as_float64(features) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(features) if not isinstance(features, torch.Tensor) else features)
    x = x.detach().to("cpu", torch.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be N x D, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("features contain NaN or infinity (a diverged generator or a broken extractor)")
    return x


# -- Fréchet distance ---------------------------------------------------------------------
@dataclass(frozen=True)
class Gaussian:
    """Mean and covariance of a feature set (what FID keeps of a reference split)."""

    mean: torch.Tensor
    cov: torch.Tensor

    @classmethod
    def fit(cls, features) -> Gaussian:
        x = _as_float64(features)
        if len(x) < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {len(x)}")
        return cls(x.mean(0), torch.cov(x.T).reshape(x.shape[1], x.shape[1]))


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a symmetric positive semi-definite matrix; eigenvalues
    that rounding pushed below zero count as zero."""
    eigenvalues, eigenvectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * eigenvalues.clamp(min=0).sqrt()) @ eigenvectors.T


def frechet_distance(a: Gaussian, b: Gaussian) -> float:
    """The Fréchet (2-Wasserstein) distance between two Gaussians, squared, as in FID
    (Heusel et al. 2017, eq. 6; Dowson & Landau 1982):

        d² = |μ_a − μ_b|² + Tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^½)

    Tr((Σ_a Σ_b)^½) is computed as the sum of the square roots of the eigenvalues of the
    symmetric PSD matrix Σ_a^½ Σ_b Σ_a^½, which has the same eigenvalues as Σ_a Σ_b. Unlike
    scipy.linalg.sqrtm on the non-symmetric product, this never returns complex parts or
    NaN for the rank-deficient covariances of fewer images than feature dimensions.
    """
    mean_a, cov_a, mean_b, cov_b = (torch.as_tensor(v, dtype=torch.float64) for v in (a.mean, a.cov, b.mean, b.cov))
    sqrt_a = _psd_sqrt(cov_a)
    cross = sqrt_a @ cov_b @ sqrt_a
    trace_sqrt = torch.linalg.eigvalsh((cross + cross.T) / 2).clamp(min=0).sqrt().sum()
    distance = float(((mean_a - mean_b) ** 2).sum() + cov_a.trace() + cov_b.trace() - 2 * trace_sqrt)
    return max(distance, 0.0)  # rounding may leave -1e-12 for identical sets


# -- kernel inception distance ------------------------------------------------------------
def polynomial_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """k(x, y) = (x·y / d + 1)³, the kernel of KID (Bińkowski et al. 2018, sec. 3)."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def mmd2_unbiased(x, y) -> float:
    """The unbiased estimate of MMD² (Gretton et al. 2012, eq. 3): the diagonals k(x_i, x_i)
    are left out of the within-set means, so its expectation is the population MMD² for
    any sample size (and it can be negative when the sets come from one distribution)."""
    x, y = _as_float64(x), _as_float64(y)
    m, n = len(x), len(y)
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    within_x = (k_xx.sum() - k_xx.trace()) / (m * (m - 1))
    within_y = (k_yy.sum() - k_yy.trace()) / (n * (n - 1))
    return float(within_x + within_y - 2 * k_xy.mean())


@dataclass(frozen=True)
class KID:
    mean: float
    """Mean of the unbiased MMD² over the subsets: the KID."""
    std: float
    """Standard deviation over subsets (what torch-fidelity reports as kid_std and papers as ±)."""
    standard_error: float
    """std / √subsets: the uncertainty of `mean` (subsets overlap, so a lower bound)."""
    subsets: int
    subset_size: int


def kernel_inception_distance(real, fake, *, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> KID:
    """KID (Bińkowski et al. 2018): the unbiased MMD² with the cubic polynomial kernel,
    averaged over `subsets` random subsets of `subset_size` from each set (drawn without
    replacement; the size is capped at the smaller set)."""
    x, y = _as_float64(real), _as_float64(fake)
    size = min(subset_size, len(x), len(y))
    if size < 2:
        raise ValueError(f"KID needs at least 2 images per set, got {len(x)} real and {len(y)} generated")
    generator = torch.Generator().manual_seed(seed)
    values = torch.tensor([
        mmd2_unbiased(x[torch.randperm(len(x), generator=generator)[:size]],
                      y[torch.randperm(len(y), generator=generator)[:size]])
        for _ in range(subsets)
    ], dtype=torch.float64)
    std = float(values.std()) if subsets > 1 else 0.0
    return KID(float(values.mean()), std, std / subsets**0.5, subsets, size)


# -- precision and recall -----------------------------------------------------------------
def _pairwise_distances(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist")  # exact: 0 for equal rows


def knn_radii(x: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each row of x to its k-th nearest other row."""
    if len(x) <= k:
        raise ValueError(f"k-NN radii with k={k} need more than {k} feature vectors, got {len(x)}")
    distances = _pairwise_distances(x, x)
    # Column 0 of the sorted row is the point itself (distance 0).
    return distances.kthvalue(k + 1, dim=1).values


def _coverage(manifold: torch.Tensor, radii: torch.Tensor, queries: torch.Tensor, chunk: int = 1024) -> float:
    """The share of `queries` within radius of at least one manifold point."""
    inside = 0
    for start in range(0, len(queries), chunk):
        distances = _pairwise_distances(queries[start:start + chunk], manifold)
        inside += int((distances <= radii[None, :]).any(1).sum())
    return inside / len(queries)


@dataclass(frozen=True)
class PrecisionRecall:
    precision: float
    """Share of generated images inside the real manifold: fidelity."""
    recall: float
    """Share of real images inside the generated manifold: diversity, coverage of modes."""
    k: int


def precision_recall(real, fake, *, k: int = 3) -> PrecisionRecall:
    """Improved precision and recall (Kynkäänniemi et al. 2019, eq. 1-3): each set's manifold
    is the union of balls around its points with radius the distance to the k-th nearest
    neighbour in the same set (k = 3 in the paper); precision is the share of generated
    points in the real manifold, recall the share of real points in the generated one."""
    x, y = _as_float64(real), _as_float64(fake)
    precision = _coverage(x, knn_radii(x, k), y)
    recall = _coverage(y, knn_radii(y, k), x)
    return PrecisionRecall(precision, recall, k)


# -- conditional accuracy -----------------------------------------------------------------
def knn_classify(features, labels: Sequence[str], queries, *, k: int = 5) -> list[str]:
    """The majority label among each query's k nearest labelled feature vectors (ties go
    to the label of the nearer neighbour)."""
    x, q = _as_float64(features), _as_float64(queries)
    if len(x) != len(labels):
        raise ValueError(f"{len(x)} feature vectors for {len(labels)} labels")
    k = min(k, len(x))
    nearest = _pairwise_distances(q, x).topk(k, dim=1, largest=False).indices
    out = []
    for row in nearest.tolist():
        votes = Counter(labels[i] for i in row)
        best = max(votes.values())
        out.append(next(labels[i] for i in row if votes[labels[i]] == best))
    return out


def conditional_accuracy(features, labels: Sequence[str], queries, targets: Sequence[str], *, k: int = 5) -> float:
    """How often a k-NN classifier on labelled real features puts a generated image in
    the class it was conditioned on."""
    if len(queries) != len(targets):
        raise ValueError(f"{len(queries)} generated images for {len(targets)} target classes")
    predicted = knn_classify(features, labels, queries, k=k)
    return sum(p == t for p, t in zip(predicted, targets, strict=True)) / len(targets)
