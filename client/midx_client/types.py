"""Result types shared by the gRPC and REST clients."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ProposalQuality:
    """Proposal-quality figures of one index version, measured by the server on its recent queries.

    P is the exact softmax over all classes and Q the MIDX proposal. version: the index version
    measured; measured_at: Unix time in seconds. kl: mean KL(P || Q) in nats over num_queries recent
    queries (None when num_queries is 0, inf when Q gives no mass to classes P can draw).
    kl_at_fit: the KL measured first after the current codebooks were fitted (the KL refit policy's
    reference), or None. effective_sample_fraction: mean effective sample size of importance-weighted
    draws from Q per draw, in [0, 1], 1 when Q = P. empty_cell_fraction: share of the K * K cells
    without a class. largest_cell_fraction: share of all classes in the most populated cell.
    quantization_error_ratio: quantisation error over the one at the last fit (above 1: stale).
    codeword_drift: mean distance from each codeword to the mean of its assigned vectors, relative to
    the mean codeword norm. docs/telemetry.md explains how to read them.
    """

    version: int
    measured_at: float
    num_queries: int
    kl: float | None
    kl_at_fit: float | None
    effective_sample_fraction: float | None
    empty_cell_fraction: float
    largest_cell_fraction: float
    quantization_error_ratio: float
    codeword_drift: float


@dataclass(frozen=True)
class RefitReport:
    """Outcome of an index's last codebook refit.

    mode: "kmeans" or "kl". trigger: "request" (a rebuild call), "quantization_error" or "kl" (the
    server's refit policies). accepted: False when a "kl" refit did not lower the held-out KL, so the
    index was kept. version: the version containing the result, or the unchanged version when not
    accepted. heldout_kl_before / heldout_kl_after: mean KL(P || Q) in nats on held-out queries
    ("kl" only, else None). num_queries: queries a "kl" refit used. finished_at: Unix time in seconds.
    """

    mode: str
    trigger: str
    accepted: bool
    version: int
    seconds: float
    heldout_kl_before: float | None
    heldout_kl_after: float | None
    num_queries: int
    finished_at: float


@dataclass(frozen=True)
class IndexInfo:
    """State of one index on the server.

    status is "empty" (no table yet), "building", "ready" or "failed" (then `error` gives the reason).
    quantization_error is the mean relative residual norm of the current codes and
    fit_quantization_error the same when the codebooks were last fitted (both 0 when empty).
    codebook_fit is "kmeans" or "kl" (learned codebooks). quality is the server's last proposal-quality
    measurement and last_refit the last finished refit; each is None until there is one.
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
    codebook_fit: str = "kmeans"
    quality: ProposalQuality | None = None
    last_refit: RefitReport | None = None


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
