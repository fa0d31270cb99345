"""Shared helpers for the index core tests: brute-force proposals and a goodness-of-fit check."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from midx_service.core import MidxIndex


def brute_force_log_q(index: MidxIndex, queries: torch.Tensor) -> torch.Tensor:
    """Return (B, N) float64 log Q(i | z) of the MIDX proposal, summed over every class directly."""
    queries = queries.double()
    if index.config.metric == "cosine":
        norms = queries.norm(dim=1, keepdim=True)
        queries = queries / torch.where(norms > 0, norms, 1.0)
    first = index.codebooks.first.double()
    second = index.codebooks.second.double()
    if index.config.quantizer == "rq":
        q1, q2 = queries, queries
    else:
        split = first.shape[1]
        q1, q2 = queries[:, :split], queries[:, split:]
    codes = index.codes
    logits = (q1 @ first.T)[:, codes[:, 0]] + (q2 @ second.T)[:, codes[:, 1]]
    if index.config.last_stage == "popularity":
        weights = index.weights.double()
        logits = logits + torch.where(weights > 0, weights.log(), -torch.inf)
    return logits - torch.logsumexp(logits, dim=1, keepdim=True)


def exact_log_softmax(table: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    logits = queries.double() @ table.double().T
    return logits - torch.logsumexp(logits, dim=1, keepdim=True)


def assert_draws_follow(ids: torch.Tensor, probabilities: torch.Tensor, significance: float = 1e-3) -> None:
    """Chi-square goodness of fit of the drawn ids (any shape) against (N,) probabilities.

    Classes with an expected count below 5 are pooled into one bin, as the test's approximation
    requires. Fails when the statistic exceeds the chi-square quantile at 1 - significance.
    """
    counts = np.bincount(ids.reshape(-1).numpy(), minlength=probabilities.shape[0]).astype(np.float64)
    expected = probabilities.double().numpy() * counts.sum()
    assert counts[expected == 0].sum() == 0, "a class of probability 0 was drawn"
    large = expected >= 5
    observed_bins = np.append(counts[large], counts[~large].sum())
    expected_bins = np.append(expected[large], expected[~large].sum())
    keep = expected_bins > 0
    statistic = float((((observed_bins - expected_bins) ** 2)[keep] / expected_bins[keep]).sum())
    degrees = int(keep.sum()) - 1
    limit = float(stats.chi2.ppf(1 - significance, degrees))
    assert statistic < limit, f"chi-square {statistic:.1f} over {degrees} degrees of freedom exceeds {limit:.1f}"


@pytest.fixture
def table() -> torch.Tensor:
    generator = torch.Generator().manual_seed(7)
    return torch.randn(300, 8, generator=generator)


@pytest.fixture
def queries() -> torch.Tensor:
    generator = torch.Generator().manual_seed(11)
    return torch.randn(5, 8, generator=generator)


@pytest.fixture
def weights() -> torch.Tensor:
    generator = torch.Generator().manual_seed(13)
    values = torch.rand(300, generator=generator, dtype=torch.float64) * 5
    values[::7] = 0.0
    return values
