"""Conversions between caller arrays (numpy, torch, nested lists) and the two wire formats."""

from __future__ import annotations

import hashlib
import math
from typing import Any, Literal

import numpy as np

from midx_client._proto import sampler_pb2 as _pb
from midx_client.errors import SamplerError
from midx_client.types import IndexInfo, ProposalQuality, RefitReport

Output = Literal["numpy", "torch"]

# Wire dtypes: NumPy names with an explicit little-endian byte order.
WIRE_DTYPES: dict[str, np.dtype[Any]] = {
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
    "int64": np.dtype("<i8"),
    "int32": np.dtype("<i4"),
}


def to_numpy(value: Any, dtype: str) -> np.ndarray:
    """Return `value` (numpy array, torch tensor or nested sequence) as a C-ordered little-endian array.

    Values are cast to `dtype` ("float32", "float64" or "int64"); the server validates shapes, ranges
    and finiteness, so this only converts.
    """
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor, without importing torch
        value = value.detach().cpu().numpy()
    try:
        array = np.asarray(value)
    except ValueError as error:  # ragged nested lists
        raise SamplerError("invalid_argument", f"expected a rectangular array: {error}") from None
    non_integer = dtype == "int64" and array.dtype.kind == "f"
    if non_integer and not (np.all(np.isfinite(array)) and np.all(array == np.round(array))):
        raise SamplerError("invalid_argument", "ids must be integers, got non-integer values")
    try:
        return np.ascontiguousarray(array, dtype=WIRE_DTYPES[dtype])
    except (TypeError, ValueError) as error:
        raise SamplerError("invalid_argument", f"expected an array of numbers: {error}") from None


def as_output(array: np.ndarray, output: Output) -> Any:
    """Return `array` as numpy or, with output "torch", as a CPU tensor (torch imported lazily)."""
    if output == "numpy":
        return array
    if output == "torch":
        import torch

        return torch.from_numpy(np.array(array, copy=True))
    raise SamplerError("invalid_argument", f"output must be 'numpy' or 'torch', got {output!r}")


def table_sha256(embeddings: np.ndarray, weights: np.ndarray | None) -> bytes:
    """Return the SHA-256 of the table's bytes followed by the weights' bytes (the upload checksum)."""
    digest = hashlib.sha256(np.ascontiguousarray(embeddings).data.cast("B"))
    if weights is not None:
        digest.update(np.ascontiguousarray(weights).data.cast("B"))
    return digest.digest()


# ------------------------------------------------------------------------------------------ protobuf


def tensor_to_proto(array: np.ndarray) -> _pb.Tensor:
    name = next(name for name, dtype in WIRE_DTYPES.items() if dtype == array.dtype)
    return _pb.Tensor(dtype=name, shape=list(array.shape), data=array.tobytes())


def tensor_from_proto(tensor: _pb.Tensor) -> np.ndarray:
    dtype = WIRE_DTYPES[tensor.dtype]
    # A copy, because an array over the message's bytes is read-only and callers may write to results.
    return np.frombuffer(tensor.data, dtype=dtype).reshape(tuple(tensor.shape)).copy()


def info_from_proto(info: _pb.IndexInfo) -> IndexInfo:
    config = info.config
    return IndexInfo(
        name=info.name,
        dim=int(config.dim),
        num_codewords=int(config.num_codewords),
        quantizer=config.quantizer,
        last_stage=config.last_stage,
        metric=config.metric,
        unigram_alpha=float(config.unigram_alpha),
        num_classes=int(info.num_classes),
        version=int(info.version),
        status=info.status,
        quantization_error=float(info.quantization_error),
        fit_quantization_error=float(info.fit_quantization_error),
        device=info.device,
        error=info.error,
        codebook_fit=info.codebook_fit or "kmeans",
        quality=_quality_from_proto(info.quality) if info.HasField("quality") else None,
        last_refit=_refit_report_from_proto(info.last_refit) if info.HasField("last_refit") else None,
    )


def _optional(message: Any, field: str) -> float | None:
    return float(getattr(message, field)) if message.HasField(field) else None


def _quality_from_proto(quality: _pb.ProposalQuality) -> ProposalQuality:
    return ProposalQuality(
        version=int(quality.version),
        measured_at=float(quality.measured_at),
        num_queries=int(quality.num_queries),
        kl=_optional(quality, "kl"),
        kl_at_fit=_optional(quality, "kl_at_fit"),
        effective_sample_fraction=_optional(quality, "effective_sample_fraction"),
        empty_cell_fraction=float(quality.empty_cell_fraction),
        largest_cell_fraction=float(quality.largest_cell_fraction),
        quantization_error_ratio=float(quality.quantization_error_ratio),
        codeword_drift=float(quality.codeword_drift),
    )


def _refit_report_from_proto(report: _pb.RefitReport) -> RefitReport:
    return RefitReport(
        mode=report.mode,
        trigger=report.trigger,
        accepted=bool(report.accepted),
        version=int(report.version),
        seconds=float(report.seconds),
        heldout_kl_before=_optional(report, "heldout_kl_before"),
        heldout_kl_after=_optional(report, "heldout_kl_after"),
        num_queries=int(report.num_queries),
        finished_at=float(report.finished_at),
    )


# ---------------------------------------------------------------------------------------------- JSON


def floats_from_json(values: Any) -> np.ndarray:
    """Return a float32 array from JSON numbers, where null stands for -inf."""
    array = np.array(values, dtype=object)
    array[np.equal(array, None)] = -np.inf  # type: ignore[call-overload]
    return array.astype(np.float32)


def info_from_json(body: dict[str, Any]) -> IndexInfo:
    return IndexInfo(
        name=body["name"],
        dim=int(body["dim"]),
        num_codewords=int(body["num_codewords"]),
        quantizer=body["quantizer"],
        last_stage=body["last_stage"],
        metric=body["metric"],
        unigram_alpha=float(body["unigram_alpha"]),
        num_classes=int(body["num_classes"]),
        version=int(body["version"]),
        status=body["status"],
        quantization_error=float(body["quantization_error"]),
        fit_quantization_error=float(body["fit_quantization_error"]),
        device=body["device"],
        error=body.get("error") or "",
        codebook_fit=body.get("codebook_fit") or "kmeans",
        quality=None if body.get("quality") is None else _quality_from_json(body["quality"]),
        last_refit=None if body.get("last_refit") is None else _refit_report_from_json(body["last_refit"]),
    )


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


def _quality_from_json(body: dict[str, Any]) -> ProposalQuality:
    num_queries = int(body["num_queries"])
    kl = _float_or_none(body.get("kl"))
    if kl is None and num_queries > 0:
        kl = math.inf  # JSON has no infinities, so the server sends an infinite KL as null
    return ProposalQuality(
        version=int(body["version"]),
        measured_at=float(body["measured_at"]),
        num_queries=num_queries,
        kl=kl,
        kl_at_fit=_float_or_none(body.get("kl_at_fit")),
        effective_sample_fraction=_float_or_none(body.get("effective_sample_fraction")),
        empty_cell_fraction=float(body["empty_cell_fraction"]),
        largest_cell_fraction=float(body["largest_cell_fraction"]),
        quantization_error_ratio=float(body["quantization_error_ratio"]),
        codeword_drift=float(body["codeword_drift"]),
    )


def _refit_report_from_json(body: dict[str, Any]) -> RefitReport:
    return RefitReport(
        mode=body["mode"],
        trigger=body["trigger"],
        accepted=bool(body["accepted"]),
        version=int(body["version"]),
        seconds=float(body["seconds"]),
        heldout_kl_before=_float_or_none(body.get("heldout_kl_before")),
        heldout_kl_after=_float_or_none(body.get("heldout_kl_after")),
        num_queries=int(body.get("num_queries", 0)),
        finished_at=float(body["finished_at"]),
    )
