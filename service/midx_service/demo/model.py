"""The next-word model of the main job and the row-wise optimiser of its output table."""

from __future__ import annotations

import torch
from torch import nn


class NextWordModel(nn.Module):
    """Maps the previous `context` words to a query vector that scores every class of the output table.

    The input embeddings are a frozen copy of the GloVe table; a two-layer perceptron turns their
    concatenation into a (B, dim) query. The output table is kept outside the module, because the
    trainer updates only the rows a step touched (see `RowAdagrad`).
    """

    def __init__(self, input_table: torch.Tensor, context: int, hidden: int) -> None:
        super().__init__()
        dim = input_table.shape[1]
        self.context = context
        self.embedding = nn.Embedding.from_pretrained(input_table, freeze=True)
        self.encoder = nn.Sequential(nn.Linear(context * dim, hidden), nn.Tanh(), nn.Linear(hidden, dim))

    def forward(self, contexts: torch.Tensor) -> torch.Tensor:
        """Return the (B, dim) queries for (B, context) int64 word ids."""
        return self.encoder(self.embedding(contexts).flatten(1))


class RowAdagrad:
    """Adagrad on the rows of a table, applied only to the rows a step has gradients for.

    Adagrad leaves a row with zero gradient unchanged, so updating only the touched rows of a sampled
    step is the same as a dense update. That keeps the sampled and the full softmax runs on one
    optimiser while a sampled step costs time in the touched rows only.
    """

    def __init__(self, table: torch.Tensor, learning_rate: float, eps: float = 1e-10) -> None:
        self.table = table
        self.learning_rate = learning_rate
        self.eps = eps
        self.square_sum = torch.zeros_like(table)

    @torch.no_grad()
    def step_rows(self, ids: torch.Tensor, gradients: torch.Tensor) -> None:
        """Update rows `ids` (U,) of distinct int64 ids with their (U, dim) gradients."""
        square_sum = self.square_sum[ids] + gradients.square()
        self.square_sum[ids] = square_sum
        self.table[ids] -= self.learning_rate * gradients / (square_sum.sqrt() + self.eps)

    @torch.no_grad()
    def step_dense(self, gradients: torch.Tensor) -> None:
        """Update every row with the (N, dim) gradient of the whole table."""
        self.square_sum.addcmul_(gradients, gradients)
        self.table.addcdiv_(gradients, self.square_sum.sqrt().add_(self.eps), value=-self.learning_rate)
