"""Negative sources of the trainer: the sampling service, or (fallback) an index in this process."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from midx_service.core import IndexConfig, MidxIndex
from midx_service.core.learned import fit_kl_codebooks
from midx_service.reservoir import QueryReservoir


class Negatives(Protocol):
    """One sample result: (B, M) ids and log_q, (B, P) positive_log_q, and the index version used."""

    @property
    def ids(self) -> Any: ...

    @property
    def log_q(self) -> Any: ...

    @property
    def positive_log_q(self) -> Any: ...


@dataclass(frozen=True)
class KlRefit:
    """Outcome of one learned (KL) refit of the index's codebooks.

    version: the index version to sample from after it (unchanged when not accepted). seconds: the
    refit's own wall time. heldout_kl_before / heldout_kl_after: mean KL(P || Q) in nats on the
    refit's held-out queries under the old and the learned codebooks.
    """

    version: int
    accepted: bool
    seconds: float
    heldout_kl_before: float
    heldout_kl_after: float


class NegativeSource(Protocol):
    """The trainer's view of an index of its output table."""

    def upload(self, embeddings: np.ndarray, weights: np.ndarray | None) -> int:
        """Create the index from the whole (N, D) table and (N,) weights; return its version."""
        ...

    def sample(
        self,
        sampler: str,
        queries: torch.Tensor,
        positives: torch.Tensor,
        num_samples: int,
        *,
        min_version: int,
        seed: int,
    ) -> Negatives:
        """Draw `num_samples` negatives per query from an index of version >= min_version."""
        ...

    def push_rows(self, ids: np.ndarray, rows: np.ndarray) -> int:
        """Replace the (U,) rows `ids` with the (U, D) `rows`; return the version that contains them."""
        ...

    def refit_kl(self) -> KlRefit:
        """Learn codebooks on the queries recently sampled for, and swap them in if they lower the KL."""
        ...

    def close(self) -> None:
        """Delete the index, if `upload` created one."""
        ...


class ServiceNegativeSource:
    """An index on the sampling service, reached through a `SamplerClient` or `RestSamplerClient`."""

    def __init__(self, client: Any, index_name: str, config: IndexConfig) -> None:
        self.client = client
        self.index_name = index_name
        self.config = config
        self.created = False

    def upload(self, embeddings: np.ndarray, weights: np.ndarray | None) -> int:
        self.client.create_index(
            self.index_name,
            self.config.dim,
            num_codewords=self.config.num_codewords,
            quantizer=self.config.quantizer,
            last_stage=self.config.last_stage,
            metric=self.config.metric,
        )
        self.created = True
        return int(self.client.upload_embeddings(self.index_name, embeddings, weights))

    def sample(
        self,
        sampler: str,
        queries: torch.Tensor,
        positives: torch.Tensor,
        num_samples: int,
        *,
        min_version: int,
        seed: int,
    ) -> Negatives:
        return self.client.sample(
            self.index_name,
            queries,
            num_samples,
            positives=positives,
            sampler=sampler,
            min_version=min_version,
            seed=seed,
            output="torch",
        )

    def push_rows(self, ids: np.ndarray, rows: np.ndarray) -> int:
        return int(self.client.update_embeddings(self.index_name, ids, rows))

    def refit_kl(self) -> KlRefit:
        # The server learns from its own record of the queries it served for this index.
        version = int(self.client.rebuild(self.index_name, mode="kl"))
        report = self.client.get_index(self.index_name).last_refit
        if report is None or report.mode != "kl" or report.heldout_kl_before is None or report.heldout_kl_after is None:
            raise RuntimeError(f"index {self.index_name!r} has no kl refit report after rebuild(mode='kl')")
        return KlRefit(version, report.accepted, report.seconds, report.heldout_kl_before, report.heldout_kl_after)

    def close(self) -> None:
        if self.created:
            self.created = False
            self.client.delete_index(self.index_name)


class InProcessNegativeSource:
    """Fallback that samples from a `MidxIndex` in the trainer's own process, without the service.

    It runs the same index code as the service, so it isolates the trainer from transport problems,
    but it does not measure the service: results made with it are not the main job's results. Like
    the service, it keeps the last `max_recent_queries` query rows for learned refits.
    """

    def __init__(
        self, config: IndexConfig, *, max_recent_queries: int = 1024, kl_refit_time_budget_seconds: float = 60.0
    ) -> None:
        self.config = config
        self.index: MidxIndex | None = None
        self.version = 0
        self.kl_refit_time_budget_seconds = kl_refit_time_budget_seconds
        self.reservoir = QueryReservoir(max_recent_queries, config.dim)

    def upload(self, embeddings: np.ndarray, weights: np.ndarray | None) -> int:
        self.index = MidxIndex.build(self.config, embeddings, weights)
        self.version += 1
        return self.version

    def sample(
        self,
        sampler: str,
        queries: torch.Tensor,
        positives: torch.Tensor,
        num_samples: int,
        *,
        min_version: int,
        seed: int,
    ) -> Negatives:
        index = self._require_index()
        self.reservoir.add(queries.detach().cpu().numpy())
        return index.sample(queries, num_samples, positives=positives, sampler=sampler, seed=seed)

    def push_rows(self, ids: np.ndarray, rows: np.ndarray) -> int:
        self.index = self._require_index().update_rows(ids, rows)
        self.version += 1
        return self.version

    def refit_kl(self) -> KlRefit:
        index = self._require_index()
        started = time.perf_counter()
        refitted, report = fit_kl_codebooks(
            index, self.recent_queries(), time_budget_seconds=self.kl_refit_time_budget_seconds
        )
        if report.accepted:
            self.index = refitted
            self.version += 1
        return KlRefit(
            self.version,
            report.accepted,
            time.perf_counter() - started,
            report.heldout_kl_before,
            report.heldout_kl_after,
        )

    def recent_queries(self) -> torch.Tensor:
        """Return the last `max_recent_queries` query rows sampled for, oldest first."""
        return torch.from_numpy(self.reservoir.recent())

    def close(self) -> None:
        self.index = None
        self.reservoir = QueryReservoir(self.reservoir.capacity, self.config.dim)

    def _require_index(self) -> MidxIndex:
        if self.index is None:
            raise RuntimeError("no table uploaded yet: call upload() first")
        return self.index
