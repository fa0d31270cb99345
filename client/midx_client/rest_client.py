"""REST clients of the sampling service: `RestSamplerClient` (blocking) and `AsyncRestSamplerClient`."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import logging
import re
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import numpy as np

from midx_client import _requests
from midx_client._convert import Output, info_from_json, to_numpy
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


_JSON_HEADERS = {"content-type": "application/json"}
# Headers of the binary form: the body is .npz, and the response is .npz because Accept requests it.
_NPZ_HEADERS = {"content-type": _requests.NPZ_CONTENT_TYPE, "accept": _requests.NPZ_CONTENT_TYPE}


def _is_npz(response: httpx.Response) -> bool:
    media_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
    return media_type == _requests.NPZ_CONTENT_TYPE


def _json_body(response: httpx.Response) -> Any:
    return response.json() if response.content else None


def _sample_result(
    response: httpx.Response, num_rows: int, num_samples: int, num_positives: int, output: Output
) -> SampleResult:
    if _is_npz(response):
        return _requests.sample_result_from_npz(_requests.arrays_from_npz(response.content), output)
    return _requests.sample_result_from_json(response.json(), num_rows, num_samples, num_positives, output)


def _log_prob_result(response: httpx.Response, num_rows: int, num_ids: int, output: Output) -> LogProbResult:
    if _is_npz(response):
        return _requests.log_prob_result_from_npz(_requests.arrays_from_npz(response.content), output)
    return _requests.log_prob_result_from_json(response.json(), num_rows, num_ids, output)


def _sample_request(
    binary: bool,
    queries: Any,
    num_samples: int,
    positives: Any | None,
    exclude_positives: bool,
    sampler: str,
    seed: int | None,
    min_version: int | None,
) -> tuple[dict[str, Any], tuple[int, int]]:
    """Return the keyword arguments of the sample request and the (rows, positives) an empty JSON response needs."""
    query_matrix, positive_ids = _requests.sample_arrays(queries, positives)
    shape = (_rows(query_matrix), _columns(positive_ids))
    if binary:
        content, params = _requests.sample_npz(
            query_matrix, num_samples, positive_ids, exclude_positives, sampler, seed, min_version
        )
        return {"content": content, "params": params, "headers": _NPZ_HEADERS}, shape
    body = _requests.sample_body(query_matrix, num_samples, positive_ids, exclude_positives, sampler, seed, min_version)
    return {"content": _json_content(body), "headers": _JSON_HEADERS}, shape


def _log_prob_request(
    binary: bool, queries: Any, ids: Any, sampler: str, min_version: int | None
) -> tuple[dict[str, Any], tuple[int, int]]:
    """Return the keyword arguments of the log-prob request and the (rows, ids) an empty JSON response needs."""
    query_matrix, id_matrix = to_numpy(queries, "float32"), to_numpy(ids, "int64")
    shape = (_rows(query_matrix), _columns(id_matrix))
    if binary:
        content, params = _requests.log_prob_npz(query_matrix, id_matrix, sampler, min_version)
        return {"content": content, "params": params, "headers": _NPZ_HEADERS}, shape
    body = _requests.log_prob_body(query_matrix, id_matrix, sampler, min_version)
    return {"content": _json_content(body), "headers": _JSON_HEADERS}, shape


def _rows(array: np.ndarray) -> int:
    return int(array.shape[0]) if array.ndim else 0


def _columns(array: np.ndarray | None) -> int:
    """Return the ids per query of a (B, P) or (B,) id array: P, 1, or 0 without ids."""
    if array is None or array.ndim == 0:
        return 0
    return int(array.shape[1]) if array.ndim == 2 else 1


def _update_request(binary: bool, ids: Any, embeddings: Any, weights: Any | None) -> dict[str, Any]:
    if binary:
        return {"content": _requests.update_npz(ids, embeddings, weights), "headers": _NPZ_HEADERS}
    return {"content": _json_content(_requests.update_body(ids, embeddings, weights)), "headers": _JSON_HEADERS}


class RestSamplerClient:
    """Blocking REST client; the same methods and results as `SamplerClient`.

    base_url: "http://host:port" of the REST front end. token: the bearer token when the server
    requires one. timeout_seconds: timeout of each call. retries: extra attempts, with exponential
    backoff, for idempotent calls (get, list, sample, log-prob) that fail with 503 or cannot connect.
    binary: send sample, log-prob and update bodies as .npz files and request .npz responses, which
    skips JSON's text conversion of every number; False sends and receives JSON.
    """

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        token: str | None = None,
        timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
        retries: int = DEFAULT_RETRIES,
        verify: bool | str = True,
        binary: bool = True,
    ) -> None:
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"), headers=_headers(token), timeout=timeout_seconds, verify=verify
        )
        self.timeout_seconds = timeout_seconds
        self.retries = retries
        self.binary = binary

    def _request(self, method: str, path: str, *, idempotent: bool = False, **kwargs: Any) -> Any:
        return _json_body(self._send(method, path, idempotent=idempotent, **kwargs))

    def _send(self, method: str, path: str, *, idempotent: bool = False, **kwargs: Any) -> httpx.Response:
        attempt = 0
        while True:
            try:
                response = self._http.request(method, path, **kwargs)
                if response.is_success:
                    return response
                failure = _error_from_response(response)
            except httpx.TransportError as error:
                failure = _error_from_transport(error)
            if not idempotent or failure.code not in RETRYABLE_CODES or attempt >= self.retries:
                raise failure
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
        config = _requests.index_config(dim, num_codewords, quantizer, last_stage, metric)
        return info_from_json(self._request("PUT", f"/v1/indexes/{_quote(name)}", json=config))

    def get_index(self, name: str) -> IndexInfo:
        return info_from_json(self._request("GET", f"/v1/indexes/{_quote(name)}", idempotent=True))

    def list_indexes(self) -> list[IndexInfo]:
        body = self._request("GET", "/v1/indexes", idempotent=True)
        return [info_from_json(info) for info in body["indexes"]]

    def delete_index(self, name: str) -> None:
        self._request("DELETE", f"/v1/indexes/{_quote(name)}")

    def upload_embeddings(
        self, name: str, embeddings: Any, weights: Any | None = None, *, progress: bool = False
    ) -> int:
        """Upload the (N, D) table and optional (N,) weights as one binary body; return the version."""
        body, content_type, _ = _table_body(embeddings, weights)
        headers = {"content-type": content_type, "content-digest": _content_digest(body)}
        response = self._request(
            "PUT", f"/v1/indexes/{_quote(name)}/embeddings", content=_body_chunks(body, progress), headers=headers
        )
        return int(response["version"])

    def update_embeddings(self, name: str, ids: Any, embeddings: Any, weights: Any | None = None) -> int:
        request = _update_request(self.binary, ids, embeddings, weights)
        return int(self._request("PATCH", f"/v1/indexes/{_quote(name)}/embeddings", **request)["version"])

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
        request, (rows, num_positives) = _sample_request(
            self.binary, queries, num_samples, positives, exclude_positives, sampler, seed, min_version
        )
        response = self._send("POST", f"/v1/indexes/{_quote(name)}/sample", idempotent=True, **request)
        return _sample_result(response, rows, int(num_samples), num_positives, output)

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
        request, (rows, num_ids) = _log_prob_request(self.binary, queries, ids, sampler, min_version)
        response = self._send("POST", f"/v1/indexes/{_quote(name)}/log-prob", idempotent=True, **request)
        return _log_prob_result(response, rows, num_ids, output)

    def rebuild(self, name: str, *, mode: str = "kmeans", queries: Any | None = None) -> int:
        content = _json_content(_requests.rebuild_body(mode, queries))
        response = self._request("POST", f"/v1/indexes/{_quote(name)}/rebuild", content=content, headers=_JSON_HEADERS)
        return int(response["version"])

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
        binary: bool = True,
    ) -> None:
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"), headers=_headers(token), timeout=timeout_seconds, verify=verify
        )
        self.timeout_seconds = timeout_seconds
        self.retries = retries
        self.binary = binary

    async def _request(self, method: str, path: str, *, idempotent: bool = False, **kwargs: Any) -> Any:
        return _json_body(await self._send(method, path, idempotent=idempotent, **kwargs))

    async def _send(self, method: str, path: str, *, idempotent: bool = False, **kwargs: Any) -> httpx.Response:
        attempt = 0
        while True:
            try:
                response = await self._http.request(method, path, **kwargs)
                if response.is_success:
                    return response
                failure = _error_from_response(response)
            except httpx.TransportError as error:
                failure = _error_from_transport(error)
            if not idempotent or failure.code not in RETRYABLE_CODES or attempt >= self.retries:
                raise failure
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
        config = _requests.index_config(dim, num_codewords, quantizer, last_stage, metric)
        return info_from_json(await self._request("PUT", f"/v1/indexes/{_quote(name)}", json=config))

    async def get_index(self, name: str) -> IndexInfo:
        return info_from_json(await self._request("GET", f"/v1/indexes/{_quote(name)}", idempotent=True))

    async def list_indexes(self) -> list[IndexInfo]:
        body = await self._request("GET", "/v1/indexes", idempotent=True)
        return [info_from_json(info) for info in body["indexes"]]

    async def delete_index(self, name: str) -> None:
        await self._request("DELETE", f"/v1/indexes/{_quote(name)}")

    async def upload_embeddings(
        self, name: str, embeddings: Any, weights: Any | None = None, *, progress: bool = False
    ) -> int:
        body, content_type, _ = _table_body(embeddings, weights)
        headers = {"content-type": content_type, "content-digest": _content_digest(body)}
        response = await self._request(
            "PUT",
            f"/v1/indexes/{_quote(name)}/embeddings",
            content=_async_body_chunks(body, progress),
            headers=headers,
        )
        return int(response["version"])

    async def update_embeddings(self, name: str, ids: Any, embeddings: Any, weights: Any | None = None) -> int:
        request = _update_request(self.binary, ids, embeddings, weights)
        return int((await self._request("PATCH", f"/v1/indexes/{_quote(name)}/embeddings", **request))["version"])

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
        request, (rows, num_positives) = _sample_request(
            self.binary, queries, num_samples, positives, exclude_positives, sampler, seed, min_version
        )
        response = await self._send("POST", f"/v1/indexes/{_quote(name)}/sample", idempotent=True, **request)
        return _sample_result(response, rows, int(num_samples), num_positives, output)

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
        request, (rows, num_ids) = _log_prob_request(self.binary, queries, ids, sampler, min_version)
        response = await self._send("POST", f"/v1/indexes/{_quote(name)}/log-prob", idempotent=True, **request)
        return _log_prob_result(response, rows, num_ids, output)

    async def rebuild(self, name: str, *, mode: str = "kmeans", queries: Any | None = None) -> int:
        content = _json_content(_requests.rebuild_body(mode, queries))
        path = f"/v1/indexes/{_quote(name)}/rebuild"
        response = await self._request("POST", path, content=content, headers=_JSON_HEADERS)
        return int(response["version"])

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncRestSamplerClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def _quote(name: str) -> str:
    """Check an index name as the server does and percent-encode it for a URL path.

    A '/', '?' or '#' in a name would otherwise change the route and reach another index.
    """
    if not isinstance(name, str) or not _NAME_PATTERN.match(name):
        raise SamplerError(
            "invalid_argument",
            f"index name {name!r} is invalid; use 1 to 128 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit",
        )
    return urllib.parse.quote(name, safe="")
