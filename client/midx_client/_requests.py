"""Request building and response parsing shared by the sync and async clients of each transport."""

from __future__ import annotations

import io
import zipfile
from typing import Any

import numpy as np

from midx_client._convert import (
    Output,
    as_output,
    floats_from_json,
    tensor_from_proto,
    tensor_to_proto,
    to_numpy,
)
from midx_client._proto import sampler_pb2 as _pb
from midx_client.errors import SamplerError
from midx_client.types import LogProbResult, SampleResult

DEFAULT_CHUNK_BYTES = 4 * 1024 * 1024
NPZ_CONTENT_TYPE = "application/x-npz"


def index_config(dim: int, num_codewords: int, quantizer: str, last_stage: str, metric: str) -> dict[str, Any]:
    return {
        "dim": dim,
        "num_codewords": num_codewords,
        "quantizer": quantizer,
        "last_stage": last_stage,
        "metric": metric,
    }


def table_arrays(embeddings: Any, weights: Any | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Return the table as float32 and the weights as float64 (the core keeps weights in float64)."""
    table = to_numpy(embeddings, "float32")
    weight_vector = None if weights is None else to_numpy(weights, "float64")
    return table, weight_vector


def chunk_rows(table: np.ndarray, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Return how many rows of `table` fit in one upload chunk of about `chunk_bytes`."""
    row_bytes = max(1, table.itemsize * (table.shape[1] if table.ndim == 2 else 1))
    return max(1, chunk_bytes // row_bytes)


def sample_arrays(queries: Any, positives: Any | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Return queries as float32 and positives as int64, a (B,) vector as (B, 1): one positive per query."""
    positive_ids = None if positives is None else to_numpy(positives, "int64")
    if positive_ids is not None and positive_ids.ndim == 1:
        positive_ids = positive_ids.reshape(-1, 1)
    return to_numpy(queries, "float32"), positive_ids


# ------------------------------------------------------------------------------------------ protobuf


def sample_request(
    name: str,
    queries: Any,
    num_samples: int,
    positives: Any | None,
    exclude_positives: bool,
    sampler: str,
    seed: int | None,
    min_version: int | None,
) -> _pb.SampleRequest:
    query_matrix, positive_ids = sample_arrays(queries, positives)
    request = _pb.SampleRequest(
        name=name,
        queries=tensor_to_proto(query_matrix),
        num_samples=int(num_samples),
        exclude_positives=bool(exclude_positives),
        sampler=sampler,
        seed=seed,
        min_version=min_version,
    )
    if positive_ids is not None:
        request.positives.CopyFrom(tensor_to_proto(positive_ids))
    return request


def sample_result_from_proto(response: _pb.SampleResponse, output: Output) -> SampleResult:
    positive_log_q = None
    if response.HasField("positive_log_q"):
        positive_log_q = as_output(tensor_from_proto(response.positive_log_q), output)
    return SampleResult(
        ids=as_output(tensor_from_proto(response.ids), output),
        log_q=as_output(tensor_from_proto(response.log_q), output),
        positive_log_q=positive_log_q,
        version=int(response.version),
    )


def log_prob_request(name: str, queries: Any, ids: Any, sampler: str, min_version: int | None) -> _pb.LogProbRequest:
    return _pb.LogProbRequest(
        name=name,
        queries=tensor_to_proto(to_numpy(queries, "float32")),
        ids=tensor_to_proto(to_numpy(ids, "int64")),
        sampler=sampler,
        min_version=min_version,
    )


def log_prob_result_from_proto(response: _pb.LogProbResponse, output: Output) -> LogProbResult:
    return LogProbResult(log_q=as_output(tensor_from_proto(response.log_q), output), version=int(response.version))


def rebuild_request(name: str, mode: str, queries: Any | None) -> _pb.RebuildRequest:
    request = _pb.RebuildRequest(name=name, mode=mode)
    if queries is not None:
        request.queries.CopyFrom(tensor_to_proto(to_numpy(queries, "float32")))
    return request


def update_request(name: str, ids: Any, embeddings: Any, weights: Any | None) -> _pb.UpdateEmbeddingsRequest:
    request = _pb.UpdateEmbeddingsRequest(
        name=name,
        ids=tensor_to_proto(to_numpy(ids, "int64")),
        embeddings=tensor_to_proto(to_numpy(embeddings, "float32")),
    )
    if weights is not None:
        request.weights.CopyFrom(tensor_to_proto(to_numpy(weights, "float64")))
    return request


# ---------------------------------------------------------------------------------------------- JSON


def sample_body(
    queries: Any,
    num_samples: int,
    positives: Any | None,
    exclude_positives: bool,
    sampler: str,
    seed: int | None,
    min_version: int | None,
) -> dict[str, Any]:
    query_matrix, positive_ids = sample_arrays(queries, positives)
    body: dict[str, Any] = {
        "queries": query_matrix.tolist(),
        "num_samples": int(num_samples),
        "exclude_positives": bool(exclude_positives),
        "sampler": sampler,
    }
    if positive_ids is not None:
        body["positives"] = positive_ids.tolist()
    if seed is not None:
        body["seed"] = int(seed)
    if min_version is not None:
        body["min_version"] = int(min_version)
    return body


def _matrix_from_json(values: Any, num_rows: int, num_columns: int, dtype: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.int64) if dtype == "int64" else floats_from_json(values)
    # An empty JSON list loses the column count, so the expected shape is restored here.
    return array.reshape(num_rows, num_columns) if array.size == 0 else array


def sample_result_from_json(
    body: dict[str, Any], num_rows: int, num_samples: int, num_positives: int, output: Output
) -> SampleResult:
    positive_log_q = None
    if body.get("positive_log_q") is not None:
        positive_log_q = as_output(
            _matrix_from_json(body["positive_log_q"], num_rows, num_positives, "float32"), output
        )
    return SampleResult(
        ids=as_output(_matrix_from_json(body["ids"], num_rows, num_samples, "int64"), output),
        log_q=as_output(_matrix_from_json(body["log_q"], num_rows, num_samples, "float32"), output),
        positive_log_q=positive_log_q,
        version=int(body["version"]),
    )


def log_prob_body(queries: Any, ids: Any, sampler: str, min_version: int | None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "queries": to_numpy(queries, "float32").tolist(),
        "ids": to_numpy(ids, "int64").tolist(),
        "sampler": sampler,
    }
    if min_version is not None:
        body["min_version"] = int(min_version)
    return body


def log_prob_result_from_json(body: dict[str, Any], num_rows: int, num_ids: int, output: Output) -> LogProbResult:
    log_q = _matrix_from_json(body["log_q"], num_rows, num_ids, "float32")
    return LogProbResult(log_q=as_output(log_q, output), version=int(body["version"]))


def rebuild_body(mode: str, queries: Any | None) -> dict[str, Any]:
    body: dict[str, Any] = {"mode": mode}
    if queries is not None:
        body["queries"] = to_numpy(queries, "float32").tolist()
    return body


def update_body(ids: Any, embeddings: Any, weights: Any | None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "ids": to_numpy(ids, "int64").tolist(),
        "embeddings": to_numpy(embeddings, "float32").tolist(),
    }
    if weights is not None:
        body["weights"] = to_numpy(weights, "float64").tolist()
    return body


# ----------------------------------------------------------------------------------------------- .npz


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """Return `arrays` as an uncompressed .npz file."""
    buffer = io.BytesIO()
    np.savez(buffer, allow_pickle=False, **arrays)
    return buffer.getvalue()


def arrays_from_npz(content: bytes) -> dict[str, np.ndarray]:
    try:
        with np.load(io.BytesIO(content), allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise SamplerError("internal", f"the server's .npz response is not a valid .npz file: {error}") from None


def sample_npz(
    queries: Any,
    num_samples: int,
    positives: Any | None,
    exclude_positives: bool,
    sampler: str,
    seed: int | None,
    min_version: int | None,
) -> tuple[bytes, dict[str, str]]:
    """Return the .npz sample body (queries, positives) and its options as query parameters."""
    query_matrix, positive_ids = sample_arrays(queries, positives)
    arrays = {"queries": query_matrix}
    if positive_ids is not None:
        arrays["positives"] = positive_ids
    params = {
        "num_samples": str(int(num_samples)),
        "exclude_positives": "true" if exclude_positives else "false",
        "sampler": sampler,
    }
    if seed is not None:
        params["seed"] = str(int(seed))
    if min_version is not None:
        params["min_version"] = str(int(min_version))
    return npz_bytes(arrays), params


def sample_result_from_npz(arrays: dict[str, np.ndarray], output: Output) -> SampleResult:
    positive_log_q = arrays.get("positive_log_q")
    return SampleResult(
        ids=as_output(arrays["ids"], output),
        log_q=as_output(arrays["log_q"], output),
        positive_log_q=None if positive_log_q is None else as_output(positive_log_q, output),
        version=int(arrays["version"]),
    )


def log_prob_npz(queries: Any, ids: Any, sampler: str, min_version: int | None) -> tuple[bytes, dict[str, str]]:
    """Return the .npz log-prob body (queries, ids) and its options as query parameters."""
    arrays = {"queries": to_numpy(queries, "float32"), "ids": to_numpy(ids, "int64")}
    params = {"sampler": sampler}
    if min_version is not None:
        params["min_version"] = str(int(min_version))
    return npz_bytes(arrays), params


def log_prob_result_from_npz(arrays: dict[str, np.ndarray], output: Output) -> LogProbResult:
    return LogProbResult(log_q=as_output(arrays["log_q"], output), version=int(arrays["version"]))


def update_npz(ids: Any, embeddings: Any, weights: Any | None) -> bytes:
    arrays = {"ids": to_numpy(ids, "int64"), "embeddings": to_numpy(embeddings, "float32")}
    if weights is not None:
        arrays["weights"] = to_numpy(weights, "float64")
    return npz_bytes(arrays)
