"""Tests of the next-word model and the row-wise Adagrad of the output table."""

from __future__ import annotations

import torch

from midx_service.demo.model import NextWordModel, RowAdagrad


def test_model_maps_contexts_to_queries() -> None:
    model = NextWordModel(torch.randn(30, 6), context=3, hidden=8)

    queries = model(torch.randint(0, 30, (5, 3)))

    assert queries.shape == (5, 6)
    assert not model.embedding.weight.requires_grad


def test_row_update_equals_dense_update() -> None:
    generator = torch.Generator().manual_seed(0)
    table = torch.randn(10, 4, generator=generator)
    dense = RowAdagrad(table.clone(), learning_rate=0.1)
    sparse = RowAdagrad(table.clone(), learning_rate=0.1)
    ids = torch.tensor([1, 4, 7])

    for _ in range(3):
        rows = torch.randn(3, 4, generator=generator)
        gradient = torch.zeros(10, 4)
        gradient[ids] = rows
        dense.step_dense(gradient)
        sparse.step_rows(ids, rows)

    torch.testing.assert_close(sparse.table, dense.table)
    untouched = torch.tensor([0, 2, 3, 5, 6, 8, 9])
    torch.testing.assert_close(sparse.table[untouched], table[untouched])
