"""The operations both front ends expose: request limits, dynamic batching and the registry, in one place.

The REST router and the gRPC servicer translate their wire formats to these calls and the results
back. Every rule a request must meet is checked here or in the index core, never in a front end.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from midx_service.batching import SampleBatcher, SampleCall
from midx_service.core import IndexConfig
from midx_service.errors import ResourceExhaustedError
from midx_service.metrics import Metrics
from midx_service.registry import IndexRegistry, IndexState
from midx_service.settings import Settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SampleAnswer:
    """ids (B, M) int64, log_q (B, M) float32, positive_log_q (B, P) float32 or None, and the version."""

    ids: np.ndarray
    log_q: np.ndarray
    positive_log_q: np.ndarray | None
    version: int


@dataclass(frozen=True)
class LogProbAnswer:
    log_q: np.ndarray  # (B, P) float32
    version: int


class SamplerService:
    """The sampling service's operations over one `IndexRegistry`, with the configured limits."""

    def __init__(self, settings: Settings, registry: IndexRegistry, metrics: Metrics) -> None:
        self.settings = settings
        self.registry = registry
        self.metrics = metrics
        self.batcher = SampleBatcher(
            registry,
            window_ms=settings.batch_window_ms,
            max_batch_rows=settings.max_batch,
            on_batch=self._observe_batch,
        )

    # ------------------------------------------------------------------------------- indexes

    async def create_index(self, name: str, options: dict[str, Any]) -> IndexState:
        return await self.registry.create(name, IndexConfig.from_dict(options))

    def get_index(self, name: str) -> IndexState:
        return self.registry.state(name)

    def list_indexes(self) -> list[IndexState]:
        return self.registry.states()

    async def delete_index(self, name: str) -> None:
        await self.registry.delete(name)

    def ready(self) -> bool:
        return self.registry.ready()

    def unready_indexes(self) -> list[IndexState]:
        return self.registry.unready()

    def persistence_problem(self) -> str | None:
        """Why mutations are being rejected by persistence (Redis or the data directory), or None."""
        return self.registry.persistence_problem()

    # ---------------------------------------------------------------------------- mutations

    def check_table_bytes(self, num_bytes: int) -> None:
        """Raise ResourceExhaustedError when a table of `num_bytes` exceeds max_body_bytes."""
        limit = self.settings.max_body_bytes
        if num_bytes > limit:
            raise ResourceExhaustedError(
                f"the table is {num_bytes} bytes, above the limit of {limit} bytes (MIDX_MAX_BODY_BYTES); "
                "raise the limit or upload fewer rows"
            )

    async def upload_embeddings(self, name: str, embeddings: Any, weights: Any | None = None) -> int:
        return await self.registry.upload(name, embeddings, weights)

    async def update_embeddings(self, name: str, ids: Any, embeddings: Any, weights: Any | None = None) -> int:
        return await self.registry.update(name, ids, embeddings, weights)

    async def rebuild(self, name: str, mode: str = "kmeans", queries: Any | None = None) -> int:
        """Refit the codebooks in `mode` ("kmeans" or "kl", see IndexRegistry.refit); return the version."""
        return await self.registry.refit(name, mode, queries)

    # ----------------------------------------------------------------------------- sampling

    async def sample(
        self,
        name: str,
        queries: np.ndarray,
        num_samples: int,
        *,
        positives: np.ndarray | None = None,
        exclude_positives: bool = False,
        sampler: str = "midx",
        seed: int | None = None,
        min_version: int | None = None,
    ) -> SampleAnswer:
        """Draw `num_samples` classes for each query row (see MidxIndex.sample for the rules)."""
        self._check_batch(queries)
        limit = self.settings.max_num_samples
        if not isinstance(num_samples, bool) and isinstance(num_samples, int) and num_samples > limit:
            raise ResourceExhaustedError(
                f"num_samples is {num_samples}, above the limit of {limit}; ask for fewer samples per query "
                "or raise the limit with MIDX_MAX_NUM_SAMPLES (--max-num-samples)"
            )
        snapshot = await self.registry.snapshot(name, min_version)
        assert snapshot.index is not None
        queries = _empty_batch_as_matrix(queries, snapshot.index.config.dim)
        call = SampleCall(queries, num_samples, positives, exclude_positives, sampler or "midx", seed)

        result, version = await self.batcher.sample(name, snapshot, call)
        self.registry.record_queries(name, queries)

        rows = int(result.ids.shape[0])
        self.metrics.queries.labels(name, call.sampler).inc(rows)
        self.metrics.samples.labels(name, call.sampler).inc(rows * int(result.ids.shape[1]))
        positive_log_q = None if result.positive_log_q is None else result.positive_log_q.cpu().numpy()
        return SampleAnswer(result.ids.cpu().numpy(), result.log_q.cpu().numpy(), positive_log_q, version)

    async def log_prob(
        self,
        name: str,
        queries: np.ndarray,
        ids: np.ndarray,
        *,
        sampler: str = "midx",
        min_version: int | None = None,
    ) -> LogProbAnswer:
        """Return the normalised log Q of the (B, P) ids for each of the (B, D) queries."""
        self._check_batch(queries)
        snapshot = await self.registry.snapshot(name, min_version)
        index = snapshot.index
        assert index is not None
        queries = _empty_batch_as_matrix(queries, index.config.dim)

        log_q = await self.registry.compute(index.log_prob, queries, ids, sampler=sampler or "midx")
        self.registry.record_queries(name, queries)

        self.metrics.queries.labels(name, sampler or "midx").inc(int(log_q.shape[0]))
        return LogProbAnswer(log_q.cpu().numpy(), snapshot.version)

    def _check_batch(self, queries: np.ndarray) -> None:
        limit = self.settings.max_batch
        rows = int(queries.shape[0]) if queries.ndim >= 1 else 0
        if rows > limit:
            raise ResourceExhaustedError(
                f"the batch has {rows} queries, above the limit of {limit}; split it into smaller requests "
                "or raise the limit with MIDX_MAX_BATCH (--max-batch)"
            )

    def _observe_batch(self, rows: int, requests: int) -> None:
        self.metrics.batch_queries.observe(rows)
        self.metrics.batch_requests.observe(requests)


def _empty_batch_as_matrix(queries: np.ndarray, dim: int) -> np.ndarray:
    """Return an empty JSON batch `[]` (shape (0,)) as a (0, dim) matrix, so it returns an empty result."""
    if queries.ndim == 1 and queries.shape[0] == 0:
        return queries.reshape(0, dim)
    return queries
