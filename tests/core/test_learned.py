"""Tests of the KL-learned codebooks and of the proposal-quality telemetry."""

from __future__ import annotations

import pytest
import torch

from midx_service.core import IndexConfig, MidxIndex
from midx_service.core.learned import code_marginals, fit_kl_codebooks, kl_objective
from midx_service.core.quantizer import Codebooks
from midx_service.core.telemetry import measure_quality
from tests.core.conftest import brute_force_log_q, exact_log_softmax


def brute_force_kl(index: MidxIndex, queries: torch.Tensor) -> torch.Tensor:
    log_p = exact_log_softmax(index.embeddings, queries)
    log_q = brute_force_log_q(index, queries)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)


def clustered_table(seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(6, 6, generator=generator) * 2
    return centres.repeat_interleave(40, dim=0) + torch.randn(240, 6, generator=generator)


@pytest.mark.parametrize(("quantizer", "last_stage"), [("rq", "uniform"), ("pq", "popularity")])
def test_kl_objective_matches_brute_force(quantizer, last_stage, weights):
    table = torch.randn(120, 6, generator=torch.Generator().manual_seed(1))
    index = MidxIndex.build(
        IndexConfig(dim=6, num_codewords=4, quantizer=quantizer, last_stage=last_stage), table, weights[:120] + 0.1
    )
    queries = torch.randn(7, 6, generator=torch.Generator().manual_seed(2))

    objective = kl_objective(index, index.codebooks, queries, code_marginals(index, queries, index.codes))

    torch.testing.assert_close(objective, brute_force_kl(index, queries), atol=1e-6, rtol=1e-6)


def test_kl_objective_gradient_matches_finite_differences():
    table = torch.randn(40, 4, generator=torch.Generator().manual_seed(3))
    index = MidxIndex.build(IndexConfig(dim=4, num_codewords=3), table)
    queries = torch.randn(5, 4, generator=torch.Generator().manual_seed(4)).double()
    targets = code_marginals(index, queries.float(), index.codes)
    first = index.codebooks.first.double().requires_grad_(True)
    second = index.codebooks.second.double().requires_grad_(True)

    def objective(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        return kl_objective(index, Codebooks("rq", first, second), queries, targets).mean()

    assert torch.autograd.gradcheck(objective, (first, second), eps=1e-6, atol=1e-5)


def test_learned_refit_lowers_heldout_kl():
    table = clustered_table(5)
    index = MidxIndex.build(IndexConfig(dim=6, num_codewords=3), table, seed=1)
    queries = torch.randn(200, 6, generator=torch.Generator().manual_seed(6))
    fresh = torch.randn(200, 6, generator=torch.Generator().manual_seed(7))

    learned, report = fit_kl_codebooks(index, queries, time_budget_seconds=20)

    assert report.accepted
    assert report.heldout_kl_after < report.heldout_kl_before
    assert learned.codebook_fit == "kl"
    assert float(brute_force_kl(learned, fresh).mean()) < float(brute_force_kl(index, fresh).mean())
    # Codes, cells and log Q of the learned index stay consistent with its own closed form.
    result = learned.sample(fresh[:3], 20, seed=1)
    torch.testing.assert_close(
        result.log_q.double(), brute_force_log_q(learned, fresh[:3]).gather(1, result.ids), atol=1e-5, rtol=0
    )


def test_learned_refit_never_reports_a_higher_kl():
    table = torch.randn(60, 4, generator=torch.Generator().manual_seed(8))
    index = MidxIndex.build(IndexConfig(dim=4, num_codewords=2), table)
    # Queries near zero make P nearly uniform: there is little to gain, and nothing may be lost.
    queries = torch.randn(40, 4, generator=torch.Generator().manual_seed(9)) * 1e-3

    learned, report = fit_kl_codebooks(index, queries, max_steps=40, time_budget_seconds=10)

    assert report.heldout_kl_after <= report.heldout_kl_before
    if not report.accepted:
        assert learned is index


def test_learned_refit_rejects_too_few_queries(table):
    index = MidxIndex.build(IndexConfig(dim=8, num_codewords=2), table)

    with pytest.raises(ValueError, match="at least 8 queries"):
        fit_kl_codebooks(index, torch.zeros(3, 8))


def test_telemetry_matches_exact_computation(table, queries):
    index = MidxIndex.build(IndexConfig(dim=8, num_codewords=5), table)

    quality = measure_quality(index, queries)

    log_p = exact_log_softmax(table, queries)
    log_q = brute_force_log_q(index, queries)
    expected_kl = float((log_p.exp() * (log_p - log_q)).sum(dim=1).mean())
    expected_fraction = float((1 / torch.exp(2 * log_p - log_q).sum(dim=1)).mean())
    assert quality.kl == pytest.approx(expected_kl, rel=1e-5)
    assert quality.effective_sample_fraction == pytest.approx(expected_fraction, rel=1e-5)
    assert 0 < quality.effective_sample_fraction <= 1
    assert quality.num_queries == 5
    assert quality.empty_cell_fraction == pytest.approx(float((index.cells.count == 0).double().mean()))
    assert quality.largest_cell_fraction == pytest.approx(int(index.cells.count.max()) / 300)
    assert quality.quantization_error_ratio == pytest.approx(1.0)


def test_telemetry_tracks_drift_after_updates(table):
    index = MidxIndex.build(IndexConfig(dim=8, num_codewords=4), table)
    shifted = index.update_rows(torch.arange(300), table + 2.0)

    before, after = measure_quality(index), measure_quality(shifted)

    assert before.kl is None
    assert after.quantization_error_ratio > 1.1
    assert after.codeword_drift > before.codeword_drift + 0.1
