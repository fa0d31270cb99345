"""gRPC clients of the sampling service: `SamplerClient` (blocking) and `AsyncSamplerClient` (asyncio)."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc.aio
import numpy as np

from midx_client import _requests
from midx_client._convert import Output, info_from_proto, table_sha256, tensor_to_proto
from midx_client._proto import sampler_pb2 as _pb
from midx_client._proto import sampler_pb2_grpc as _pb_grpc
from midx_client.errors import RETRYABLE_CODES, SamplerError
from midx_client.types import IndexInfo, LogProbResult, SampleResult

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_TIMEOUT_SECONDS = 60.0
DEFAULT_RETRIES = 3
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_BACKOFF_SECONDS = 0.1
_MAX_BACKOFF_SECONDS = 2.0


def _error_from_rpc(error: grpc.RpcError) -> SamplerError:
    code = error.code() if hasattr(error, "code") else None
    details = error.details() if hasattr(error, "details") else None
    name = code.name if code is not None else "UNKNOWN"
    return SamplerError(name.lower(), details or str(error), name)


def _backoff_seconds(attempt: int) -> float:
    return min(_MAX_BACKOFF_SECONDS, _BACKOFF_SECONDS * 2**attempt) * (0.5 + random.random() / 2)


def _channel_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


def _credentials(tls: bool, root_certificates: bytes | str | os.PathLike[str] | None) -> Any:
    if not tls and root_certificates is None:
        return None
    if isinstance(root_certificates, (str, os.PathLike)):
        root_certificates = Path(root_certificates).read_bytes()
    return grpc.ssl_channel_credentials(root_certificates=root_certificates)


def _upload_chunks(
    name: str, embeddings: Any, weights: Any | None, progress: bool
) -> Iterator[_pb.UploadEmbeddingsRequest]:
    """Return the upload stream: the table in runs of rows, the checksum in the last chunk.

    The arrays are converted before the stream starts, so a conversion error is raised here and not
    inside gRPC's request iterator (where it would surface as a cancelled call).
    """
    table, weight_vector = _requests.table_arrays(embeddings, weights)
    if table.ndim != 2:
        raise SamplerError("invalid_argument", f"embeddings must be 2-D (rows, dim), got shape {table.shape}")
    return _chunks(name, table, weight_vector, progress)


def _chunks(
    name: str, table: np.ndarray, weight_vector: np.ndarray | None, progress: bool
) -> Iterator[_pb.UploadEmbeddingsRequest]:
    num_rows = table.shape[0]
    step = _requests.chunk_rows(table)
    bar = _progress_bar(num_rows, progress)
    try:
        for start in range(0, max(num_rows, 1), step):
            stop = min(start + step, num_rows)
            chunk = _pb.UploadEmbeddingsRequest(embeddings=tensor_to_proto(table[start:stop]))
            if start == 0:
                chunk.name = name
                chunk.num_rows = num_rows
            if weight_vector is not None:
                chunk.weights.CopyFrom(tensor_to_proto(weight_vector[start:stop]))
            if stop >= num_rows:
                chunk.sha256 = table_sha256(table, weight_vector)
            yield chunk
            if bar is not None:
                bar.update(stop - start)
    finally:
        if bar is not None:
            bar.close()


def _progress_bar(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="rows", desc="upload", unit_scale=True)


class SamplerClient:
    """Blocking gRPC client; the same methods and results as `RestSamplerClient`.

    target: "host:port" of the gRPC front end. token: the bearer token when the server requires one.
    timeout_seconds: deadline of each call. retries: extra attempts, with exponential backoff, for
    idempotent calls (get, list, sample, log-prob) that fail with UNAVAILABLE. tls / root_certificates:
    use TLS, trusting the given PEM certificate (bytes or a file path) or the system roots.
    """

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        token: str | None = None,
        timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
        retries: int = DEFAULT_RETRIES,
        tls: bool = False,
        root_certificates: bytes | str | os.PathLike[str] | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        options = _channel_options(max_message_bytes)
        credentials = _credentials(tls, root_certificates)
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=options)
        self._stub = _pb_grpc.SamplerStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout_seconds = timeout_seconds
        self.retries = retries

    def _call(self, method: Callable[..., T], request: Any, *, idempotent: bool = False) -> T:
        attempt = 0
        while True:
            try:
                return method(request, timeout=self.timeout_seconds, metadata=self._metadata)
            except grpc.RpcError as error:
                failure = _error_from_rpc(error)
                if not idempotent or failure.code not in RETRYABLE_CODES or attempt >= self.retries:
                    raise failure from None
                logger.warning("retrying after %s (attempt %d of %d)", failure, attempt + 1, self.retries)
                time.sleep(_backoff_seconds(attempt))
                attempt += 1

    def create_index(
        self,
        name: str,
        dim: int,
        *,
        num_codewords: int = 64,
        quantizer: str = "rq",
        last_stage: str = "uniform",
        metric: str = "dot",
    ) -> IndexInfo:
        config = _pb.IndexConfig(**_requests.index_config(dim, num_codewords, quantizer, last_stage, metric))
        info = self._call(self._stub.CreateIndex, _pb.CreateIndexRequest(name=name, config=config))
        return info_from_proto(info)

    def get_index(self, name: str) -> IndexInfo:
        return info_from_proto(self._call(self._stub.GetIndex, _pb.GetIndexRequest(name=name), idempotent=True))

    def list_indexes(self) -> list[IndexInfo]:
        response = self._call(self._stub.ListIndexes, _pb.ListIndexesRequest(), idempotent=True)
        return [info_from_proto(info) for info in response.indexes]

    def delete_index(self, name: str) -> None:
        self._call(self._stub.DeleteIndex, _pb.DeleteIndexRequest(name=name))

    def upload_embeddings(
        self, name: str, embeddings: Any, weights: Any | None = None, *, progress: bool = False
    ) -> int:
        """Upload the whole (N, D) table (and optional (N,) weights) in chunks; return the new version."""
        response = self._call(self._stub.UploadEmbeddings, _upload_chunks(name, embeddings, weights, progress))
        return int(response.version)

    def update_embeddings(self, name: str, ids: Any, embeddings: Any, weights: Any | None = None) -> int:
        """Replace (or append) rows `ids` (U,) with `embeddings` (U, D); return the new version."""
        request = _requests.update_request(name, ids, embeddings, weights)
        return int(self._call(self._stub.UpdateEmbeddings, request).version)

    def sample(
        self,
        name: str,
        queries: Any,
        num_samples: int,
        *,
        positives: Any | None = None,
        exclude_positives: bool = False,
        sampler: str = "midx",
        seed: int | None = None,
        min_version: int | None = None,
        output: Output = "numpy",
    ) -> SampleResult:
        """Draw `num_samples` classes for each of the (B, D) queries; see `SampleResult`."""
        request = _requests.sample_request(
            name, queries, num_samples, positives, exclude_positives, sampler, seed, min_version
        )
        return _requests.sample_result_from_proto(self._call(self._stub.Sample, request, idempotent=True), output)

    def log_prob(
        self,
        name: str,
        queries: Any,
        ids: Any,
        *,
        sampler: str = "midx",
        min_version: int | None = None,
        output: Output = "numpy",
    ) -> LogProbResult:
        """Return log Q of the (B, P) `ids` for each of the (B, D) queries."""
        request = _requests.log_prob_request(name, queries, ids, sampler, min_version)
        return _requests.log_prob_result_from_proto(self._call(self._stub.LogProb, request, idempotent=True), output)

    def rebuild(self, name: str, *, mode: str = "kmeans", queries: Any | None = None) -> int:
        """Refit the index's codebooks now; return the version that contains the result.

        mode "kmeans" refits by k-means; "kl" learns codebooks that lower KL(P || Q) on `queries`
        (R, D), or on the server's recent queries when None, and keeps them only when they lower the
        held-out KL, else the version stays the same (`get_index(name).last_refit` says which).
        """
        request = _requests.rebuild_request(name, mode, queries)
        return int(self._call(self._stub.Rebuild, request).version)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> SamplerClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncSamplerClient:
    """asyncio gRPC client: the methods of `SamplerClient` as coroutines, same arguments and results."""

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        token: str | None = None,
        timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
        retries: int = DEFAULT_RETRIES,
        tls: bool = False,
        root_certificates: bytes | str | os.PathLike[str] | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        options = _channel_options(max_message_bytes)
        credentials = _credentials(tls, root_certificates)
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(target, options=options)
        else:
            self._channel = grpc.aio.secure_channel(target, credentials, options=options)
        self._stub = _pb_grpc.SamplerStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout_seconds = timeout_seconds
        self.retries = retries

    async def _call(self, method: Callable[..., Awaitable[T]], request: Any, *, idempotent: bool = False) -> T:
        attempt = 0
        while True:
            try:
                return await method(request, timeout=self.timeout_seconds, metadata=self._metadata)
            except grpc.RpcError as error:
                failure = _error_from_rpc(error)
                if not idempotent or failure.code not in RETRYABLE_CODES or attempt >= self.retries:
                    raise failure from None
                logger.warning("retrying after %s (attempt %d of %d)", failure, attempt + 1, self.retries)
                await asyncio.sleep(_backoff_seconds(attempt))
                attempt += 1

    async def create_index(
        self,
        name: str,
        dim: int,
        *,
        num_codewords: int = 64,
        quantizer: str = "rq",
        last_stage: str = "uniform",
        metric: str = "dot",
    ) -> IndexInfo:
        config = _pb.IndexConfig(**_requests.index_config(dim, num_codewords, quantizer, last_stage, metric))
        info = await self._call(self._stub.CreateIndex, _pb.CreateIndexRequest(name=name, config=config))
        return info_from_proto(info)

    async def get_index(self, name: str) -> IndexInfo:
        info = await self._call(self._stub.GetIndex, _pb.GetIndexRequest(name=name), idempotent=True)
        return info_from_proto(info)

    async def list_indexes(self) -> list[IndexInfo]:
        response = await self._call(self._stub.ListIndexes, _pb.ListIndexesRequest(), idempotent=True)
        return [info_from_proto(info) for info in response.indexes]

    async def delete_index(self, name: str) -> None:
        await self._call(self._stub.DeleteIndex, _pb.DeleteIndexRequest(name=name))

    async def upload_embeddings(
        self, name: str, embeddings: Any, weights: Any | None = None, *, progress: bool = False
    ) -> int:
        chunks = _async_iter(_upload_chunks(name, embeddings, weights, progress))
        response = await self._call(self._stub.UploadEmbeddings, chunks)
        return int(response.version)

    async def update_embeddings(self, name: str, ids: Any, embeddings: Any, weights: Any | None = None) -> int:
        request = _requests.update_request(name, ids, embeddings, weights)
        return int((await self._call(self._stub.UpdateEmbeddings, request)).version)

    async def sample(
        self,
        name: str,
        queries: Any,
        num_samples: int,
        *,
        positives: Any | None = None,
        exclude_positives: bool = False,
        sampler: str = "midx",
        seed: int | None = None,
        min_version: int | None = None,
        output: Output = "numpy",
    ) -> SampleResult:
        request = _requests.sample_request(
            name, queries, num_samples, positives, exclude_positives, sampler, seed, min_version
        )
        response = await self._call(self._stub.Sample, request, idempotent=True)
        return _requests.sample_result_from_proto(response, output)

    async def log_prob(
        self,
        name: str,
        queries: Any,
        ids: Any,
        *,
        sampler: str = "midx",
        min_version: int | None = None,
        output: Output = "numpy",
    ) -> LogProbResult:
        request = _requests.log_prob_request(name, queries, ids, sampler, min_version)
        response = await self._call(self._stub.LogProb, request, idempotent=True)
        return _requests.log_prob_result_from_proto(response, output)

    async def rebuild(self, name: str, *, mode: str = "kmeans", queries: Any | None = None) -> int:
        request = _requests.rebuild_request(name, mode, queries)
        return int((await self._call(self._stub.Rebuild, request)).version)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncSamplerClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


async def _async_iter(chunks: Iterator[T]) -> AsyncIterator[T]:
    for chunk in chunks:
        yield chunk


__all__ = ["AsyncSamplerClient", "SamplerClient"]
