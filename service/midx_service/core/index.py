"""The MIDX index: an immutable snapshot of one class table with its codebooks, codes and cells.

Every mutation (row update, codebook refit) returns a new `MidxIndex` and leaves the old one intact,
so a reader holding a snapshot always reads one consistent version.
"""

from __future__ import annotations

import logging
import math
import secrets
import threading
import time
from typing import Any

import torch

from midx_service.core.baselines import ExactSampler, UniformSampler, UnigramSampler
from midx_service.core.cells import Cells, build_cells
from midx_service.core.config import SAMPLERS, IndexConfig, SampleResult
from midx_service.core.draw import (
    Exclusions,
    below_one,
    draw_from_cumsum,
    draw_in_segments,
)
from midx_service.core.quantizer import Codebooks, fit_codebooks
from midx_service.core.validation import (
    ArrayLike,
    as_float_matrix,
    as_id_matrix,
    as_id_vector,
    as_weight_vector,
    check_num_samples,
)
from midx_service.errors import InvalidArgumentError

logger = logging.getLogger(__name__)

DEFAULT_KMEANS_ITERATIONS = 25
DEFAULT_MAX_POINTS_PER_CODEWORD = 256

# Elements of the per-block (queries x K x K) float32 workspace: 16M (64 MB) bounds sampling memory
# whatever the batch size, and blocks of queries are sampled one after another.
WORKSPACE_ELEMENTS = 16 * 2**20

# A row mass below this (relative to the query's best codeword) loses precision in float32, so the
# query's row masses are recomputed in log space instead.
_UNDERFLOW_THRESHOLD = 1e-25


class MidxIndex:
    """One class table (N x D) indexed for MIDX sampling, plus the uniform, unigram and exact baselines.

    Build with `MidxIndex.build`. Tensors live on `device`; queries and ids may be numpy arrays or
    tensors on any device. For the cosine metric the stored table is row-normalised.
    """

    def __init__(
        self,
        config: IndexConfig,
        embeddings: torch.Tensor,
        weights: torch.Tensor | None,
        codebooks: Codebooks,
        codes: torch.Tensor,
        row_error: torch.Tensor,
        fit_quantization_error: float,
        codebook_fit: str = "kmeans",
        error_totals: tuple[float, int] | None = None,
        cells: Cells | None = None,
    ) -> None:
        self.config = config
        self.codebook_fit = codebook_fit
        self.device = embeddings.device
        self.embeddings = embeddings
        self.weights = weights
        self.codebooks = codebooks
        self.codes = codes
        self._row_error = row_error
        # (sum of row_error, count) over rows of nonzero norm, kept up to date by row updates in
        # O(rows changed) so quantization_error never rescans the table.
        self._error_totals = _error_totals(row_error, embeddings) if error_totals is None else error_totals
        self.fit_quantization_error = fit_quantization_error
        popularity = config.last_stage == "popularity"
        if cells is None:
            cells = build_cells(codes, config.num_codewords, weights if popularity else None)
        self.cells: Cells = cells
        self._log_weight: torch.Tensor | None = None
        if popularity and weights is not None:
            self._log_weight = torch.where(weights > 0, weights.log(), -torch.inf).to(torch.float32)
        self._baselines: dict[str, Any] = {}

    # ----------------------------------------------------------------------------------- building

    @classmethod
    def build(
        cls,
        config: IndexConfig,
        embeddings: ArrayLike,
        weights: ArrayLike | None = None,
        *,
        device: str | torch.device = "cpu",
        seed: int = 0,
        kmeans_iterations: int = DEFAULT_KMEANS_ITERATIONS,
        max_points_per_codeword: int = DEFAULT_MAX_POINTS_PER_CODEWORD,
    ) -> MidxIndex:
        """Fit both codebooks to the (N, D) table and index every class.

        weights: optional (N,) class weights >= 0, used by the popularity last stage and the unigram
        baseline; required for the popularity last stage. k-means is fitted on a random sample of at
        most K * max_points_per_codeword rows and then assigns every row.
        """
        device = torch.device(device)
        table = as_float_matrix(embeddings, "embeddings", config.dim, device)
        if table.shape[0] == 0:
            raise InvalidArgumentError("embeddings has 0 rows; an index needs at least one class")
        weight_vector = _check_weights(config, weights, table.shape[0], device)
        # The index keeps its own copy, so later changes to the caller's array cannot reach it.
        table = normalise_rows(table) if config.metric == "cosine" else table.clone()

        started = time.perf_counter()
        generator = torch.Generator(device=device).manual_seed(seed)
        codebooks = fit_codebooks(
            table,
            config.num_codewords,
            config.quantizer,
            generator=generator,
            iterations=kmeans_iterations,
            max_points_per_codeword=max_points_per_codeword,
        )
        codes = codebooks.encode(table)
        row_error = relative_residual_norms(table, codebooks, codes)
        error = _mean_error(row_error, table)
        index = cls(config, table, weight_vector, codebooks, codes, row_error, error)
        logger.info(
            "index built: %d classes, dim %d, K %d, %s, %.2f s, quantisation error %.4f",
            table.shape[0],
            config.dim,
            config.num_codewords,
            config.quantizer,
            time.perf_counter() - started,
            error,
        )
        return index

    def update_rows(self, ids: ArrayLike, embeddings: ArrayLike, weights: ArrayLike | None = None) -> MidxIndex:
        """Return a new index with rows `ids` replaced by `embeddings` (U, D); this one is unchanged.

        ids equal to num_classes, num_classes + 1, ... append rows (they must form a contiguous run).
        Codes of the changed rows are re-assigned with the current codebooks; nothing is refitted.
        weights (U,) set the changed rows' weights; appended rows need them when the index has weights.
        """
        num_classes = self.num_classes
        id_vector = as_id_vector(ids, "ids", 2**62, self.device)
        rows = as_float_matrix(embeddings, "embeddings", self.config.dim, self.device)
        if rows.shape[0] != id_vector.shape[0]:
            raise InvalidArgumentError(
                f"ids has {id_vector.shape[0]} entries but embeddings has {rows.shape[0]} rows; give one row per id"
            )
        unique = torch.unique(id_vector)
        if unique.numel() != id_vector.numel():
            duplicate = _first_duplicate(id_vector)
            raise InvalidArgumentError(f"ids contains {duplicate} more than once; each id may appear once per update")
        appended = unique[unique >= num_classes]
        if appended.numel() > 0 and int(appended.max()) != num_classes + appended.numel() - 1:
            raise InvalidArgumentError(
                f"ids contains {int(appended.max())} but the index has {num_classes} classes; new rows must take "
                f"the next ids, {num_classes} to {num_classes + appended.numel() - 1}"
            )
        new_weights = self._updated_weights(id_vector, weights, appended.numel())
        if self.config.metric == "cosine":
            rows = normalise_rows(rows)

        new_size = num_classes + appended.numel()
        table = self._grow(self.embeddings, new_size)
        table[id_vector] = rows
        new_codes = self.codebooks.encode(rows)
        # When no class changes cell (embeddings drift a little between pushes) and the weights the
        # last stage uses stay the same, the cell structure is shared instead of rebuilt.
        same_cells = (
            appended.numel() == 0
            and torch.equal(new_codes, self.codes[id_vector])
            and (self.config.last_stage == "uniform" or weights is None)
        )
        if same_cells:
            codes = self.codes
        else:
            codes = self._grow(self.codes, new_size)
            codes[id_vector] = new_codes
        row_error = self._grow(self._row_error, new_size)
        new_errors = relative_residual_norms(rows, self.codebooks, codes[id_vector])
        row_error[id_vector] = new_errors
        totals = self._updated_error_totals(id_vector, rows, new_errors)
        return MidxIndex(
            self.config,
            table,
            new_weights,
            self.codebooks,
            codes,
            row_error,
            self.fit_quantization_error,
            codebook_fit=self.codebook_fit,
            error_totals=totals,
            cells=self.cells if same_cells else None,
        )

    def _updated_error_totals(
        self, ids: torch.Tensor, rows: torch.Tensor, new_errors: torch.Tensor
    ) -> tuple[float, int]:
        error_sum, count = self._error_totals
        replaced = ids[ids < self.num_classes]
        old_errors, old_nonzero = _error_terms(self._row_error[replaced], self.embeddings[replaced])
        errors, nonzero = _error_terms(new_errors, rows)
        error_sum += errors - old_errors
        count += nonzero - old_nonzero
        return max(error_sum, 0.0), count

    def refit(
        self,
        *,
        seed: int = 0,
        kmeans_iterations: int = DEFAULT_KMEANS_ITERATIONS,
        max_points_per_codeword: int = DEFAULT_MAX_POINTS_PER_CODEWORD,
    ) -> MidxIndex:
        """Return a new index whose codebooks are refitted, warm-started from the current ones."""
        started = time.perf_counter()
        generator = torch.Generator(device=self.device).manual_seed(seed)
        codebooks = fit_codebooks(
            self.embeddings,
            self.config.num_codewords,
            self.config.quantizer,
            generator=generator,
            iterations=kmeans_iterations,
            max_points_per_codeword=max_points_per_codeword,
            init=self.codebooks,
        )
        codes = codebooks.encode(self.embeddings)
        row_error = relative_residual_norms(self.embeddings, codebooks, codes)
        error = _mean_error(row_error, self.embeddings)
        logger.info(
            "codebooks refitted: %d classes, quantisation error %.4f -> %.4f, %.2f s",
            self.num_classes,
            self.quantization_error,
            error,
            time.perf_counter() - started,
        )
        return MidxIndex(self.config, self.embeddings, self.weights, codebooks, codes, row_error, error)

    def _updated_weights(self, ids: torch.Tensor, weights: ArrayLike | None, num_appended: int) -> torch.Tensor | None:
        if weights is None:
            if self.weights is not None and num_appended > 0:
                raise InvalidArgumentError("this index has class weights, so appended rows need weights too")
            return self.weights
        if self.weights is None:
            raise InvalidArgumentError(
                "this index was built without weights; upload the whole table with weights to add them"
            )
        new_weights = self._grow(self.weights, self.num_classes + num_appended)
        new_weights[ids] = as_weight_vector(weights, "weights", ids.shape[0], self.device)
        if self.config.last_stage == "popularity" and not bool((new_weights > 0).any()):
            raise InvalidArgumentError(
                "this update sets every weight to 0; at least one class must keep a positive weight"
            )
        return new_weights

    @staticmethod
    def _grow(tensor: torch.Tensor, size: int) -> torch.Tensor:
        """Return a copy of `tensor` with zero rows appended up to `size` rows."""
        if tensor.shape[0] == size:
            return tensor.clone()
        extra = tensor.new_zeros((size - tensor.shape[0], *tensor.shape[1:]))
        return torch.cat([tensor, extra])

    # ---------------------------------------------------------------------------------- properties

    @property
    def num_classes(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def quantization_error(self) -> float:
        """Mean over rows of nonzero norm of ||row - reconstruction|| / ||row||."""
        error_sum, count = self._error_totals
        return error_sum / count if count else 0.0

    def state_dict(self) -> dict[str, Any]:
        """Return everything needed to rebuild this snapshot exactly (tensors on the CPU)."""
        return {
            "config": self.config.to_dict(),
            "embeddings": self.embeddings.cpu(),
            "weights": None if self.weights is None else self.weights.cpu(),
            "codebook_first": self.codebooks.first.cpu(),
            "codebook_second": self.codebooks.second.cpu(),
            "codes": self.codes.cpu(),
            "fit_quantization_error": self.fit_quantization_error,
            "codebook_fit": self.codebook_fit,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], device: str | torch.device = "cpu") -> MidxIndex:
        """Rebuild a snapshot saved by `state_dict`; the result samples identically."""
        device = torch.device(device)
        config = IndexConfig.from_dict(state["config"])
        table = state["embeddings"].to(device=device, dtype=torch.float32)
        weights = None if state["weights"] is None else state["weights"].to(device=device, dtype=torch.float64)
        codebooks = Codebooks(
            config.quantizer,
            state["codebook_first"].to(device=device, dtype=torch.float32),
            state["codebook_second"].to(device=device, dtype=torch.float32),
        )
        codes = state["codes"].to(device=device, dtype=torch.int64)
        row_error = relative_residual_norms(table, codebooks, codes)
        return cls(
            config,
            table,
            weights,
            codebooks,
            codes,
            row_error,
            float(state["fit_quantization_error"]),
            codebook_fit=str(state.get("codebook_fit", "kmeans")),
        )

    # ------------------------------------------------------------------------------------ sampling

    def sample(
        self,
        queries: ArrayLike,
        num_samples: int,
        *,
        positives: ArrayLike | None = None,
        exclude_positives: bool = False,
        sampler: str = "midx",
        seed: int | None = None,
    ) -> SampleResult:
        """Draw `num_samples` (M) classes for each of the (B, D) queries from the chosen proposal.

        positives: optional (B, P) ids whose log Q under the full proposal is returned. With
        exclude_positives they are never drawn, and the negatives' log Q is renormalised over the
        remaining classes. seed makes the draws reproducible on the same device.
        """
        proposal = self._sampler(sampler)
        query_matrix = as_float_matrix(queries, "queries", self.config.dim, self.device)
        num_samples = check_num_samples(num_samples)
        positive_ids = None
        if positives is not None:
            positive_ids = as_id_matrix(positives, "positives", query_matrix.shape[0], self.num_classes, self.device)
        elif exclude_positives:
            raise InvalidArgumentError("exclude_positives needs positives: give one row of positive ids per query")
        if self.config.metric == "cosine":
            query_matrix = normalise_rows(query_matrix)
        generator = torch.Generator(device=self.device).manual_seed(secrets.randbits(63) if seed is None else seed)
        if query_matrix.shape[0] == 0:
            return _empty_result(num_samples, positive_ids, self.device)
        if proposal is self:
            return self._sample_midx(query_matrix, num_samples, positive_ids, exclude_positives, generator)
        return proposal.sample(query_matrix, num_samples, positive_ids, exclude_positives, generator)

    def log_prob(self, queries: ArrayLike, ids: ArrayLike, *, sampler: str = "midx") -> torch.Tensor:
        """Return the (B, P) float32 normalised log Q of the given (B, P) class ids for each query."""
        proposal = self._sampler(sampler)
        query_matrix = as_float_matrix(queries, "queries", self.config.dim, self.device)
        id_matrix = as_id_matrix(ids, "ids", query_matrix.shape[0], self.num_classes, self.device)
        if self.config.metric == "cosine":
            query_matrix = normalise_rows(query_matrix)
        if query_matrix.shape[0] == 0:
            return torch.empty(id_matrix.shape, dtype=torch.float32, device=self.device)
        if proposal is self:
            s1, s2 = self.codebooks.scores(query_matrix)
            log_z = torch.logsumexp(s1 + self._log_row_mass(s2)[0], dim=1)
            return self._log_q(s1, s2, id_matrix, log_z)
        return proposal.log_prob(query_matrix, id_matrix)

    def log_prob_all(self, queries: ArrayLike) -> torch.Tensor:
        """Return the (B, N) float32 MIDX log Q of every class for each of the (B, D) queries.

        Costs O(B N) memory: meant for evaluation on small batches (telemetry, benchmarks).
        """
        query_matrix = as_float_matrix(queries, "queries", self.config.dim, self.device)
        if self.config.metric == "cosine":
            query_matrix = normalise_rows(query_matrix)
        s1, s2 = self.codebooks.scores(query_matrix)
        log_z = torch.logsumexp(s1 + self._log_row_mass(s2)[0], dim=1) + math.log(self.cells.mass_scale)
        log_q = s1.index_select(1, self.codes[:, 0]) + s2.index_select(1, self.codes[:, 1])
        log_q -= log_z.unsqueeze(1)
        if self._log_weight is not None:
            log_q += self._log_weight.unsqueeze(0)
        return log_q

    def _sampler(self, name: str) -> Any:
        if name == "midx":
            return self
        if name not in SAMPLERS:
            raise InvalidArgumentError(f"sampler must be one of {list(SAMPLERS)}, got {name!r}")
        if name not in self._baselines:
            if name == "uniform":
                self._baselines[name] = UniformSampler(self.num_classes, self.device)
            elif name == "unigram":
                self._baselines[name] = UnigramSampler(
                    self.weights, self.num_classes, self.config.unigram_alpha, self.device
                )
            else:
                self._baselines[name] = ExactSampler(self.embeddings)
        return self._baselines[name]

    def _log_row_mass(self, s2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return log T (B, K) with T[b, a] = sum_c w_ac exp(s2[b, c]) (masses scaled by mass_scale).

        Also returns the row shift m2 (B, 1), E2 = exp(s2 - m2) and the (B,) mask of queries whose
        rows were recomputed in log space because the float32 fast path underflowed.
        """
        cells = self.cells
        shift = s2.amax(dim=1, keepdim=True)
        exp_s2 = torch.exp(s2 - shift)
        row_mass = exp_s2 @ cells.scaled_mass.T
        log_row_mass = torch.log(row_mass) + shift
        underflow = ((row_mass < _UNDERFLOW_THRESHOLD) & cells.row_nonempty).any(dim=1)
        if bool(underflow.any()):
            rows = underflow.nonzero().squeeze(1)
            log_terms = s2[rows].unsqueeze(1) + cells.log_scaled_mass.unsqueeze(0)
            log_row_mass[rows] = torch.logsumexp(log_terms, dim=2)
        return log_row_mass, shift, exp_s2, underflow

    def _log_q(self, s1: torch.Tensor, s2: torch.Tensor, ids: torch.Tensor, log_z: torch.Tensor) -> torch.Tensor:
        """Return log Q of (B, P) ids given the log normaliser of the scaled cell masses."""
        codes = self.codes[ids]
        # Cell masses are stored divided by mass_scale, so the true log Z is log_z + log(mass_scale).
        log_q = (
            s1.gather(1, codes[..., 0])
            + s2.gather(1, codes[..., 1])
            - (log_z + math.log(self.cells.mass_scale)).unsqueeze(1)
        )
        if self._log_weight is not None:
            log_q = log_q + self._log_weight[ids]
        return log_q

    def _sample_midx(
        self,
        queries: torch.Tensor,
        num_samples: int,
        positives: torch.Tensor | None,
        exclude: bool,
        generator: torch.Generator,
    ) -> SampleResult:
        """Sample in blocks of queries, so the (block, K, K) workspace stays within WORKSPACE_ELEMENTS."""
        num_codewords = self.cells.num_codewords
        block = max(1, WORKSPACE_ELEMENTS // (num_codewords * num_codewords))
        results = []
        for start in range(0, queries.shape[0], block):
            rows = slice(start, start + block)
            block_positives = None if positives is None else positives[rows]
            results.append(
                self._sample_midx_block(queries[rows], num_samples, block_positives, exclude, generator, start)
            )
        if len(results) == 1:
            return results[0]
        positive_log_q = None
        if positives is not None:
            positive_log_q = torch.cat([result.positive_log_q for result in results])  # type: ignore[misc]
        return SampleResult(
            ids=torch.cat([result.ids for result in results]),
            log_q=torch.cat([result.log_q for result in results]),
            positive_log_q=positive_log_q,
        )

    def _sample_midx_block(
        self,
        queries: torch.Tensor,
        num_samples: int,
        positives: torch.Tensor | None,
        exclude: bool,
        generator: torch.Generator,
        first_query: int,
    ) -> SampleResult:
        cells = self.cells
        num_codewords = cells.num_codewords
        batch = queries.shape[0]
        s1, s2 = self.codebooks.scores(queries)
        log_row_mass, shift, exp_s2, underflow = self._log_row_mass(s2)
        log_z_full = torch.logsumexp(s1 + log_row_mass, dim=1)

        # Per query, row a of `row_cumsum` is the running sum over c of w_ac exp(s2[c] - row_shift[a]).
        row_shift = shift.expand(batch, num_codewords).clone()
        row_cumsum = _workspace(batch * num_codewords * num_codewords, self.device).view(
            batch, num_codewords, num_codewords
        )
        torch.mul(cells.scaled_mass.unsqueeze(0), exp_s2.unsqueeze(1), out=row_cumsum)
        if bool(underflow.any()):
            rows = underflow.nonzero().squeeze(1)
            safe_shift = torch.where(torch.isfinite(log_row_mass[rows]), log_row_mass[rows], 0.0)
            row_shift[rows] = safe_shift
            row_cumsum[rows] = cells.scaled_mass.unsqueeze(0) * torch.exp(
                s2[rows].unsqueeze(1) - safe_shift.unsqueeze(2)
            )
        row_cumsum.cumsum_(dim=2)

        excluded = None
        log_z = log_z_full
        if exclude:
            assert positives is not None
            excluded = self._exclude_from_rows(positives, s2, row_shift, row_cumsum, log_row_mass)
            log_z = torch.logsumexp(s1 + log_row_mass, dim=1)
            empty = torch.isneginf(log_z)
            if bool(empty.any()):
                query = first_query + int(empty.nonzero()[0, 0])
                raise InvalidArgumentError(
                    f"query {query}: excluding its positives leaves no class that can be drawn; "
                    "sample without exclude_positives or name fewer positives"
                )

        # First stage: the codeword a of the first codebook, with probability proportional to its row mass.
        first_cumsum = torch.cumsum(torch.exp(s1 + log_row_mass - log_z.unsqueeze(1)), dim=1)
        first = draw_from_cumsum(first_cumsum, num_samples, generator)

        # Second stage: the codeword c given a, by inverse CDF on the running sums of row a.
        row_index = (torch.arange(batch, device=self.device).unsqueeze(1) * num_codewords + first).view(-1)
        flat_rows = row_cumsum.view(batch * num_codewords, num_codewords)
        rows_drawn = flat_rows.index_select(0, row_index)
        row_total = below_one(flat_rows[:, -1]).index_select(0, row_index)
        target = torch.rand(row_total.shape, generator=generator, device=self.device).mul_(row_total).unsqueeze(1)
        second = torch.searchsorted(rows_drawn, target, right=True).squeeze(1).clamp_(max=num_codewords - 1)
        second = second.view(batch, num_samples)

        # Last stage: a class inside cell (a, c), uniformly or by weight, skipping excluded positives.
        cell = (first * num_codewords + second).view(-1)
        exclusions = None if excluded is None else _cell_exclusions(excluded, cell, num_samples)
        positions = draw_in_segments(
            generator,
            cells.start.index_select(0, cell),
            cells.count.index_select(0, cell),
            prefix=cells.prefix,
            mass=None if cells.prefix is None else cells.mass.index_select(0, cell),
            last_positive=None if cells.last_positive is None else cells.last_positive.index_select(0, cell),
            exclusions=exclusions,
        )
        ids = cells.order.index_select(0, positions).view(batch, num_samples)

        # log Q = s1[a] + s2[c] + log w_i - log Z, with the codes (a, c) known from the draw.
        log_q = s1.gather(1, first) + s2.gather(1, second)
        log_q -= (log_z + math.log(cells.mass_scale)).unsqueeze(1)
        if self._log_weight is not None:
            log_q += self._log_weight.index_select(0, ids.view(-1)).view(batch, num_samples)
        positive_log_q = None if positives is None else self._log_q(s1, s2, positives, log_z_full)
        return SampleResult(ids=ids, log_q=log_q, positive_log_q=positive_log_q)

    def _exclude_from_rows(
        self,
        positives: torch.Tensor,
        s2: torch.Tensor,
        row_shift: torch.Tensor,
        row_cumsum: torch.Tensor,
        log_row_mass: torch.Tensor,
    ) -> _ExcludedPositives:
        """Remove each query's distinct positives from its row masses, in place.

        Rewrites the affected rows of `row_cumsum` and `log_row_mass` from per-cell masses with the
        positives' weights subtracted in float64; a cell whose drawable classes are all excluded gets
        mass exactly 0, so it can never be drawn.
        """
        cells = self.cells
        num_codewords = cells.num_codewords
        batch, num_positives = positives.shape
        position = cells.position[positives]
        position, sort_order = torch.sort(position, dim=1)
        ids = positives.gather(1, sort_order)
        distinct = torch.ones_like(ids, dtype=torch.bool)
        distinct[:, 1:] = position[:, 1:] != position[:, :-1]
        codes = self.codes[ids]
        first, second = codes[..., 0], codes[..., 1]
        if self.weights is not None and self.config.last_stage == "popularity":
            weight = self.weights[ids] / cells.mass_scale
            drawable = (self.weights[ids] > 0) & distinct
        else:
            weight = torch.full(ids.shape, 1.0 / cells.mass_scale, dtype=torch.float64, device=self.device)
            drawable = distinct
        weight = torch.where(distinct, weight, 0.0)

        # same_row[b, p, q]: positive q lies in the same first-codebook row as positive p.
        same_row = (first.unsqueeze(2) == first.unsqueeze(1)) & distinct.unsqueeze(1)
        column = second.unsqueeze(1).expand(batch, num_positives, num_positives)
        removed_mass = torch.zeros(batch, num_positives, num_codewords, dtype=torch.float64, device=self.device)
        removed_mass.scatter_add_(2, column, weight.unsqueeze(1) * same_row)
        removed_count = torch.zeros(batch, num_positives, num_codewords, dtype=torch.int64, device=self.device)
        removed_count.scatter_add_(2, column, (drawable.unsqueeze(1) & same_row).to(torch.int64))

        mass = cells.mass.view(num_codewords, num_codewords)[first] / cells.mass_scale
        remaining = cells.drawable.view(num_codewords, num_codewords)[first] - removed_count
        new_mass = torch.where(remaining > 0, (mass - removed_mass).clamp_min(0.0), 0.0)

        batch_index = torch.arange(batch, device=self.device).unsqueeze(1).expand(batch, num_positives)
        shift = row_shift[batch_index, first]
        terms = new_mass * torch.exp(s2.unsqueeze(1) - shift.unsqueeze(2)).to(torch.float64)
        new_rows = terms.cumsum(dim=2).to(torch.float32)
        row_cumsum[batch_index, first] = new_rows
        # The log mass comes from the float32 row the second stage searches, so a row whose mass
        # rounds to 0 there also gets probability 0 in the first stage.
        log_row_mass[batch_index, first] = torch.log(new_rows[..., -1]) + shift
        return _ExcludedPositives(
            position=position,
            cell=first * num_codewords + second,
            weight=weight * cells.mass_scale,
            active=distinct,
        )


class _ExcludedPositives:
    """Per query, the distinct positives sorted by cell position, as `_exclude_from_rows` found them."""

    def __init__(self, position: torch.Tensor, cell: torch.Tensor, weight: torch.Tensor, active: torch.Tensor) -> None:
        self.position = position
        self.cell = cell
        self.weight = weight
        self.active = active


def _cell_exclusions(excluded: _ExcludedPositives, cell: torch.Tensor, num_samples: int) -> Exclusions:
    """Expand the excluded positives to one row per draw, active where they lie in the drawn cell."""
    batch, num_positives = excluded.position.shape
    draw_cell = cell.view(batch, num_samples, 1)
    active = (excluded.cell.unsqueeze(1) == draw_cell) & excluded.active.unsqueeze(1)

    def per_draw(values: torch.Tensor) -> torch.Tensor:
        return values.unsqueeze(1).expand(batch, num_samples, num_positives).reshape(-1, num_positives)

    return Exclusions(
        position=per_draw(excluded.position),
        active=active.reshape(-1, num_positives),
        weight=per_draw(excluded.weight),
    )


_thread_state = threading.local()


def _workspace(num_elements: int, device: torch.device) -> torch.Tensor:
    """Return a float32 buffer of at least num_elements, reused by later calls on this thread.

    Reusing it saves the page faults of a fresh multi-megabyte allocation on every call; each thread
    has its own, so concurrent samplers never share one.
    """
    buffer = getattr(_thread_state, "buffer", None)
    if buffer is None or buffer.device != device or buffer.numel() < num_elements:
        buffer = torch.empty(num_elements, dtype=torch.float32, device=device)
        _thread_state.buffer = buffer
    return buffer[:num_elements]


def _empty_result(num_samples: int, positives: torch.Tensor | None, device: torch.device) -> SampleResult:
    return SampleResult(
        ids=torch.empty(0, num_samples, dtype=torch.int64, device=device),
        log_q=torch.empty(0, num_samples, dtype=torch.float32, device=device),
        positive_log_q=None if positives is None else torch.empty(positives.shape, dtype=torch.float32, device=device),
    )


def _check_weights(
    config: IndexConfig, weights: ArrayLike | None, num_classes: int, device: torch.device
) -> torch.Tensor | None:
    if weights is None:
        if config.last_stage == "popularity":
            raise InvalidArgumentError("last_stage 'popularity' needs weights: give one weight >= 0 per row")
        return None
    vector = as_weight_vector(weights, "weights", num_classes, device)
    if config.last_stage == "popularity" and not bool((vector > 0).any()):
        raise InvalidArgumentError("weights are all 0; at least one class must have a positive weight")
    return vector


def normalise_rows(rows: torch.Tensor) -> torch.Tensor:
    norms = rows.norm(dim=1, keepdim=True)
    return rows / torch.where(norms > 0, norms, 1.0)


def relative_residual_norms(rows: torch.Tensor, codebooks: Codebooks, codes: torch.Tensor) -> torch.Tensor:
    """Return ||row - reconstruction|| / ||row|| per row (0 for rows of zero norm)."""
    norms = rows.norm(dim=1)
    residual = (rows - codebooks.reconstruct(codes)).norm(dim=1)
    return torch.where(norms > 0, residual / torch.where(norms > 0, norms, 1.0), 0.0)


def _error_terms(row_error: torch.Tensor, rows: torch.Tensor) -> tuple[float, int]:
    """Return the sum of row_error and the count over the rows of nonzero norm."""
    nonzero = rows.abs().amax(dim=1) > 0
    return float(row_error[nonzero].double().sum()), int(nonzero.sum())


def _error_totals(row_error: torch.Tensor, table: torch.Tensor) -> tuple[float, int]:
    return _error_terms(row_error, table)


def _mean_error(row_error: torch.Tensor, table: torch.Tensor) -> float:
    error_sum, count = _error_terms(row_error, table)
    return error_sum / count if count else 0.0


def _first_duplicate(ids: torch.Tensor) -> int:
    values, counts = torch.unique(ids, return_counts=True)
    return int(values[counts > 1][0])
