"""Batched k-means (k-means++ seeding, Lloyd iterations) for fitting the two codebooks."""

from __future__ import annotations

import torch

# Rows per chunk of the assignment step: bounds the (chunk x K) distance matrix, so tables of
# millions of rows are assigned in a few hundred MB.
ASSIGN_CHUNK_ROWS = 65536


def assign(points: torch.Tensor, centroids: torch.Tensor, chunk_rows: int = ASSIGN_CHUNK_ROWS) -> torch.Tensor:
    """Return the (n,) int64 index of the nearest centroid (squared L2) for each of the (n, d) points."""
    n = points.shape[0]
    codes = torch.empty(n, dtype=torch.int64, device=points.device)
    if n == 0:
        return codes
    if centroids.shape[1] == 0:
        return codes.zero_()
    half_norms = 0.5 * (centroids * centroids).sum(dim=1)
    for start in range(0, n, chunk_rows):
        chunk = points[start : start + chunk_rows]
        # argmin ||x - c||^2 = argmin (||c||^2 / 2 - x.c); ||x||^2 is the same for every centroid.
        scores = torch.addmm(half_norms, chunk, centroids.T, beta=1.0, alpha=-1.0)
        codes[start : start + chunk.shape[0]] = scores.argmin(dim=1)
    return codes


def kmeans(
    points: torch.Tensor,
    num_centroids: int,
    *,
    iterations: int,
    generator: torch.Generator,
    init: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fit `num_centroids` centroids to the (n, d) float32 points and return them as (K, d).

    Starts from `init` when given (a warm start), else from k-means++ seeding. Empty clusters are
    re-seeded with the points farthest from their centroid, so the result never contains NaN, also when
    K > n or all points are equal. Points are rescaled to a unit maximum during the fit so rows of
    large norm cannot overflow float32.
    """
    n, dim = points.shape
    if n == 0:
        raise ValueError("k-means needs at least one point")
    scale = float(points.abs().max())
    if scale == 0.0 or dim == 0:
        return torch.zeros(num_centroids, dim, dtype=points.dtype, device=points.device)
    x = points / scale
    centroids = init / scale if init is not None else _kmeans_plus_plus(x, num_centroids, generator)
    codes = assign(x, centroids)
    for _ in range(iterations):
        centroids = _update_centroids(x, codes, centroids)
        new_codes = assign(x, centroids)
        if torch.equal(new_codes, codes):
            break
        codes = new_codes
    return centroids * scale


def _kmeans_plus_plus(x: torch.Tensor, num_centroids: int, generator: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    centroids = torch.empty(num_centroids, x.shape[1], dtype=x.dtype, device=x.device)
    first = int(torch.randint(n, (1,), generator=generator, device=x.device))
    centroids[0] = x[first]
    min_sq_dist = ((x - x[first]) ** 2).sum(dim=1)
    for k in range(1, num_centroids):
        total = float(min_sq_dist.sum())
        if total > 0.0:
            choice = int(torch.multinomial(min_sq_dist / total, 1, generator=generator))
        else:  # every point coincides with a centroid already: any point will do
            choice = int(torch.randint(n, (1,), generator=generator, device=x.device))
        centroids[k] = x[choice]
        min_sq_dist = torch.minimum(min_sq_dist, ((x - x[choice]) ** 2).sum(dim=1))
    return centroids


def _update_centroids(x: torch.Tensor, codes: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    num_centroids = centroids.shape[0]
    sums = torch.zeros_like(centroids, dtype=torch.float64).index_add_(0, codes, x.to(torch.float64))
    counts = torch.bincount(codes, minlength=num_centroids)
    filled = counts > 0
    updated = centroids.clone()
    updated[filled] = (sums[filled] / counts[filled, None]).to(x.dtype)
    empty = (~filled).nonzero().squeeze(1)
    if empty.numel() > 0:
        # Re-seed each empty cluster with one of the points worst served by its current centroid.
        sq_dist = ((x - updated[codes]) ** 2).sum(dim=1)
        farthest = sq_dist.topk(min(empty.numel(), x.shape[0])).indices
        updated[empty] = x[farthest[torch.arange(empty.numel(), device=x.device) % farthest.numel()]]
    return updated
