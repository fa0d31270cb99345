"""The gRPC front end (grpc.aio): translates midx.v1.Sampler calls to `SamplerService` calls and back."""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
import grpc.aio
import numpy as np

from midx_client._proto import sampler_pb2 as _pb
from midx_client._proto import sampler_pb2_grpc as _pb_grpc
from midx_service.arrays import FLOAT_DTYPES, ID_DTYPES, from_tensor
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

R = TypeVar("R")

# The one exception-to-status mapping of the gRPC transport.
GRPC_STATUS = {
    InvalidArgumentError: grpc.StatusCode.INVALID_ARGUMENT,
    UnauthenticatedError: grpc.StatusCode.UNAUTHENTICATED,
    NotFoundError: grpc.StatusCode.NOT_FOUND,
    AlreadyExistsError: grpc.StatusCode.ALREADY_EXISTS,
    FailedPreconditionError: grpc.StatusCode.FAILED_PRECONDITION,
    ResourceExhaustedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    UnavailableError: grpc.StatusCode.UNAVAILABLE,
}

HEALTH_METHOD_PREFIX = "/grpc.health.v1.Health/"

_UPLOAD_DTYPES: dict[str, np.dtype[Any]] = {"float32": FLOAT_DTYPES["float32"]}


def grpc_status(error: MidxError) -> grpc.StatusCode:
    for kind, status in GRPC_STATUS.items():
        if isinstance(error, kind):
            return status
    return grpc.StatusCode.INTERNAL


def _rpc(
    method: Callable[[SamplerServicer, Any, grpc.aio.ServicerContext], Awaitable[R]],
) -> Callable[[SamplerServicer, Any, grpc.aio.ServicerContext], Awaitable[R]]:
    """Map service errors to status codes and record the call's metrics."""

    @functools.wraps(method)
    async def wrapper(self: SamplerServicer, request: Any, context: grpc.aio.ServicerContext) -> R:
        started = time.perf_counter()
        status = grpc.StatusCode.OK
        try:
            return await method(self, request, context)
        except MidxError as error:
            status = grpc_status(error)
            logger.debug("%s rejected with %s: %s", method.__name__, status.name, error)
            await context.abort(status, str(error))
        except Exception as error:
            if isinstance(error, grpc.aio.AbortError):
                raise
            status = grpc.StatusCode.INTERNAL
            logger.exception("%s failed unexpectedly", method.__name__)
            await context.abort(status, f"internal error: {type(error).__name__}")
        finally:
            self._service.metrics.observe("grpc", method.__name__, status.name, time.perf_counter() - started)
        raise AssertionError("unreachable: context.abort raises")

    return wrapper


def _fill_tensor(tensor: _pb.Tensor, array: np.ndarray) -> None:
    """Write `array` into the Tensor field `tensor` of a response.

    Filling the response's own field skips the copy that passing a separate Tensor message to the
    response's constructor makes, and `tobytes` writes C order, so the data is copied only there.
    """
    little_endian = array.astype(array.dtype.newbyteorder("<"), copy=False)
    tensor.dtype = str(little_endian.dtype)
    tensor.shape.extend(array.shape)
    tensor.data = little_endian.tobytes()


def _info(state: IndexState) -> _pb.IndexInfo:
    config = state.config
    return _pb.IndexInfo(
        name=state.name,
        config=_pb.IndexConfig(
            dim=config.dim,
            num_codewords=config.num_codewords,
            quantizer=config.quantizer,
            last_stage=config.last_stage,
            metric=config.metric,
            unigram_alpha=config.unigram_alpha,
        ),
        num_classes=state.num_classes,
        version=state.version,
        status=state.status.value,
        quantization_error=state.quantization_error,
        fit_quantization_error=state.fit_quantization_error,
        device=state.device,
        error=state.error,
        codebook_fit=state.codebook_fit,
        quality=None if state.quality is None else _quality(state.quality),
        last_refit=None if state.last_refit is None else _refit_report(state.last_refit),
    )


def _quality(measurement: QualityMeasurement) -> _pb.ProposalQuality:
    quality = measurement.quality
    return _pb.ProposalQuality(
        version=measurement.version,
        measured_at=measurement.measured_at,
        num_queries=quality.num_queries,
        kl=quality.kl,
        kl_at_fit=measurement.kl_at_fit,
        effective_sample_fraction=quality.effective_sample_fraction,
        empty_cell_fraction=quality.empty_cell_fraction,
        largest_cell_fraction=quality.largest_cell_fraction,
        quantization_error_ratio=quality.quantization_error_ratio,
        codeword_drift=quality.codeword_drift,
    )


def _refit_report(report: RefitReport) -> _pb.RefitReport:
    return _pb.RefitReport(
        mode=report.mode,
        trigger=report.trigger,
        accepted=report.accepted,
        version=report.version,
        seconds=report.seconds,
        heldout_kl_before=report.heldout_kl_before,
        heldout_kl_after=report.heldout_kl_after,
        num_queries=report.num_queries,
        finished_at=report.finished_at,
    )


def _floats(tensor: _pb.Tensor, name: str) -> np.ndarray:
    return from_tensor(tensor.dtype, list(tensor.shape), tensor.data, name, FLOAT_DTYPES)


def _ids(tensor: _pb.Tensor, name: str) -> np.ndarray:
    return from_tensor(tensor.dtype, list(tensor.shape), tensor.data, name, ID_DTYPES)


class SamplerServicer(_pb_grpc.SamplerServicer):
    """midx.v1.Sampler over a `SamplerService`."""

    def __init__(self, service: SamplerService) -> None:
        self._service = service

    @_rpc
    async def CreateIndex(self, request: _pb.CreateIndexRequest, context: grpc.aio.ServicerContext) -> _pb.IndexInfo:
        if not request.HasField("config"):
            raise InvalidArgumentError("config is required: give at least config.dim")
        config = request.config
        options: dict[str, Any] = {"dim": config.dim}
        for field in ("num_codewords", "quantizer", "last_stage", "metric", "unigram_alpha"):
            if config.HasField(field):
                options[field] = getattr(config, field)
        return _info(await self._service.create_index(request.name, options))

    @_rpc
    async def GetIndex(self, request: _pb.GetIndexRequest, context: grpc.aio.ServicerContext) -> _pb.IndexInfo:
        return _info(self._service.get_index(request.name))

    @_rpc
    async def ListIndexes(
        self, request: _pb.ListIndexesRequest, context: grpc.aio.ServicerContext
    ) -> _pb.ListIndexesResponse:
        return _pb.ListIndexesResponse(indexes=[_info(state) for state in self._service.list_indexes()])

    @_rpc
    async def DeleteIndex(
        self, request: _pb.DeleteIndexRequest, context: grpc.aio.ServicerContext
    ) -> _pb.DeleteIndexResponse:
        await self._service.delete_index(request.name)
        return _pb.DeleteIndexResponse()

    @_rpc
    async def UploadEmbeddings(
        self, request_iterator: AsyncIterator[_pb.UploadEmbeddingsRequest], context: grpc.aio.ServicerContext
    ) -> _pb.UploadEmbeddingsResponse:
        upload = _Upload(self._service)
        async for chunk in request_iterator:
            upload.add(chunk)
        table, weights = upload.finish()
        return _pb.UploadEmbeddingsResponse(version=await self._service.upload_embeddings(upload.name, table, weights))

    @_rpc
    async def UpdateEmbeddings(
        self, request: _pb.UpdateEmbeddingsRequest, context: grpc.aio.ServicerContext
    ) -> _pb.UpdateEmbeddingsResponse:
        # Copies, unlike the read-only views sampling reads: the registry keeps the update's arrays
        # and hands them to the persistence store.
        weights = _floats(request.weights, "weights").copy() if request.HasField("weights") else None
        ids = _ids(request.ids, "ids").copy()
        embeddings = _floats(request.embeddings, "embeddings").copy()
        version = await self._service.update_embeddings(request.name, ids, embeddings, weights)
        return _pb.UpdateEmbeddingsResponse(version=version)

    @_rpc
    async def Sample(self, request: _pb.SampleRequest, context: grpc.aio.ServicerContext) -> _pb.SampleResponse:
        positives = _ids(request.positives, "positives") if request.HasField("positives") else None
        answer = await self._service.sample(
            request.name,
            _floats(request.queries, "queries"),
            request.num_samples,
            positives=positives,
            exclude_positives=request.exclude_positives,
            sampler=request.sampler or "midx",
            seed=request.seed if request.HasField("seed") else None,
            min_version=request.min_version if request.HasField("min_version") else None,
        )
        response = _pb.SampleResponse(version=answer.version)
        _fill_tensor(response.ids, answer.ids)
        _fill_tensor(response.log_q, answer.log_q)
        if answer.positive_log_q is not None:
            _fill_tensor(response.positive_log_q, answer.positive_log_q)
        return response

    @_rpc
    async def LogProb(self, request: _pb.LogProbRequest, context: grpc.aio.ServicerContext) -> _pb.LogProbResponse:
        answer = await self._service.log_prob(
            request.name,
            _floats(request.queries, "queries"),
            _ids(request.ids, "ids"),
            sampler=request.sampler or "midx",
            min_version=request.min_version if request.HasField("min_version") else None,
        )
        response = _pb.LogProbResponse(version=answer.version)
        _fill_tensor(response.log_q, answer.log_q)
        return response

    @_rpc
    async def Rebuild(self, request: _pb.RebuildRequest, context: grpc.aio.ServicerContext) -> _pb.RebuildResponse:
        queries = _floats(request.queries, "queries") if request.HasField("queries") else None
        version = await self._service.rebuild(request.name, request.mode or "kmeans", queries)
        return _pb.RebuildResponse(version=version)


class _Upload:
    """Assembles an UploadEmbeddings stream into one table, checking each chunk as it arrives."""

    def __init__(self, service: SamplerService) -> None:
        self._service = service
        self.name = ""
        self._table: np.ndarray | None = None
        self._weights: np.ndarray | None = None
        self._weight_parts: list[np.ndarray] = []
        self._rows = 0
        self._digest = hashlib.sha256()
        self._expected_digest = b""

    def add(self, chunk: _pb.UploadEmbeddingsRequest) -> None:
        if self._table is None:
            self._start(chunk)
        elif chunk.name and chunk.name != self.name:
            raise InvalidArgumentError(f"chunk names index {chunk.name!r} but the upload is for {self.name!r}")
        assert self._table is not None
        if chunk.sha256:
            self._expected_digest = chunk.sha256
        if not chunk.HasField("embeddings"):
            return

        rows = from_tensor(
            chunk.embeddings.dtype,
            list(chunk.embeddings.shape),
            chunk.embeddings.data,
            "embeddings",
            _UPLOAD_DTYPES,
        )
        dim = self._table.shape[1]
        if rows.ndim != 2 or rows.shape[1] != dim:
            raise InvalidArgumentError(f"chunk embeddings must have shape (rows, {dim}), got {list(rows.shape)}")
        stop = self._rows + rows.shape[0]
        if stop > self._table.shape[0]:
            raise InvalidArgumentError(
                f"the chunks carry more than num_rows={self._table.shape[0]} rows; send exactly num_rows rows"
            )
        if chunk.HasField("weights") != (self._weights is not None):
            raise InvalidArgumentError("either every chunk or no chunk must carry weights")

        self._table[self._rows : stop] = rows
        self._digest.update(chunk.embeddings.data)
        if self._weights is not None:
            weights = from_tensor(
                chunk.weights.dtype, list(chunk.weights.shape), chunk.weights.data, "weights", FLOAT_DTYPES
            )
            if weights.shape != (rows.shape[0],):
                raise InvalidArgumentError(
                    f"chunk weights must have shape ({rows.shape[0]},), one per row, got {list(weights.shape)}"
                )
            self._weights[self._rows : stop] = weights
            self._weight_parts.append(weights)
        self._rows = stop

    def _start(self, chunk: _pb.UploadEmbeddingsRequest) -> None:
        if not chunk.name:
            raise InvalidArgumentError("the first chunk must name the index")
        self.name = chunk.name
        dim = self._service.get_index(self.name).config.dim
        num_rows = chunk.num_rows
        if num_rows < 1:
            raise InvalidArgumentError(f"the first chunk must set num_rows >= 1, got {num_rows}")
        self._service.check_table_bytes(num_rows * dim * 4)
        self._table = np.empty((num_rows, dim), dtype=np.float32)
        if chunk.HasField("weights"):
            self._weights = np.empty(num_rows, dtype=np.float64)

    def finish(self) -> tuple[np.ndarray, np.ndarray | None]:
        if self._table is None:
            raise InvalidArgumentError("the upload stream was empty; send at least one chunk")
        if self._rows != self._table.shape[0]:
            raise InvalidArgumentError(
                f"the chunks carried {self._rows} rows but num_rows is {self._table.shape[0]}; send every row"
            )
        for part in self._weight_parts:
            self._digest.update(part.tobytes())
        if self._expected_digest and not hmac.compare_digest(self._expected_digest, self._digest.digest()):
            raise InvalidArgumentError(
                "the table's SHA-256 does not match the sha256 the client sent; the upload was corrupted, send it again"
            )
        return self._table, self._weights


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Reject calls without 'authorization: Bearer <token>' metadata, except the health service."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method or ""
        if handler is None or method.startswith(HEALTH_METHOD_PREFIX) or self._authorised(handler_call_details):
            return handler

        async def reject(request: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or wrong bearer token; send metadata 'authorization: Bearer <MIDX_API_TOKEN>'",
            )

        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(reject)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(reject)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(reject)
        return grpc.unary_unary_rpc_method_handler(reject)

    def _authorised(self, details: grpc.HandlerCallDetails) -> bool:
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                text = value.decode() if isinstance(value, bytes) else value
                scheme, _, received = text.partition(" ")
                return scheme.lower() == "bearer" and hmac.compare_digest(received.strip().encode(), self._token)
        return False
