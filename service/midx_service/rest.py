"""The REST front end (FastAPI): translates HTTP requests to `SamplerService` calls and back."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal, TypeVar

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from midx_service.arrays import (
    NPY_CONTENT_TYPE,
    NPZ_CONTENT_TYPE,
    from_json,
    json_floats,
    load_npy,
    load_npz,
    save_npz,
)
from midx_service.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    MidxError,
    NotFoundError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from midx_service.registry import IndexState
from midx_service.reports import QualityMeasurement, RefitReport
from midx_service.service import SamplerService

logger = logging.getLogger(__name__)

ModelT = TypeVar("ModelT", bound=BaseModel)
SamplerName = Literal["midx", "uniform", "unigram", "exact"]

JSON_CONTENT_TYPE = "application/json"

# The one exception-to-status mapping of the REST transport.
HTTP_STATUS = {
    InvalidArgumentError: 400,
    UnauthenticatedError: 401,
    NotFoundError: 404,
    AlreadyExistsError: 409,
    FailedPreconditionError: 409,
    ResourceExhaustedError: 413,
    UnavailableError: 503,
}


def http_status(error: MidxError) -> int:
    for kind, status in HTTP_STATUS.items():
        if isinstance(error, kind):
            return status
    return 500


# ------------------------------------------------------------------------------------------ schemas


class ErrorDetail(BaseModel):
    code: str = Field(description="canonical code, e.g. invalid_argument, not_found, failed_precondition")
    message: str = Field(description="what was expected, what came, and how to fix it")


class ErrorBody(BaseModel):
    error: ErrorDetail


class CreateIndexBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dim: int = Field(description="dimension D of the class embeddings and queries")
    num_codewords: int = Field(64, description="codewords K per codebook")
    quantizer: Literal["rq", "pq"] = "rq"
    last_stage: Literal["uniform", "popularity"] = "uniform"
    metric: Literal["dot", "cosine"] = "dot"
    unigram_alpha: float = Field(0.75, description="exponent of the unigram baseline")


class ProposalQualityBody(BaseModel):
    version: int = Field(description="the index version measured")
    measured_at: float = Field(description="Unix time of the measurement, in seconds")
    num_queries: int = Field(description="recent queries kl and effective_sample_fraction were measured on")
    kl: float | None = Field(
        description="mean KL(P || Q) in nats; null without queries, or when infinite (num_queries > 0)"
    )
    kl_at_fit: float | None = Field(description="the KL measured first after the current codebooks were fitted")
    effective_sample_fraction: float | None = Field(description="mean effective sample size per draw, in [0, 1]")
    empty_cell_fraction: float = Field(description="share of the K * K cells that hold no class")
    largest_cell_fraction: float = Field(description="share of all classes held by the most populated cell")
    quantization_error_ratio: float = Field(description="quantisation error over the one at the last fit")
    codeword_drift: float = Field(description="mean codeword-to-assigned-mean distance over the mean codeword norm")


class RefitReportBody(BaseModel):
    mode: Literal["kmeans", "kl"]
    trigger: Literal["request", "quantization_error", "kl"]
    accepted: bool = Field(description="false when a kl refit did not lower the held-out KL and nothing changed")
    version: int = Field(description="version containing the result, or the unchanged version when not accepted")
    seconds: float
    heldout_kl_before: float | None = Field(None, description="mean KL(P || Q) on held-out queries before (kl)")
    heldout_kl_after: float | None = Field(None, description="the same with the codebooks kept (kl)")
    num_queries: int = Field(0, description="queries a kl refit learned from and validated on")
    finished_at: float = Field(description="Unix time in seconds")


class IndexInfoBody(BaseModel):
    name: str
    dim: int
    num_codewords: int
    quantizer: str
    last_stage: str
    metric: str
    unigram_alpha: float
    num_classes: int
    version: int
    status: Literal["empty", "building", "ready", "failed"]
    quantization_error: float
    fit_quantization_error: float
    device: str
    error: str = Field("", description="why the last build failed, when status is failed")
    codebook_fit: Literal["kmeans", "kl"] = Field("kmeans", description="how the current codebooks were fitted")
    quality: ProposalQualityBody | None = Field(None, description="last background measurement; null before one")
    last_refit: RefitReportBody | None = Field(None, description="the last finished refit; null before one")


class IndexListBody(BaseModel):
    indexes: list[IndexInfoBody]


class UploadEmbeddingsBody(BaseModel):
    embeddings: list[list[float]] = Field(description="(N, D) class embeddings")
    weights: list[float] | None = Field(None, description="(N,) class weights >= 0")


class UpdateEmbeddingsBody(BaseModel):
    ids: list[int] = Field(description="(U,) row ids; num_classes, num_classes + 1, ... append rows")
    embeddings: list[list[float]] = Field(description="(U, D) new rows")
    weights: list[float] | None = Field(None, description="(U,) new weights")


class VersionBody(BaseModel):
    version: int


class RebuildBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # A plain string, so an unknown mode is rejected by the service with 400 like on gRPC, not with 422.
    mode: str = Field("kmeans", description='"kmeans" (warm-started k-means) or "kl" (learned to lower KL(P || Q))')
    queries: list[list[float]] | None = Field(
        None, description="(R, D) queries a kl refit learns from; default: the index's recent served queries"
    )


class SampleBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    queries: list[list[float]] = Field(description="(B, D) query vectors")
    num_samples: int = Field(description="classes M drawn per query")
    positives: list[list[int]] | None = Field(None, description="(B, P) ids whose log Q is returned")
    exclude_positives: bool = Field(False, description="never draw a query's positives")
    sampler: SamplerName = "midx"
    seed: int | None = Field(None, description="makes the draws reproducible")
    min_version: int | None = Field(None, description="wait (bounded) until the index has this version")


class SampleResponseBody(BaseModel):
    ids: list[list[int]] = Field(description="(B, M) drawn class ids")
    log_q: list[list[float | None]] = Field(description="(B, M) normalised log Q; null stands for -inf")
    positive_log_q: list[list[float | None]] | None = Field(None, description="(B, P) log Q of the positives")
    version: int


class LogProbBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    queries: list[list[float]] = Field(description="(B, D) query vectors")
    ids: list[list[int]] = Field(description="(B, P) class ids")
    sampler: SamplerName = "midx"
    min_version: int | None = None


class LogProbResponseBody(BaseModel):
    log_q: list[list[float | None]] = Field(description="(B, P) normalised log Q; null stands for -inf")
    version: int


def _error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    descriptions = {
        400: "invalid input (bad shape, dtype, NaN/Inf, out-of-range id or option)",
        401: "missing or wrong bearer token",
        404: "unknown index",
        409: "index exists already, has no table yet, or min_version was not reached in time",
        413: "body, table, batch or num_samples above its configured limit (the message names the setting)",
        422: "body does not match the schema",
        503: "index is building its first table, or persistence is unavailable",
    }
    return {status: {"model": ErrorBody, "description": descriptions[status]} for status in statuses}


def _binary_body_doc(
    description: str, arrays: str, binary_types: tuple[str, ...] = (NPY_CONTENT_TYPE, NPZ_CONTENT_TYPE)
) -> dict[str, Any]:
    """Return the OpenAPI request body of a route that takes the JSON model `arrays` or a binary file."""
    content: dict[str, Any] = {JSON_CONTENT_TYPE: {"schema": {"$ref": f"#/components/schemas/{arrays}"}}}
    for media_type in binary_types:
        content[media_type] = {"schema": {"type": "string", "format": "binary"}}
    return {"requestBody": {"required": True, "description": description, "content": content}}


def _npz_response_doc(description: str) -> dict[int | str, dict[str, Any]]:
    """Return the OpenAPI entry of a 200 response that is .npz when the Accept header requests it."""
    return {
        200: {
            "description": description,
            "content": {NPZ_CONTENT_TYPE: {"schema": {"type": "string", "format": "binary"}}},
        }
    }


def _add_body_schemas(app: FastAPI, models: tuple[type[BaseModel], ...]) -> None:
    """Add to the OpenAPI components the JSON body models that only `_binary_body_doc` refers to."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in models:
            schemas.setdefault(model.__name__, model.model_json_schema(ref_template="#/components/schemas/{model}"))
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _info_body(state: IndexState) -> dict[str, Any]:
    config = state.config
    return {
        "name": state.name,
        "dim": config.dim,
        "num_codewords": config.num_codewords,
        "quantizer": config.quantizer,
        "last_stage": config.last_stage,
        "metric": config.metric,
        "unigram_alpha": config.unigram_alpha,
        "num_classes": state.num_classes,
        "version": state.version,
        "status": state.status.value,
        "quantization_error": state.quantization_error,
        "fit_quantization_error": state.fit_quantization_error,
        "device": state.device,
        "error": state.error,
        "codebook_fit": state.codebook_fit,
        "quality": None if state.quality is None else _quality_body(state.quality),
        "last_refit": None if state.last_refit is None else _refit_report_body(state.last_refit),
    }


def _finite_or_none(value: float | None) -> float | None:
    # JSON has no infinities: an infinite KL travels as null, distinguished from "not measured" by num_queries.
    return value if value is not None and math.isfinite(value) else None


def _quality_body(measurement: QualityMeasurement) -> dict[str, Any]:
    quality = measurement.quality
    return {
        "version": measurement.version,
        "measured_at": measurement.measured_at,
        "num_queries": quality.num_queries,
        "kl": _finite_or_none(quality.kl),
        "kl_at_fit": _finite_or_none(measurement.kl_at_fit),
        "effective_sample_fraction": _finite_or_none(quality.effective_sample_fraction),
        "empty_cell_fraction": quality.empty_cell_fraction,
        "largest_cell_fraction": quality.largest_cell_fraction,
        "quantization_error_ratio": quality.quantization_error_ratio,
        "codeword_drift": quality.codeword_drift,
    }


def _refit_report_body(report: RefitReport) -> dict[str, Any]:
    return {
        "mode": report.mode,
        "trigger": report.trigger,
        "accepted": report.accepted,
        "version": report.version,
        "seconds": report.seconds,
        "heldout_kl_before": _finite_or_none(report.heldout_kl_before),
        "heldout_kl_after": _finite_or_none(report.heldout_kl_after),
        "num_queries": report.num_queries,
        "finished_at": report.finished_at,
    }


def _error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    if status == 401:
        headers = {**(headers or {}), "www-authenticate": "Bearer"}
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


# Error codes of the HTTP errors the framework raises itself (unknown route, wrong method).
_HTTP_ERROR_CODES = {404: "not_found", 405: "method_not_allowed"}


# ---------------------------------------------------------------------------------------- bodies


async def _read_body(request: Request, limit: int) -> bytes:
    """Return the request body, raising ResourceExhaustedError as soon as it passes `limit` bytes.

    A body sent with chunked transfer encoding has no Content-Length, so its size is counted while
    it is read, and reading stops at the first chunk past the limit.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ResourceExhaustedError(
            f"the body is {declared} bytes, above the limit of {limit} bytes; send a smaller body or raise "
            "the limit with MIDX_MAX_BODY_BYTES (--max-body-bytes)"
        )
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ResourceExhaustedError(
                f"the body is more than {limit} bytes, above the limit; send a smaller body or raise the "
                "limit with MIDX_MAX_BODY_BYTES (--max-body-bytes)"
            )
    return bytes(body)


def _check_digest(request: Request, body: bytes) -> None:
    """Reject the body when its Content-Digest (RFC 9530) sha-256 does not match."""
    header = request.headers.get("content-digest")
    if header is None:
        return
    for item in header.split(","):
        algorithm, _, value = item.strip().partition("=")
        if algorithm.strip().lower() != "sha-256":
            continue
        try:
            expected = base64.b64decode(value.strip().strip(":"), validate=True)
        except (binascii.Error, ValueError):
            raise InvalidArgumentError(f"Content-Digest {header!r} is not valid base64") from None
        if not hmac.compare_digest(expected, hashlib.sha256(body).digest()):
            raise InvalidArgumentError(
                "the body's SHA-256 does not match its Content-Digest header; the upload was corrupted, send it again"
            )
        return


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", JSON_CONTENT_TYPE).split(";")[0].strip().lower()


def _accepts_npz(request: Request) -> bool:
    """True when the Accept header ranks application/x-npz at least as high as application/json.

    A missing Accept header and wildcards such as */* get JSON, so only a client that names
    application/x-npz gets the binary form.
    """
    quality = {NPZ_CONTENT_TYPE: 0.0, JSON_CONTENT_TYPE: 0.0}
    for item in request.headers.get("accept", "").split(","):
        media_type, *parameters = (part.strip().lower() for part in item.split(";"))
        if media_type not in quality:
            continue
        weight = 1.0
        for parameter in parameters:
            key, _, value = parameter.partition("=")
            if key.strip() == "q":
                try:
                    weight = float(value)
                except ValueError:
                    weight = 0.0
        quality[media_type] = max(quality[media_type], weight)
    return quality[NPZ_CONTENT_TYPE] > 0 and quality[NPZ_CONTENT_TYPE] >= quality[JSON_CONTENT_TYPE]


def _parse_model(model: type[ModelT], body: bytes) -> ModelT:
    """Return the JSON `body` validated against `model`; a mismatch is a 422, as for FastAPI's own bodies."""
    values = _parse_json(body)
    try:
        return model.model_validate(values)
    except ValidationError as error:
        problems = [{**problem, "loc": ("body", *problem["loc"])} for problem in error.errors()]
        raise RequestValidationError(problems) from None


def _reject_query_options(request: Request, names: tuple[str, ...]) -> None:
    given = sorted(set(request.query_params) & set(names))
    if given:
        raise InvalidArgumentError(
            f"query parameters {given} are read only with an {NPZ_CONTENT_TYPE} body; put them in the JSON body instead"
        )


def _check_array_media_type(request: Request) -> str:
    media_type = _media_type(request)
    if media_type not in (JSON_CONTENT_TYPE, NPZ_CONTENT_TYPE):
        raise InvalidArgumentError(
            f"Content-Type {media_type!r} is not supported; send {JSON_CONTENT_TYPE} or {NPZ_CONTENT_TYPE}"
        )
    return media_type


async def _array_response(request: Request, arrays: dict[str, np.ndarray | None], version: int) -> Response:
    """Return `arrays` and `version` as .npz when the Accept header requests it, else as JSON.

    An array that is None is left out of an .npz response and is null in JSON. Float arrays keep -inf
    in .npz and carry it as null in JSON. Building JSON for a large batch takes tens of milliseconds,
    so it runs on a worker thread while the event loop serves health checks.
    """
    headers = {"vary": "accept"}
    present = {key: array for key, array in arrays.items() if array is not None}
    if _accepts_npz(request):
        content = save_npz({**present, "version": np.asarray(version, dtype=np.int64)})
        return Response(content, media_type=NPZ_CONTENT_TYPE, headers=headers)
    content = await run_in_threadpool(_json_response_body, arrays, version)
    return Response(content, media_type=JSON_CONTENT_TYPE, headers=headers)


def _json_response_body(arrays: dict[str, np.ndarray | None], version: int) -> bytes:
    body: dict[str, Any] = {}
    for key, array in arrays.items():
        if array is None:
            body[key] = None
        else:
            body[key] = json_floats(array) if array.dtype.kind == "f" else array.tolist()
    body["version"] = version
    return json.dumps(body, allow_nan=False, separators=(",", ":")).encode()


_SAMPLE_QUERY_OPTIONS = ("num_samples", "exclude_positives", "sampler", "seed", "min_version")
_LOG_PROB_QUERY_OPTIONS = ("sampler", "min_version")


def _sample_arguments_from_json(body: bytes) -> tuple[np.ndarray, int, dict[str, Any]]:
    """Return the queries, num_samples and the keyword options of `SamplerService.sample`."""
    parsed = _parse_model(SampleBody, body)
    options = {
        "positives": None if parsed.positives is None else from_json(parsed.positives, "positives", np.int64),
        "exclude_positives": parsed.exclude_positives,
        "sampler": parsed.sampler,
        "seed": parsed.seed,
        "min_version": parsed.min_version,
    }
    return from_json(parsed.queries, "queries", np.float32), parsed.num_samples, options


def _log_prob_arguments_from_json(body: bytes) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Return the queries, the ids and the keyword options of `SamplerService.log_prob`."""
    parsed = _parse_model(LogProbBody, body)
    options = {"sampler": parsed.sampler, "min_version": parsed.min_version}
    return from_json(parsed.queries, "queries", np.float32), from_json(parsed.ids, "ids", np.int64), options


def _parse_json(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError) as error:
        raise InvalidArgumentError(f"the body is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise InvalidArgumentError(f"the body must be a JSON object, got {type(value).__name__}")
    return value


def _table_arrays(request: Request, body: bytes) -> tuple[np.ndarray, np.ndarray | None]:
    media_type = _media_type(request)
    if media_type == NPY_CONTENT_TYPE:
        return load_npy(body, "embeddings"), None
    if media_type == NPZ_CONTENT_TYPE:
        arrays = load_npz(body, ("embeddings", "weights"), ("embeddings",))
        return arrays["embeddings"], arrays.get("weights")
    if media_type == "application/json":
        values = _parse_json(body)
        _check_keys(values, required=("embeddings",), optional=("weights",))
        weights = values.get("weights")
        return (
            from_json(values["embeddings"], "embeddings", np.float32),
            None if weights is None else from_json(weights, "weights", np.float64),
        )
    raise InvalidArgumentError(
        f"Content-Type {media_type!r} is not supported; send application/json, {NPY_CONTENT_TYPE} or {NPZ_CONTENT_TYPE}"
    )


def _update_arrays(request: Request, body: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    media_type = _media_type(request)
    if media_type == NPZ_CONTENT_TYPE:
        arrays = load_npz(body, ("ids", "embeddings", "weights"), ("ids", "embeddings"))
        return arrays["ids"], arrays["embeddings"], arrays.get("weights")
    if media_type == "application/json":
        values = _parse_json(body)
        _check_keys(values, required=("ids", "embeddings"), optional=("weights",))
        weights = values.get("weights")
        return (
            from_json(values["ids"], "ids", np.int64),
            from_json(values["embeddings"], "embeddings", np.float32),
            None if weights is None else from_json(weights, "weights", np.float64),
        )
    raise InvalidArgumentError(
        f"Content-Type {media_type!r} is not supported; send application/json or {NPZ_CONTENT_TYPE}"
    )


def _check_keys(values: dict[str, Any], *, required: tuple[str, ...], optional: tuple[str, ...]) -> None:
    missing = [key for key in required if key not in values]
    unknown = sorted(set(values) - set(required) - set(optional))
    if missing or unknown:
        raise InvalidArgumentError(
            f"the body must have fields {list(required)} and may have {list(optional)}; "
            f"missing {missing}, unknown {unknown}"
        )


# ------------------------------------------------------------------------------------------- app


def create_app(service: SamplerService, *, is_stopping: Callable[[], bool] = lambda: False) -> FastAPI:
    """Return the FastAPI app of `service`; `is_stopping` makes /readyz fail during a graceful stop."""
    settings = service.settings
    metrics = service.metrics
    token = settings.token
    app = FastAPI(
        title="MIDX sampling service",
        version="1",
        description="Adaptive negative sampling (MIDX) over named, versioned class-embedding indexes.",
    )

    async def require_token(request: Request) -> None:
        if token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, received = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(received.strip().encode(), token.encode()):
            raise UnauthenticatedError(
                "missing or wrong bearer token; send the header 'Authorization: Bearer <MIDX_API_TOKEN>'"
            )

    @app.exception_handler(MidxError)
    async def _midx_error(request: Request, error: MidxError) -> JSONResponse:
        status = http_status(error)
        if status >= 500 and not isinstance(error, UnavailableError):
            logger.error("%s %s failed: %s", request.method, request.url.path, error)
        else:
            logger.debug("%s %s rejected with %d: %s", request.method, request.url.path, status, error)
        return _error_response(status, error.code, str(error))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        # Unknown routes and methods get the same error body as the service's own errors.
        code = _HTTP_ERROR_CODES.get(error.status_code, "http_error")
        message = f"{request.method} {request.url.path}: {error.detail}"
        return _error_response(error.status_code, code, message, dict(error.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in problem['loc'])}: {problem['msg']}" for problem in error.errors()[:5]
        )
        return _error_response(422, "invalid_argument", f"the body does not match the schema: {problems}")

    @app.middleware("http")
    async def _observe(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        started = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception as error:
            # Handled here and not by an exception handler for Exception, because Starlette re-raises
            # after such a handler and uvicorn then closes the keep-alive connection under the client.
            logger.exception("%s %s failed unexpectedly", request.method, request.url.path)
            response = _error_response(500, "internal", f"internal error: {type(error).__name__}")
        route = request.scope.get("route")
        method = getattr(route, "name", None) or "unknown"
        metrics.observe("rest", method, str(response.status_code), time.perf_counter() - started)
        return response

    health = APIRouter(tags=["health"])

    @health.get("/healthz", summary="The process is alive")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @health.get(
        "/readyz",
        summary="Every index can serve samples",
        description=(
            "503 while an index has no table, builds its first table or failed to build it, and while the "
            "server stops. An index that builds a new table or refits its codebooks while an earlier version "
            "serves counts as ready. With persistence down, the answer stays 200 because sampling goes on "
            'from memory, but its status is "degraded" and `persistence` says why mutations are rejected.'
        ),
        responses=_error_responses(503),
    )
    async def readyz() -> Any:
        if is_stopping():
            return _error_response(503, "unavailable", "the server is stopping")
        unready = service.unready_indexes()
        if unready:
            listed = ", ".join(f"{state.name} ({state.status.value})" for state in unready)
            return _error_response(503, "unavailable", f"indexes that cannot serve samples yet: {listed}")
        problem = service.persistence_problem()
        if problem is not None:
            return {"status": "degraded", "persistence": problem}
        return {"status": "ready"}

    api = APIRouter(prefix="/v1", tags=["indexes"], dependencies=[Depends(require_token)])
    common = _error_responses(401, 404)

    @api.put(
        "/indexes/{name}",
        summary="Create an index",
        response_model=IndexInfoBody,
        status_code=201,
        responses=_error_responses(400, 401, 409, 422),
    )
    async def create_index(name: str, body: CreateIndexBody) -> Any:
        state = await service.create_index(name, body.model_dump())
        return JSONResponse(_info_body(state), status_code=201)

    @api.get("/indexes", summary="List the indexes", response_model=IndexListBody, responses=_error_responses(401))
    async def list_indexes() -> Any:
        return {"indexes": [_info_body(state) for state in service.list_indexes()]}

    @api.get("/indexes/{name}", summary="Describe an index", response_model=IndexInfoBody, responses=common)
    async def get_index(name: str) -> Any:
        return _info_body(service.get_index(name))

    @api.delete("/indexes/{name}", summary="Delete an index", status_code=204, responses=common)
    async def delete_index(name: str) -> Response:
        await service.delete_index(name)
        return Response(status_code=204)

    @api.put(
        "/indexes/{name}/embeddings",
        summary="Upload the whole table and build the index",
        response_model=VersionBody,
        responses=_error_responses(400, 401, 404, 413, 503),
        openapi_extra=_binary_body_doc(
            "JSON {embeddings, weights?}, a .npy file of the (N, D) table, or a .npz file with arrays "
            "`embeddings` and optionally `weights`. An optional Content-Digest: sha-256=:<base64>: header "
            "is checked.",
            "UploadEmbeddingsBody",
        ),
    )
    async def upload_embeddings(name: str, request: Request) -> Any:
        service.get_index(name)  # an unknown index is reported before a large body is read
        body = await _read_body(request, settings.max_body_bytes)
        _check_digest(request, body)
        embeddings, weights = _table_arrays(request, body)
        service.check_table_bytes(embeddings.nbytes)
        return {"version": await service.upload_embeddings(name, embeddings, weights)}

    @api.patch(
        "/indexes/{name}/embeddings",
        summary="Replace or append rows",
        response_model=VersionBody,
        responses=_error_responses(400, 401, 404, 409, 413, 503),
        openapi_extra=_binary_body_doc(
            "JSON {ids, embeddings, weights?} or a .npz file with arrays `ids`, `embeddings` and optionally `weights`.",
            "UpdateEmbeddingsBody",
        ),
    )
    async def update_embeddings(name: str, request: Request) -> Any:
        body = await _read_body(request, settings.max_body_bytes)
        _check_digest(request, body)
        ids, embeddings, weights = _update_arrays(request, body)
        return {"version": await service.update_embeddings(name, ids, embeddings, weights)}

    @api.post(
        "/indexes/{name}/sample",
        summary="Draw negatives for a batch of queries",
        response_model=SampleResponseBody,
        responses={
            **_npz_response_doc(
                "With 'Accept: application/x-npz', an .npz file with arrays `ids` (B, M) int64, `log_q` "
                "(B, M) float32, `positive_log_q` (B, P) float32 when positives were sent, and the 0-d "
                "int64 `version`. log Q keeps -inf there; JSON sends it as null."
            ),
            **_error_responses(400, 401, 404, 409, 413, 422, 503),
        },
        openapi_extra=_binary_body_doc(
            "JSON {queries, num_samples, positives?, exclude_positives?, sampler?, seed?, min_version?}, or an "
            ".npz file with arrays `queries` (B, D) float32 and optionally `positives` (B, P) int64. With an "
            ".npz body the options are query parameters, and num_samples is required.",
            "SampleBody",
            (NPZ_CONTENT_TYPE,),
        ),
    )
    async def sample(
        name: str,
        request: Request,
        num_samples: Annotated[
            int | None, Query(description=".npz body only, required there: classes M per query")
        ] = None,
        exclude_positives: Annotated[bool, Query(description=".npz body only: never draw a query's positives")] = False,
        sampler: Annotated[SamplerName, Query(description=".npz body only: the proposal to draw from")] = "midx",
        seed: Annotated[int | None, Query(description=".npz body only: makes the draws reproducible")] = None,
        min_version: Annotated[int | None, Query(description=".npz body only: wait (bounded) for this version")] = None,
    ) -> Any:
        body = await _read_body(request, settings.max_body_bytes)
        count: int
        if _check_array_media_type(request) == NPZ_CONTENT_TYPE:
            arrays = load_npz(body, ("queries", "positives"), ("queries",))
            if num_samples is None:
                raise InvalidArgumentError(
                    "an .npz sample body needs the query parameter num_samples, e.g. ?num_samples=100"
                )
            queries, count = arrays["queries"], num_samples
            options: dict[str, Any] = {
                "positives": arrays.get("positives"),
                "exclude_positives": exclude_positives,
                "sampler": sampler,
                "seed": seed,
                "min_version": min_version,
            }
        else:
            _reject_query_options(request, _SAMPLE_QUERY_OPTIONS)
            queries, count, options = await run_in_threadpool(_sample_arguments_from_json, body)

        answer = await service.sample(name, queries, count, **options)

        result = {"ids": answer.ids, "log_q": answer.log_q, "positive_log_q": answer.positive_log_q}
        return await _array_response(request, result, answer.version)

    @api.post(
        "/indexes/{name}/log-prob",
        summary="Log Q of received ids for a batch of queries",
        response_model=LogProbResponseBody,
        responses={
            **_npz_response_doc(
                "With 'Accept: application/x-npz', an .npz file with the array `log_q` (B, P) float32 and "
                "the 0-d int64 `version`. log Q keeps -inf there; JSON sends it as null."
            ),
            **_error_responses(400, 401, 404, 409, 413, 422, 503),
        },
        openapi_extra=_binary_body_doc(
            "JSON {queries, ids, sampler?, min_version?}, or an .npz file with arrays `queries` (B, D) "
            "float32 and `ids` (B, P) int64. With an .npz body the options are query parameters.",
            "LogProbBody",
            (NPZ_CONTENT_TYPE,),
        ),
    )
    async def log_prob(
        name: str,
        request: Request,
        sampler: Annotated[
            SamplerName, Query(description=".npz body only: the proposal whose log Q is returned")
        ] = "midx",
        min_version: Annotated[int | None, Query(description=".npz body only: wait (bounded) for this version")] = None,
    ) -> Any:
        body = await _read_body(request, settings.max_body_bytes)
        if _check_array_media_type(request) == NPZ_CONTENT_TYPE:
            arrays = load_npz(body, ("queries", "ids"), ("queries", "ids"))
            queries, ids = arrays["queries"], arrays["ids"]
            options: dict[str, Any] = {"sampler": sampler, "min_version": min_version}
        else:
            _reject_query_options(request, _LOG_PROB_QUERY_OPTIONS)
            queries, ids, options = await run_in_threadpool(_log_prob_arguments_from_json, body)

        answer = await service.log_prob(name, queries, ids, **options)

        return await _array_response(request, {"log_q": answer.log_q}, answer.version)

    @api.post(
        "/indexes/{name}/rebuild",
        summary="Refit the codebooks now (k-means, or learned to lower KL(P || Q))",
        description="Returns the version that contains the result. A kl refit that does not lower the held-out "
        "KL leaves the index and its version unchanged; `last_refit` in the index info says what happened. "
        "Without a body the refit is k-means.",
        response_model=VersionBody,
        responses=_error_responses(400, 401, 404, 409, 413, 422, 503),
    )
    async def rebuild(name: str, body: RebuildBody | None = None) -> Any:
        if body is None:
            return {"version": await service.rebuild(name)}
        queries = None if body.queries is None else from_json(body.queries, "queries", np.float32)
        return {"version": await service.rebuild(name, body.mode, queries)}

    @app.get(
        "/metrics",
        summary="Prometheus metrics",
        tags=["health"],
        dependencies=[Depends(require_token)],
        response_class=Response,
        responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}},
    )
    async def metrics_route() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    app.include_router(health)
    app.include_router(api)
    _add_body_schemas(app, (UploadEmbeddingsBody, UpdateEmbeddingsBody, SampleBody, LogProbBody))
    return app
