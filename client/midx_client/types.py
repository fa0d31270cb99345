"""Result types shared by the gRPC and REST clients."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class IndexInfo:
    """State of one index on the server.

    status is "empty" (no table yet), "building", "ready" or "failed" (then `error` gives the reason).
    quantization_error is the mean relative residual norm of the current codes and
    fit_quantization_error the same when the codebooks were last fitted (both 0 when empty).
    """

    name: str
    dim: int
    num_codewords: int
    quantizer: str
    last_stage: str
    metric: str
    unigram_alpha: float
    num_classes: int
    version: int
    status: str
    quantization_error: float
    fit_quantization_error: float
    device: str
    error: str = ""


@dataclass(frozen=True)
class SampleResult:
    """Negatives drawn for B queries, as numpy arrays or torch tensors (the caller's choice).

    ids: (B, M) int64 class ids. log_q: (B, M) float32 normalised log proposal probabilities.
    positive_log_q: (B, P) float32 log Q of the given positives, or None without positives. A log Q
    of -inf marks a class that can never be drawn. version: the index version that produced it.
    """

    ids: Any
    log_q: Any
    positive_log_q: Any | None
    version: int


@dataclass(frozen=True)
class LogProbResult:
    """log_q: (B, P) float32 normalised log Q of the requested ids (-inf: never drawn); version used."""

    log_q: Any
    version: int
