"""Negative sources of the trainer: the sampling service, or (fallback) an index in this process."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch

from midx_service.core import IndexConfig, MidxIndex


class Negatives(Protocol):
    """One sample result: (B, M) ids and log_q, (B, P) positive_log_q, and the index version used."""

    @property
    def ids(self) -> Any: ...

    @property
    def log_q(self) -> Any: ...

    @property
    def positive_log_q(self) -> Any: ...


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

    def close(self) -> None:
        if self.created:
            self.created = False
            self.client.delete_index(self.index_name)


class InProcessNegativeSource:
    """Fallback that samples from a `MidxIndex` in the trainer's own process, without the service.

    It runs the same index code as the service, so it isolates the trainer from transport problems,
    but it does not measure the service: results made with it are not the main job's results.
    """

    def __init__(self, config: IndexConfig) -> None:
        self.config = config
        self.index: MidxIndex | None = None
        self.version = 0

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
        return index.sample(queries, num_samples, positives=positives, sampler=sampler, seed=seed)

    def push_rows(self, ids: np.ndarray, rows: np.ndarray) -> int:
        self.index = self._require_index().update_rows(ids, rows)
        self.version += 1
        return self.version

    def close(self) -> None:
        self.index = None

    def _require_index(self) -> MidxIndex:
        if self.index is None:
            raise RuntimeError("no table uploaded yet: call upload() first")
        return self.index
