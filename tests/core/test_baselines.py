"""Tests of the uniform, unigram and exact softmax proposals served beside MIDX."""

from __future__ import annotations

import math

import pytest
import torch

from midx_service.core import IndexConfig, MidxIndex
from midx_service.core.baselines import ExactSampler
from tests.core.conftest import assert_draws_follow, exact_log_softmax


@pytest.fixture
def index(table, weights) -> MidxIndex:
    return MidxIndex.build(IndexConfig(dim=8, num_codewords=4, unigram_alpha=0.5), table, weights, seed=1)


def unigram_probabilities(weights: torch.Tensor, alpha: float) -> torch.Tensor:
    mass = torch.where(weights > 0, weights.pow(alpha), 0.0)
    return mass / mass.sum()


def test_uniform_log_prob_and_draws(index, queries):
    result = index.sample(queries[:1], 60_000, sampler="uniform", seed=1)

    torch.testing.assert_close(result.log_q, torch.full_like(result.log_q, -math.log(300)))
    assert_draws_follow(result.ids, torch.full((300,), 1 / 300))


def test_unigram_log_prob_and_draws(index, queries, weights):
    expected = unigram_probabilities(weights, 0.5)

    result = index.sample(queries[:1], 100_000, sampler="unigram", seed=2)
    log_q = index.log_prob(queries, torch.arange(300).expand(5, -1), sampler="unigram")

    assert_draws_follow(result.ids, expected)
    torch.testing.assert_close(log_q[0].double(), expected.log(), atol=1e-5, rtol=0)


def test_unigram_without_weights_is_uniform(table, queries):
    index = MidxIndex.build(IndexConfig(dim=8, num_codewords=4), table)

    log_q = index.log_prob(queries, torch.arange(300).expand(5, -1), sampler="unigram")

    torch.testing.assert_close(log_q, torch.full_like(log_q, -math.log(300)))


def test_exact_log_prob_is_softmax(index, table, queries):
    log_q = index.log_prob(queries, torch.arange(300).expand(5, -1), sampler="exact")

    torch.testing.assert_close(log_q.double(), exact_log_softmax(table, queries), atol=1e-5, rtol=0)


@pytest.mark.parametrize("max_chunk_bytes", [8 * 300 * 5, 8 * 37])
def test_exact_draws_follow_softmax_in_blocks(table, queries, max_chunk_bytes):
    """A memory cap smaller than one row of logits forces several column blocks."""
    sampler = ExactSampler(table, max_chunk_bytes=max_chunk_bytes)
    generator = torch.Generator().manual_seed(3)
    query = queries[:1] * 0.5

    result = sampler.sample(query, 100_000, None, False, generator)

    probabilities = exact_log_softmax(table, query)[0].exp()
    assert_draws_follow(result.ids, probabilities)
    torch.testing.assert_close(result.log_q.double(), probabilities.log()[result.ids], atol=1e-5, rtol=0)


@pytest.mark.parametrize("sampler", ["uniform", "unigram", "exact"])
def test_exclusion_renormalises_baselines(index, table, queries, weights, sampler):
    query = queries[:1] * 0.5
    positives = torch.tensor([[5, 9, 5, 200]])
    if sampler == "uniform":
        full = torch.full((300,), 1 / 300, dtype=torch.float64)
    elif sampler == "unigram":
        full = unigram_probabilities(weights, 0.5)
    else:
        full = exact_log_softmax(table, query)[0].exp()

    result = index.sample(query, 100_000, positives=positives, exclude_positives=True, sampler=sampler, seed=5)

    renormalised = full.clone()
    renormalised[positives[0]] = 0.0
    renormalised /= renormalised.sum()
    assert not bool(torch.isin(result.ids, positives).any())
    assert_draws_follow(result.ids, renormalised)
    torch.testing.assert_close(result.log_q.double(), renormalised.log()[result.ids], atol=1e-5, rtol=0)
    assert result.positive_log_q is not None
    torch.testing.assert_close(result.positive_log_q[0].double(), full.log()[positives[0]], atol=1e-5, rtol=0)
