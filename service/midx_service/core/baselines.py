"""Baseline proposals with the same interface as MIDX: uniform, unigram and exact softmax.

Each takes validated tensors: (B, D) float32 queries (already normalised for the cosine metric),
(B, P) int64 positives or None, and a torch.Generator.
"""

from __future__ import annotations

import math

import torch

from midx_service.core.config import SampleResult
from midx_service.core.draw import Exclusions, draw_from_cumsum, draw_in_segments
from midx_service.errors import InvalidArgumentError

# Largest float64 block (in bytes) the exact sampler materialises at once: it never holds a B x N
# matrix beyond this, whatever B and N are.
DEFAULT_EXACT_CHUNK_BYTES = 256 * 2**20


class _SortedPositives:
    """Each query's positives sorted ascending, with a mask of the first copy of each id."""

    def __init__(self, positives: torch.Tensor) -> None:
        self.ids, _ = torch.sort(positives, dim=1)
        self.distinct = torch.ones_like(self.ids, dtype=torch.bool)
        self.distinct[:, 1:] = self.ids[:, 1:] != self.ids[:, :-1]

    def per_draw(self, num_samples: int, weight: torch.Tensor) -> Exclusions:
        """Exclusions for a draw over the whole class range, repeated for each of the M draws."""
        batch, count = self.ids.shape

        def repeat(values: torch.Tensor) -> torch.Tensor:
            return values.unsqueeze(1).expand(batch, num_samples, count).reshape(-1, count)

        return Exclusions(position=repeat(self.ids), active=repeat(self.distinct), weight=repeat(weight))


class UniformSampler:
    """Q(i) = 1 / N for every class, whatever the query."""

    def __init__(self, num_classes: int, device: torch.device) -> None:
        self.num_classes = num_classes
        self.device = device

    def sample(
        self,
        queries: torch.Tensor,
        num_samples: int,
        positives: torch.Tensor | None,
        exclude: bool,
        generator: torch.Generator,
    ) -> SampleResult:
        batch = queries.shape[0]
        num_draws = batch * num_samples
        start = torch.zeros(num_draws, dtype=torch.int64, device=self.device)
        length = torch.full_like(start, self.num_classes)
        remaining = torch.full((batch,), float(self.num_classes), dtype=torch.float64, device=self.device)
        exclusions = None
        if exclude and positives is not None:
            sorted_positives = _SortedPositives(positives)
            remaining = remaining - sorted_positives.distinct.sum(dim=1)
            _check_remaining(remaining)
            exclusions = sorted_positives.per_draw(num_samples, sorted_positives.distinct.to(torch.float64))
        ids = draw_in_segments(generator, start, length, exclusions=exclusions).view(batch, num_samples)
        log_q = (-remaining.log()).to(torch.float32).unsqueeze(1).expand(batch, num_samples).contiguous()
        positive_log_q = None if positives is None else self.log_prob(queries, positives)
        return SampleResult(ids=ids, log_q=log_q, positive_log_q=positive_log_q)

    def log_prob(self, queries: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return torch.full(ids.shape, -math.log(self.num_classes), dtype=torch.float32, device=self.device)


class UnigramSampler:
    """Q(i) proportional to weight_i ** alpha, whatever the query; uniform when the table has no weights."""

    def __init__(self, weights: torch.Tensor | None, num_classes: int, alpha: float, device: torch.device) -> None:
        if weights is None:
            mass = torch.ones(num_classes, dtype=torch.float64, device=device)
        else:
            mass = torch.where(weights > 0, weights.pow(alpha), 0.0)
        self.mass = mass
        self.prefix = torch.cumsum(mass, 0)
        self.total = float(self.prefix[-1])
        if not self.total > 0.0:
            raise InvalidArgumentError("the unigram sampler needs at least one class with a positive weight")
        self.last_positive = int((mass > 0).nonzero().max())
        self.log_q = torch.where(mass > 0, (mass / self.total).log(), -torch.inf).to(torch.float32)
        self.device = device

    def sample(
        self,
        queries: torch.Tensor,
        num_samples: int,
        positives: torch.Tensor | None,
        exclude: bool,
        generator: torch.Generator,
    ) -> SampleResult:
        batch = queries.shape[0]
        num_draws = batch * num_samples
        start = torch.zeros(num_draws, dtype=torch.int64, device=self.device)
        remaining = torch.full((batch,), self.total, dtype=torch.float64, device=self.device)
        exclusions = None
        if exclude and positives is not None:
            sorted_positives = _SortedPositives(positives)
            weight = torch.where(sorted_positives.distinct, self.mass[sorted_positives.ids], 0.0)
            remaining = remaining - weight.sum(dim=1)
            drawable_left = (self.mass > 0).sum() - ((weight > 0) & sorted_positives.distinct).sum(dim=1)
            _check_remaining(drawable_left.to(torch.float64))
            exclusions = sorted_positives.per_draw(num_samples, weight)
        positions = draw_in_segments(
            generator,
            start,
            torch.full_like(start, self.mass.shape[0]),
            prefix=self.prefix,
            mass=torch.full(start.shape, self.total, dtype=torch.float64, device=self.device),
            last_positive=torch.full_like(start, self.last_positive),
            exclusions=exclusions,
        )
        ids = positions.view(batch, num_samples)
        # Renormalise over the classes left after exclusion: log Q' = log Q - log(remaining / total).
        correction = (remaining / self.total).log().to(torch.float32)
        log_q = self.log_q[ids] - correction.unsqueeze(1)
        positive_log_q = None if positives is None else self.log_prob(queries, positives)
        return SampleResult(ids=ids, log_q=log_q, positive_log_q=positive_log_q)

    def log_prob(self, queries: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.log_q[ids]


class ExactSampler:
    """Q = the exact softmax over all N classes: O(N D) per query, for evaluation and small N.

    Logits are computed in blocks of rows and columns of at most `max_chunk_bytes` of float64, and
    draws go through a per-block inverse CDF, so N may exceed torch.multinomial's 2**24 limit.
    """

    def __init__(self, table: torch.Tensor, max_chunk_bytes: int = DEFAULT_EXACT_CHUNK_BYTES) -> None:
        self.table = table
        elements = max(1, max_chunk_bytes // 8)
        self.column_block = min(table.shape[0], elements)
        self.row_block = max(1, elements // self.column_block)

    def log_prob(self, queries: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        log_z = torch.cat(
            [
                torch.logsumexp(self._block_log_normalisers(queries[start : start + self.row_block], None), dim=1)
                for start in range(0, queries.shape[0], self.row_block)
            ]
        )
        return self._logits_of(queries, ids) - log_z.unsqueeze(1)

    def sample(
        self,
        queries: torch.Tensor,
        num_samples: int,
        positives: torch.Tensor | None,
        exclude: bool,
        generator: torch.Generator,
    ) -> SampleResult:
        excluded = _SortedPositives(positives) if exclude and positives is not None else None
        id_blocks, log_z_blocks = [], []
        for start in range(0, queries.shape[0], self.row_block):
            rows = slice(start, start + self.row_block)
            block_excluded = None if excluded is None else (excluded.ids[rows], excluded.distinct[rows])
            ids, log_z = self._sample_rows(queries[rows], num_samples, block_excluded, generator, start)
            id_blocks.append(ids)
            log_z_blocks.append(log_z)
        ids = torch.cat(id_blocks)
        log_z = torch.cat(log_z_blocks)
        log_q = self._logits_of(queries, ids) - log_z.unsqueeze(1)
        positive_log_q = None
        if positives is not None:
            positive_logits = self._logits_of(queries, positives)
            log_z_full = log_z
            if excluded is not None:
                distinct_logits = self._logits_of(queries, excluded.ids).masked_fill(~excluded.distinct, -torch.inf)
                log_z_full = torch.logaddexp(log_z, torch.logsumexp(distinct_logits, dim=1))
            positive_log_q = positive_logits - log_z_full.unsqueeze(1)
        return SampleResult(ids=ids, log_q=log_q, positive_log_q=positive_log_q)

    def _sample_rows(
        self,
        queries: torch.Tensor,
        num_samples: int,
        excluded: tuple[torch.Tensor, torch.Tensor] | None,
        generator: torch.Generator,
        first_row: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch = queries.shape[0]
        block_log_z = self._block_log_normalisers(queries, excluded)  # (b, number of column blocks)
        log_z = torch.logsumexp(block_log_z, dim=1)
        empty = torch.isneginf(log_z)
        if bool(empty.any()):
            query = first_row + int(empty.nonzero()[0, 0])
            raise InvalidArgumentError(f"query {query}: excluding its positives leaves no class that can be drawn")

        # Pick a column block per draw, then a class inside it from that block's own CDF.
        block_cumsum = torch.cumsum(torch.exp(block_log_z.double() - log_z.double().unsqueeze(1)), dim=1)
        block = draw_from_cumsum(block_cumsum, num_samples, generator)
        ids = torch.zeros(batch, num_samples, dtype=torch.int64, device=queries.device)
        for index, column_start in enumerate(range(0, self.table.shape[0], self.column_block)):
            chosen = block == index
            if not bool(chosen.any()):
                continue
            logits = self._block_logits(queries, column_start, excluded).double()
            shift = block_log_z[:, index].double()
            shift = torch.where(torch.isfinite(shift), shift, 0.0).unsqueeze(1)
            cumsum = torch.cumsum(torch.exp(logits - shift), dim=1)
            offsets = draw_from_cumsum(cumsum, num_samples, generator)
            ids = torch.where(chosen, column_start + offsets, ids)
        return ids, log_z

    def _block_log_normalisers(
        self, queries: torch.Tensor, excluded: tuple[torch.Tensor, torch.Tensor] | None
    ) -> torch.Tensor:
        return torch.stack(
            [
                torch.logsumexp(self._block_logits(queries, column_start, excluded), dim=1)
                for column_start in range(0, self.table.shape[0], self.column_block)
            ],
            dim=1,
        )

    def _block_logits(
        self, queries: torch.Tensor, column_start: int, excluded: tuple[torch.Tensor, torch.Tensor] | None
    ) -> torch.Tensor:
        columns = self.table[column_start : column_start + self.column_block]
        logits = queries @ columns.T
        if excluded is not None:
            ids, distinct = excluded
            inside = distinct & (ids >= column_start) & (ids < column_start + columns.shape[0])
            rows = torch.arange(ids.shape[0], device=ids.device).unsqueeze(1).expand_as(ids)
            logits[rows[inside], ids[inside] - column_start] = -torch.inf
        return logits

    def _logits_of(self, queries: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bd,bpd->bp", queries, self.table[ids])


def _check_remaining(remaining: torch.Tensor) -> None:
    empty = remaining <= 0
    if bool(empty.any()):
        query = int(empty.nonzero()[0, 0])
        raise InvalidArgumentError(f"query {query}: excluding its positives leaves no class that can be drawn")
