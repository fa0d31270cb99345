"""Tests of the sampled softmax loss against the full softmax and against hand-computed values."""

from __future__ import annotations

import math
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from midx_client import sampled_softmax_loss, sampled_softmax_loss_from_logits
from midx_service.core import IndexConfig, MidxIndex

NUM_CLASSES = 50
DIM = 8
BATCH = 4


@dataclass
class Sample:
    ids: object
    log_q: object
    positive_log_q: object = None


def _problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    table = torch.randn(NUM_CLASSES, DIM, generator=generator)
    queries = torch.randn(BATCH, DIM, generator=generator)
    positives = torch.randint(0, NUM_CLASSES, (BATCH,), generator=generator)
    return table, queries, positives


def _full_softmax(table: torch.Tensor, queries: torch.Tensor, positives: torch.Tensor) -> tuple:
    table = table.clone().requires_grad_(True)
    queries = queries.clone().requires_grad_(True)
    loss = F.cross_entropy(queries @ table.T, positives)
    loss.backward()
    return loss.detach(), queries.grad, table.grad


def _sampled_softmax(
    table: torch.Tensor, queries: torch.Tensor, positives: torch.Tensor, sample: object, **options: object
) -> tuple:
    table = table.clone().requires_grad_(True)
    queries = queries.clone().requires_grad_(True)
    loss = sampled_softmax_loss(queries, table[positives], table[sample.ids], positives, sample, **options)
    loss.backward()
    return loss.detach(), queries.grad, table.grad


def _exact_sample(table: torch.Tensor, queries: torch.Tensor, positives: torch.Tensor, num_samples: int):
    index = MidxIndex.build(IndexConfig(dim=DIM, num_codewords=4), table)
    return index.sample(queries, num_samples, positives=positives.unsqueeze(1), sampler="exact", seed=1)


def _relative_error(estimate: torch.Tensor, reference: torch.Tensor) -> float:
    return float((estimate - reference).norm() / reference.norm())


def test_uncorrected_positive_matches_full_softmax() -> None:
    table, queries, positives = _problem()
    sample = _exact_sample(table, queries, positives, num_samples=50_000)

    full_loss, full_query_grad, full_table_grad = _full_softmax(table, queries, positives)
    loss, query_grad, table_grad = _sampled_softmax(table, queries, positives, sample, correct_positive=False)

    assert float(loss) == pytest.approx(float(full_loss), rel=0.01)
    assert _relative_error(query_grad, full_query_grad) < 0.03
    assert _relative_error(table_grad, full_table_grad) < 0.03


def test_corrected_positive_gradient_matches_full() -> None:
    table, queries, positives = _problem(seed=1)
    num_samples = 50_000
    sample = _exact_sample(table, queries, positives, num_samples)

    _, full_query_grad, full_table_grad = _full_softmax(table, queries, positives)
    loss, query_grad, table_grad = _sampled_softmax(table, queries, positives, sample, remove_accidental_hits=False)

    # With Q equal to the softmax every corrected logit is log Z - log M, so the value is constant.
    assert float(loss) == pytest.approx(math.log(num_samples + 1), rel=1e-4)
    assert _relative_error(query_grad, full_query_grad) < 0.03
    assert _relative_error(table_grad, full_table_grad) < 0.03


def test_flipped_correction_sign_misses_full_softmax() -> None:
    # The same estimate with +log(M Q) in place of -log(M Q) lands far outside the tolerances that
    # the tests above hold the correct sign to.
    table, queries, positives = _problem()
    num_samples = 50_000
    sample = _exact_sample(table, queries, positives, num_samples)
    flipped = Sample(ids=sample.ids, log_q=-sample.log_q - 2 * math.log(num_samples))

    full_loss, full_query_grad, _ = _full_softmax(table, queries, positives)
    loss, query_grad, _ = _sampled_softmax(table, queries, positives, flipped, correct_positive=False)

    assert abs(float(loss) - float(full_loss)) > 0.5
    assert _relative_error(query_grad, full_query_grad) > 0.1


def test_loss_matches_hand_computed_value() -> None:
    positive_logit = torch.tensor([1.0])
    negative_logits = torch.tensor([[0.5, 2.0]])
    sample = Sample(
        ids=torch.tensor([[3, 4]]),
        log_q=torch.log(torch.tensor([[0.5, 0.1]])),
        positive_log_q=torch.log(torch.tensor([[0.2]])),
    )

    corrected = sampled_softmax_loss_from_logits(positive_logit, negative_logits, [7], sample)
    uncorrected = sampled_softmax_loss_from_logits(positive_logit, negative_logits, [7], sample, correct_positive=False)

    # M = 2: each logit minus log(2 Q).
    positive = 1.0 - math.log(2 * 0.2)
    negatives = [0.5 - math.log(2 * 0.5), 2.0 - math.log(2 * 0.1)]
    expected = math.log(sum(math.exp(x) for x in [positive, *negatives])) - positive
    assert float(corrected) == pytest.approx(expected, rel=1e-6)
    expected_uncorrected = math.log(sum(math.exp(x) for x in [1.0, *negatives])) - 1.0
    assert float(uncorrected) == pytest.approx(expected_uncorrected, rel=1e-6)


def test_loss_falls_as_negative_log_q_rises() -> None:
    # A negative the proposal favours is down-weighted: raising its Q must lower the loss.
    positive_logit = torch.tensor([0.0])
    negative_logits = torch.tensor([[1.0, 1.0]])
    low = Sample(ids=[[1, 2]], log_q=[[-5.0, -5.0]], positive_log_q=[[-5.0]])
    high = Sample(ids=[[1, 2]], log_q=[[-1.0, -5.0]], positive_log_q=[[-5.0]])

    loss_low = sampled_softmax_loss_from_logits(positive_logit, negative_logits, [0], low)
    loss_high = sampled_softmax_loss_from_logits(positive_logit, negative_logits, [0], high)

    assert float(loss_high) < float(loss_low)


def test_accidental_hit_is_masked() -> None:
    positive_logit = torch.tensor([0.5])
    negative_logits = torch.tensor([[0.2, 3.0, -1.0]], requires_grad=True)
    sample = Sample(ids=[[4, 7, 9]], log_q=[[-2.0, -2.0, -2.0]], positive_log_q=[[-2.0]])

    masked = sampled_softmax_loss_from_logits(positive_logit, negative_logits, [7], sample)
    masked.backward()
    unmasked = sampled_softmax_loss_from_logits(
        positive_logit, negative_logits, [7], sample, remove_accidental_hits=False
    )

    log_m = math.log(3)
    positive = 0.5 + 2.0 - log_m
    kept = [0.2 + 2.0 - log_m, -1.0 + 2.0 - log_m]
    expected = math.log(sum(math.exp(x) for x in [positive, *kept])) - positive
    assert float(masked.detach()) == pytest.approx(expected, rel=1e-6)
    assert float(unmasked.detach()) > float(masked.detach()) + 1.0
    assert negative_logits.grad is not None
    assert float(negative_logits.grad[0, 1]) == 0.0


def test_all_negatives_hits_gives_zero_loss() -> None:
    positive_logit = torch.tensor([0.5], requires_grad=True)
    negative_logits = torch.tensor([[1.0, 2.0]], requires_grad=True)
    sample = Sample(ids=[[3, 3]], log_q=[[-1.0, -1.0]], positive_log_q=[[-1.0]])

    loss = sampled_softmax_loss_from_logits(positive_logit, negative_logits, [3], sample)
    loss.backward()

    assert float(loss.detach()) == 0.0
    assert positive_logit.grad is not None and negative_logits.grad is not None
    assert bool(torch.isfinite(positive_logit.grad).all())
    assert bool(torch.isfinite(negative_logits.grad).all())


def test_never_drawn_positive_is_left_uncorrected() -> None:
    positive_logits = torch.tensor([0.5, 0.5], requires_grad=True)
    negative_logits = torch.tensor([[1.0, 2.0], [1.0, 2.0]])
    sample = Sample(ids=[[1, 2], [1, 2]], log_q=[[-1.0, -1.5], [-1.0, -1.5]], positive_log_q=[[-math.inf], [-3.0]])

    terms = sampled_softmax_loss_from_logits(positive_logits, negative_logits, [0, 0], sample, reduction="none")
    terms.sum().backward()
    uncorrected = sampled_softmax_loss_from_logits(
        positive_logits, negative_logits, [0, 0], sample, correct_positive=False, reduction="none"
    )

    assert bool(torch.isfinite(terms).all())
    assert positive_logits.grad is not None
    assert bool(torch.isfinite(positive_logits.grad).all())
    terms = terms.detach()
    uncorrected = uncorrected.detach()
    assert float(terms[0]) == pytest.approx(float(uncorrected[0]), rel=1e-6)
    assert float(terms[1]) != pytest.approx(float(uncorrected[1]), rel=1e-3)


def test_zero_weight_positive_gives_finite_loss() -> None:
    table, queries, _ = _problem()
    weights = torch.ones(NUM_CLASSES, dtype=torch.float64)
    weights[0] = 0.0
    index = MidxIndex.build(IndexConfig(dim=DIM, num_codewords=4, last_stage="popularity"), table, weights)
    positives = torch.zeros(BATCH, dtype=torch.int64)
    sample = index.sample(queries, 20, positives=positives.unsqueeze(1), seed=0)

    loss, query_grad, table_grad = _sampled_softmax(table, queries, positives, sample)

    assert bool(torch.isneginf(sample.positive_log_q).all())
    assert math.isfinite(float(loss))
    assert bool(torch.isfinite(query_grad).all())
    assert bool(torch.isfinite(table_grad).all())


def test_several_positives_one_term_each() -> None:
    generator = torch.Generator().manual_seed(3)
    positive_logits = torch.randn(2, 3, generator=generator)
    negative_logits = torch.randn(2, 4, generator=generator)
    positives = torch.tensor([[1, 2, 3], [4, 5, 6]])
    negatives = torch.tensor([[2, 8, 9, 10], [11, 12, 6, 4]])
    log_q = -torch.rand(2, 4, generator=generator) - 1.0
    positive_log_q = -torch.rand(2, 3, generator=generator) - 1.0
    sample = Sample(ids=negatives, log_q=log_q, positive_log_q=positive_log_q)

    loss = sampled_softmax_loss_from_logits(positive_logits, negative_logits, positives, sample)
    terms = sampled_softmax_loss_from_logits(positive_logits, negative_logits, positives, sample, reduction="none")

    log_m = math.log(4)
    expected = torch.empty(2, 3)
    for b in range(2):
        kept = [
            float(negative_logits[b, j] - log_q[b, j] - log_m)
            for j in range(4)
            if int(negatives[b, j]) not in positives[b].tolist()
        ]
        for p in range(3):
            positive = float(positive_logits[b, p] - positive_log_q[b, p] - log_m)
            expected[b, p] = math.log(sum(math.exp(x) for x in [positive, *kept])) - positive
    assert terms.shape == (2, 3)
    torch.testing.assert_close(terms, expected, rtol=1e-5, atol=1e-6)
    assert float(loss) == pytest.approx(float(expected.mean()), rel=1e-5)


def test_embedding_form_matches_logit_form() -> None:
    table, queries, positives = _problem()
    sample = _exact_sample(table, queries, positives, num_samples=16)

    from_embeddings = sampled_softmax_loss(queries, table[positives], table[sample.ids], positives, sample)
    from_logits = sampled_softmax_loss_from_logits(
        (queries * table[positives]).sum(1),
        torch.einsum("bd,bmd->bm", queries, table[sample.ids]),
        positives,
        sample,
    )

    assert float(from_embeddings) == pytest.approx(float(from_logits), rel=1e-6)


def test_loss_accepts_numpy_sample() -> None:
    sample = Sample(ids=np.array([[1, 2]]), log_q=np.array([[-1.0, -2.0]]), positive_log_q=np.array([[-1.5]]))

    loss = sampled_softmax_loss_from_logits(torch.tensor([0.3]), torch.tensor([[0.1, 0.2]]), np.array([0]), sample)

    assert math.isfinite(float(loss))


def test_correct_positive_requires_positive_log_q() -> None:
    sample = Sample(ids=[[1, 2]], log_q=[[-1.0, -2.0]], positive_log_q=None)

    with pytest.raises(ValueError, match="positive_log_q"):
        sampled_softmax_loss_from_logits(torch.tensor([0.3]), torch.tensor([[0.1, 0.2]]), [0], sample)


def test_loss_rejects_mismatched_log_q_shape() -> None:
    sample = Sample(ids=[[1, 2]], log_q=[[-1.0, -2.0, -3.0]], positive_log_q=[[-1.0]])

    with pytest.raises(ValueError, match=r"sample.log_q must have shape \(1, 2\)"):
        sampled_softmax_loss_from_logits(torch.tensor([0.3]), torch.tensor([[0.1, 0.2]]), [0], sample)


def test_loss_rejects_infinite_negative_log_q() -> None:
    sample = Sample(ids=[[1, 2]], log_q=[[-math.inf, -2.0]], positive_log_q=[[-1.0]])

    with pytest.raises(ValueError, match="non-finite"):
        sampled_softmax_loss_from_logits(torch.tensor([0.3]), torch.tensor([[0.1, 0.2]]), [0], sample)


def test_loss_rejects_unknown_reduction() -> None:
    sample = Sample(ids=[[1, 2]], log_q=[[-1.0, -2.0]], positive_log_q=[[-1.0]])

    with pytest.raises(ValueError, match="reduction"):
        sampled_softmax_loss_from_logits(
            torch.tensor([0.3]),
            torch.tensor([[0.1, 0.2]]),
            [0],
            sample,
            reduction="max",
        )


def test_client_package_imports_without_server_modules() -> None:
    code = (
        "import sys, midx_client.loss\n"
        "server = [m for m in sys.modules if m.split('.')[0] in "
        "('midx_service', 'fastapi', 'uvicorn', 'redis', 'pydantic_settings')]\n"
        "print(server)\n"
        "sys.exit(1 if server else 0)\n"
    )

    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)

    assert result.returncode == 0, result.stdout + result.stderr
