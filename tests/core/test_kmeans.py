"""Tests of the k-means used to fit codebooks."""

from __future__ import annotations

import torch

from midx_service.core.draw import search_segments
from midx_service.core.kmeans import assign, kmeans


def test_kmeans_recovers_separated_clusters():
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = (
        centres.repeat_interleave(50, dim=0) + torch.randn(150, 2, generator=torch.Generator().manual_seed(1)) * 0.1
    )

    fitted = kmeans(points, 3, iterations=20, generator=torch.Generator().manual_seed(2))

    nearest = assign(centres, fitted)
    assert sorted(nearest.tolist()) == [0, 1, 2]
    torch.testing.assert_close(fitted[nearest], centres, atol=0.1, rtol=0)


def test_kmeans_more_centroids_than_points():
    points = torch.tensor([[1.0, 2.0], [3.0, 4.0]])

    fitted = kmeans(points, 5, iterations=10, generator=torch.Generator().manual_seed(3))

    assert fitted.shape == (5, 2)
    assert bool(torch.isfinite(fitted).all())
    assert bool((((points[:, None, :] - fitted[None]) ** 2).sum(-1).amin(dim=1) == 0).all())


def test_kmeans_warm_start_keeps_converged_centroids():
    points = torch.tensor([[0.0], [0.2], [10.0], [10.2]])
    init = torch.tensor([[0.1], [10.1]])

    fitted = kmeans(points, 2, iterations=5, generator=torch.Generator().manual_seed(4), init=init)

    torch.testing.assert_close(fitted, init)


def test_search_segments_finds_first_entry_above_target():
    values = torch.tensor([1.0, 1.0, 3.0, 0.5, 2.0, 2.0, 7.0])
    start = torch.tensor([0, 0, 0, 3, 3, 3])
    length = torch.tensor([3, 3, 3, 4, 4, 4])
    target = torch.tensor([0.5, 1.0, 3.0, 0.4, 2.0, 6.9])

    offsets = search_segments(values, start, length, target)

    assert offsets.tolist() == [0, 2, 3, 0, 3, 3]
