"""REST clients of the sampling service: `RestSamplerClient` (blocking) and `AsyncRestSamplerClient`."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import numpy as np

from midx_client import _requests
from midx_client._convert import Output, info_from_json
from midx_client.errors import RETRYABLE_CODES, SamplerError
from midx_client.grpc_client import DEFAULT_RETRIES, DEFAULT_TIMEOUT_SECONDS, _backoff_seconds, _progress_bar
from midx_client.types import IndexInfo, LogProbResult, SampleResult

logger = logging.getLogger(__name__)

_BODY_CHUNK_BYTES = 1024 * 1024

# HTTP statuses without an error body from the service (a proxy, or a connection failure).
_CODES_BY_STATUS = {
    400: "invalid_argument",
    401: "unauthenticated",
    404: "not_found",
    409: "failed_precondition",
    413: "resource_exhausted",
    422: "invalid_argument",
    503: "unavailable",
}


def _error_from_response(response: httpx.Response) -> SamplerError:
    try:
        error = response.json()["error"]
        return SamplerError(str(error["code"]), str(error["message"]), response.status_code)
    except (ValueError, KeyError, TypeError):
        code = _CODES_BY_STATUS.get(response.status_code, "internal")
        return SamplerError(code, response.text or response.reason_phrase, response.status_code)


def _error_from_transport(error: httpx.TransportError) -> SamplerError:
    if isinstance(error, httpx.TimeoutException):
        return SamplerError("deadline_exceeded", f"request timed out: {error}")
    return SamplerError("unavailable", f"could not reach the server: {error}")


def _json_content(body: dict[str, Any]) -> bytes:
    # NaN and Infinity are sent as the bare tokens Python writes, so the server, not the client, is
    # the one place that rejects them with its usual message.
    return json.dumps(body).encode()


def _table_body(embeddings: Any, weights: Any | None) -> tuple[bytes, str, int]:
    """Return the upload body (.npy, or .npz with weights), its content type and the row count."""
    table, weight_vector = _requests.table_arrays(embeddings, weights)
    buffer = io.BytesIO()
    if weight_vector is None:
        np.save(buffer, table, allow_pickle=False)
        content_type = "application/x-npy"
    else:
        np.savez(buffer, embeddings=table, weights=weight_vector)
        content_type = "application/x-npz"
    return buffer.getvalue(), content_type, int(table.shape[0]) if table.ndim else 0


def _content_digest(body: bytes) -> str:
    """Return the Content-Digest header value (RFC 9530) with the body's SHA-256."""
    return "sha-256=:" + base64.b64encode(hashlib.sha256(body).digest()).decode() + ":"


def _body_chunks(body: bytes, progress: bool) -> Iterator[bytes]:
    bar = _progress_bar(len(body), progress)
    try:
        for start in range(0, len(body), _BODY_CHUNK_BYTES):
            chunk = body[start : start + _BODY_CHUNK_BYTES]
            yield chunk
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()


async def _async_body_chunks(body: bytes, progress: bool) -> AsyncIterator[bytes]:
    for chunk in _body_chunks(body, progress):
        yield chunk


def _headers(token: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"} if token else {}


class RestSamplerClient:
    """Blocking REST client; the same methods and results as `SamplerClient`.

    base_url: "http://host:port" of the REST front end. token: the bearer token when the server
    requires one. timeout_seconds: timeout of each call. retries: extra attempts, with exponential
    backoff, for idempotent calls (get, list, sample, log-prob) that fail with 503 or cannot connect.
    """

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        token: str | None = None,
        timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
        retries: int = DEFAULT_RETRIES,
        verify: bool | str = True,
    ) -> None:
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"), headers=_headers(token), timeout=timeout_seconds, verify=verify
        )
        self.timeout_seconds = timeout_seconds
        self.retries = retries

    def _request(self, method: str, path: str, *, idempotent: bool = False, **kwargs: Any) -> Any:
        attempt = 0
        while True:
            try:
                response = self._http.request(method, path, **kwargs)
                if response.is_success:
                    return response.json() if response.content else None
                failure = _error_from_response(response)
            except httpx.TransportError as error:
                failure = _error_from_transport(error)
            if not idempotent or failure.code not in RETRYABLE_CODES or attempt >= self.retries:
                raise failure
            logger.warning("retrying after %s (attempt %d of %d)", failure, attempt + 1, self.retries)
            time.sleep(_backoff_seconds(attempt))
            attempt += 1

    def _post_json(self, path: str, body: dict[str, Any], *, idempotent: bool = False) -> Any:
        headers = {"content-type": "application/json"}
        return self._request("POST", path, content=_json_content(body), headers=headers, idempotent=idempotent)

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
        config = _requests.index_config(dim, num_codewords, quantizer, last_stage, metric)
        return info_from_json(self._request("PUT", f"/v1/indexes/{name}", json=config))

    def get_index(self, name: str) -> IndexInfo:
        return info_from_json(self._request("GET", f"/v1/indexes/{name}", idempotent=True))

    def list_indexes(self) -> list[IndexInfo]:
        body = self._request("GET", "/v1/indexes", idempotent=True)
        return [info_from_json(info) for info in body["indexes"]]

    def delete_index(self, name: str) -> None:
        self._request("DELETE", f"/v1/indexes/{name}")

    def upload_embeddings(
        self, name: str, embeddings: Any, weights: Any | None = None, *, progress: bool = False
    ) -> int:
        """Upload the (N, D) table and optional (N,) weights as one binary body; return the version."""
        body, content_type, _ = _table_body(embeddings, weights)
        headers = {"content-type": content_type, "content-digest": _content_digest(body)}
        response = self._request(
            "PUT", f"/v1/indexes/{name}/embeddings", content=_body_chunks(body, progress), headers=headers
        )
        return int(response["version"])

    def update_embeddings(self, name: str, ids: Any, embeddings: Any, weights: Any | None = None) -> int:
        headers = {"content-type": "application/json"}
        content = _json_content(_requests.update_body(ids, embeddings, weights))
        response = self._request("PATCH", f"/v1/indexes/{name}/embeddings", content=content, headers=headers)
        return int(response["version"])

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
        body = _requests.sample_body(queries, num_samples, positives, exclude_positives, sampler, seed, min_version)
        response = self._post_json(f"/v1/indexes/{name}/sample", body, idempotent=True)
        num_positives = len(body["positives"][0]) if body.get("positives") else 0
        return _requests.sample_result_from_json(
            response, len(body["queries"]), int(num_samples), num_positives, output
        )

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
        body = _requests.log_prob_body(queries, ids, sampler, min_version)
        response = self._post_json(f"/v1/indexes/{name}/log-prob", body, idempotent=True)
        num_ids = len(body["ids"][0]) if body["ids"] else 0
        return _requests.log_prob_result_from_json(response, len(body["queries"]), num_ids, output)

    def rebuild(self, name: str, *, mode: str = "kmeans", queries: Any | None = None) -> int:
        return int(self._post_json(f"/v1/indexes/{name}/rebuild", _requests.rebuild_body(mode, queries))["version"])

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RestSamplerClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncRestSamplerClient:
    """asyncio REST client: the methods of `RestSamplerClient` as coroutines, same arguments and results."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        token: str | None = None,
        timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
        retries: int = DEFAULT_RETRIES,
        verify: bool | str = True,
    ) -> None:
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"), headers=_headers(token), timeout=timeout_seconds, verify=verify
        )
        self.timeout_seconds = timeout_seconds
        self.retries = retries

    async def _request(self, method: str, path: str, *, idempotent: bool = False, **kwargs: Any) -> Any:
        attempt = 0
        while True:
            try:
                response = await self._http.request(method, path, **kwargs)
                if response.is_success:
                    return response.json() if response.content else None
                failure = _error_from_response(response)
            except httpx.TransportError as error:
                failure = _error_from_transport(error)
            if not idempotent or failure.code not in RETRYABLE_CODES or attempt >= self.retries:
                raise failure
            logger.warning("retrying after %s (attempt %d of %d)", failure, attempt + 1, self.retries)
            await asyncio.sleep(_backoff_seconds(attempt))
            attempt += 1

    async def _post_json(self, path: str, body: dict[str, Any], *, idempotent: bool = False) -> Any:
        headers = {"content-type": "application/json"}
        return await self._request("POST", path, content=_json_content(body), headers=headers, idempotent=idempotent)

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
        config = _requests.index_config(dim, num_codewords, quantizer, last_stage, metric)
        return info_from_json(await self._request("PUT", f"/v1/indexes/{name}", json=config))

    async def get_index(self, name: str) -> IndexInfo:
        return info_from_json(await self._request("GET", f"/v1/indexes/{name}", idempotent=True))

    async def list_indexes(self) -> list[IndexInfo]:
        body = await self._request("GET", "/v1/indexes", idempotent=True)
        return [info_from_json(info) for info in body["indexes"]]

    async def delete_index(self, name: str) -> None:
        await self._request("DELETE", f"/v1/indexes/{name}")

    async def upload_embeddings(
        self, name: str, embeddings: Any, weights: Any | None = None, *, progress: bool = False
    ) -> int:
        body, content_type, _ = _table_body(embeddings, weights)
        headers = {"content-type": content_type, "content-digest": _content_digest(body)}
        response = await self._request(
            "PUT",
            f"/v1/indexes/{name}/embeddings",
            content=_async_body_chunks(body, progress),
            headers=headers,
        )
        return int(response["version"])

    async def update_embeddings(self, name: str, ids: Any, embeddings: Any, weights: Any | None = None) -> int:
        headers = {"content-type": "application/json"}
        content = _json_content(_requests.update_body(ids, embeddings, weights))
        response = await self._request("PATCH", f"/v1/indexes/{name}/embeddings", content=content, headers=headers)
        return int(response["version"])

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
        body = _requests.sample_body(queries, num_samples, positives, exclude_positives, sampler, seed, min_version)
        response = await self._post_json(f"/v1/indexes/{name}/sample", body, idempotent=True)
        num_positives = len(body["positives"][0]) if body.get("positives") else 0
        return _requests.sample_result_from_json(
            response, len(body["queries"]), int(num_samples), num_positives, output
        )

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
        body = _requests.log_prob_body(queries, ids, sampler, min_version)
        response = await self._post_json(f"/v1/indexes/{name}/log-prob", body, idempotent=True)
        num_ids = len(body["ids"][0]) if body["ids"] else 0
        return _requests.log_prob_result_from_json(response, len(body["queries"]), num_ids, output)

    async def rebuild(self, name: str, *, mode: str = "kmeans", queries: Any | None = None) -> int:
        response = await self._post_json(f"/v1/indexes/{name}/rebuild", _requests.rebuild_body(mode, queries))
        return int(response["version"])

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncRestSamplerClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
