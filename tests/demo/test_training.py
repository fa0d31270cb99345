"""Tests of one training run: the batch schedule, the evaluator and the two kinds of step."""

from __future__ import annotations

import copy
import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from midx_service.core import IndexConfig
from midx_service.data.corpus import Split
from midx_service.demo.model import NextWordModel
from midx_service.demo.sources import InProcessNegativeSource
from midx_service.demo.training import Batches, Evaluator, Trainer, TrainingConfig, _RunState

NUM_CLASSES = 200
DIM = 8


def _split(num_tokens: int, seed: int) -> Split:
    tokens = np.random.default_rng(seed).integers(0, NUM_CLASSES, size=num_tokens)
    return Split(tokens=tokens.astype(np.int64), document_starts=np.array([0, num_tokens // 2], dtype=np.int64))


def _trainer(config: TrainingConfig) -> Trainer:
    table = np.random.default_rng(0).standard_normal((NUM_CLASSES, DIM)).astype(np.float32)
    batches = Batches(_split(2000, 1), config.context, config.batch_size, config.steps, config.seed)
    evaluator = Evaluator(_split(400, 2), config.context, config.eval_tokens, config.seed + 1)
    trainer = Trainer(config, table, batches, evaluator, initial_perplexity=0.0)
    trainer.initial_perplexity = evaluator.perplexity(trainer.new_model(), torch.from_numpy(table))
    return trainer


def test_batches_respect_document_starts() -> None:
    split = _split(100, 0)

    batches = Batches(split, context=3, batch_size=8, steps=5, seed=0)
    contexts, targets = batches.get(4)

    assert len(batches) == 5
    assert contexts.shape == (8, 3)
    assert targets.shape == (8,)
    positions = batches.positions[4]
    assert not np.any((positions >= 50) & (positions < 53))
    assert not np.any(positions < 3)
    np.testing.assert_array_equal(targets.numpy(), split.tokens[positions])
    np.testing.assert_array_equal(contexts[:, -1].numpy(), split.tokens[positions - 1])


def test_evaluator_matches_cross_entropy() -> None:
    split = _split(300, 0)
    evaluator = Evaluator(split, context=2, num_tokens=50, seed=0, chunk_size=16)
    torch.manual_seed(0)
    model = NextWordModel(torch.randn(NUM_CLASSES, DIM), context=2, hidden=4)
    table = torch.randn(NUM_CLASSES, DIM)

    perplexity = evaluator.perplexity(model, table)

    with torch.no_grad():
        expected = math.exp(float(F.cross_entropy(model(evaluator.contexts) @ table.T, evaluator.targets)))
    assert evaluator.num_tokens == 50
    assert perplexity == pytest.approx(expected, rel=1e-5)


def test_full_softmax_step_matches_autograd() -> None:
    torch.manual_seed(0)
    table = torch.randn(NUM_CLASSES, DIM)
    config = TrainingConfig(learning_rate=0.0, table_learning_rate=0.1, context=4, hidden=16)
    model = NextWordModel(torch.randn(NUM_CLASSES, DIM), context=4, hidden=16)
    reference_model = copy.deepcopy(model)
    state = _RunState("full", table.clone(), model, config)
    contexts = torch.randint(0, NUM_CLASSES, (8, 4))
    targets = torch.randint(0, NUM_CLASSES, (8,))

    loss = state.full_softmax_step(contexts, targets)

    reference_table = table.clone().requires_grad_(True)
    reference = F.cross_entropy(reference_model(contexts) @ reference_table.T, targets)
    reference.backward()
    assert reference_table.grad is not None
    assert loss == pytest.approx(float(reference.detach()), rel=1e-5)
    # After one Adagrad step the squared-gradient sum is the table gradient squared.
    torch.testing.assert_close(state.table_optimizer.square_sum, reference_table.grad.square(), rtol=1e-4, atol=1e-9)
    for parameter, reference_parameter in zip(
        model.encoder.parameters(), reference_model.encoder.parameters(), strict=True
    ):
        assert parameter.grad is not None
        torch.testing.assert_close(parameter.grad, reference_parameter.grad, rtol=1e-4, atol=1e-6)


def test_runs_start_from_same_model() -> None:
    trainer = _trainer(TrainingConfig(steps=2, batch_size=8, eval_tokens=32, hidden=8))

    first = trainer.new_model()
    second = trainer.new_model()

    for left, right in zip(first.parameters(), second.parameters(), strict=True):
        torch.testing.assert_close(left, right)


@pytest.mark.parametrize("sampler", ["full", "uniform", "unigram", "midx-rq", "midx-rq-kl"])
def test_run_lowers_perplexity(sampler: str) -> None:
    config = TrainingConfig(steps=30, batch_size=32, num_samples=20, eval_every=10, eval_tokens=64, hidden=16)
    trainer = _trainer(config)
    source = None if sampler == "full" else InProcessNegativeSource(IndexConfig(dim=DIM, num_codewords=4))
    weights = 1.0 / np.arange(1, NUM_CLASSES + 1)

    result = trainer.run(sampler, source, weights)

    assert result.sampler == sampler
    assert [point.step for point in result.curve] == [0, 10, 20, 30]
    assert result.curve[0].perplexity == trainer.initial_perplexity
    assert result.perplexity < trainer.initial_perplexity
    assert result.seconds > 0
    assert result.seconds_per_step == pytest.approx(result.seconds / 30)
    if sampler == "full":
        assert result.service_seconds == 0.0
    else:
        assert 0.0 < result.service_seconds < result.seconds


def test_sampled_run_pushes_changed_rows() -> None:
    config = TrainingConfig(steps=6, batch_size=8, num_samples=5, push_every=3, eval_every=6, eval_tokens=32)
    trainer = _trainer(config)
    source = InProcessNegativeSource(IndexConfig(dim=DIM, num_codewords=4))

    trainer.run("midx-rq", source, None)

    # Version 1 is the upload; steps 3 and 6 each push once.
    assert source.version == 3
    assert source.index is not None
    assert not np.allclose(source.index.embeddings.numpy(), trainer.glove)


def test_kl_run_refits_codebooks() -> None:
    config = TrainingConfig(steps=30, batch_size=32, num_samples=20, eval_every=30, eval_tokens=32, kl_refit_every=10)
    trainer = _trainer(config)
    source = InProcessNegativeSource(IndexConfig(dim=DIM, num_codewords=4), max_recent_queries=64)

    result = trainer.run("midx-rq-kl", source, None)

    # A refit after steps 10 and 20; none after the last step, where it could no longer help.
    assert [point.step for point in result.refits] == [10, 20]
    for point in result.refits:
        assert point.outcome.heldout_kl_after <= point.outcome.heldout_kl_before
    assert any(point.outcome.accepted for point in result.refits)
    assert source.index is not None
    assert source.index.codebook_fit == "kl"
    assert 0.0 < result.refit_seconds < result.service_seconds


def test_kmeans_run_never_refits() -> None:
    config = TrainingConfig(steps=20, batch_size=8, num_samples=5, eval_every=20, eval_tokens=32, kl_refit_every=5)
    trainer = _trainer(config)
    source = InProcessNegativeSource(IndexConfig(dim=DIM, num_codewords=4))

    result = trainer.run("midx-rq", source, None)

    assert result.refits == []
    assert source.index is not None
    assert source.index.codebook_fit == "kmeans"


def test_in_process_source_keeps_recent_queries() -> None:
    source = InProcessNegativeSource(IndexConfig(dim=DIM, num_codewords=4), max_recent_queries=20)
    source.upload(np.random.default_rng(0).standard_normal((NUM_CLASSES, DIM)).astype(np.float32), None)
    batches = [torch.full((8, DIM), float(value)) for value in range(4)]

    for batch in batches:
        source.sample("midx", batch, torch.zeros(8, 1, dtype=torch.long), 3, min_version=0, seed=0)

    torch.testing.assert_close(source.recent_queries(), torch.cat(batches)[-20:])


def test_run_rejects_unknown_sampler() -> None:
    trainer = _trainer(TrainingConfig(steps=1, batch_size=4, eval_tokens=8))

    with pytest.raises(ValueError, match="sampler must be one of"):
        trainer.run("exact")


def test_run_logs_progress(caplog: pytest.LogCaptureFixture) -> None:
    trainer = _trainer(TrainingConfig(steps=20, batch_size=8, eval_every=10, eval_tokens=32, hidden=8))

    with caplog.at_level(logging.INFO, logger="midx_service.demo.training"):
        trainer.run("full")

    lines = [record.getMessage() for record in caplog.records if record.getMessage().startswith("full: step")]
    assert len(lines) == 10
    assert lines[0].startswith("full: step 2/20")
    assert "held-out perplexity" in lines[4]
    assert "held-out perplexity" not in lines[0]
