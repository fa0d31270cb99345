"""Reports on an index beyond its config: the last refit and the measured proposal quality."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from midx_service.core.telemetry import ProposalQuality

RefitMode = Literal["kmeans", "kl"]
REFIT_MODES: tuple[RefitMode, ...] = ("kmeans", "kl")

# Why a refit ran: a caller's rebuild request, the quantisation-error policy or the KL policy.
RefitTrigger = Literal["request", "quantization_error", "kl"]


@dataclass(frozen=True)
class RefitReport:
    """Outcome of one codebook refit.

    mode: "kmeans" (warm-started k-means) or "kl" (codebooks learned to lower KL(P || Q)).
    accepted: whether the refitted codebooks were swapped in; a k-means refit always is, a KL refit
        only when it lowered the held-out KL. version: the version that contains the new codebooks, or
        the unchanged current version when the refit was not accepted. seconds: wall time of the fit.
    heldout_kl_before / heldout_kl_after: mean KL(P || Q) in nats on the held-out queries with the
        old and the kept codebooks (KL refits only; equal when the refit was not accepted).
    num_queries: queries the KL refit trained and was validated on (0 for k-means).
    finished_at: Unix time in seconds when the refit finished.
    """

    mode: RefitMode
    trigger: RefitTrigger
    accepted: bool
    version: int
    seconds: float
    heldout_kl_before: float | None = None
    heldout_kl_after: float | None = None
    num_queries: int = 0
    finished_at: float = 0.0


@dataclass(frozen=True)
class QualityMeasurement:
    """Proposal-quality figures of one index version, measured in the background.

    version: the index version measured. measured_at: Unix time in seconds when the measurement took
    its snapshot and queries. quality: the figures
    (see `ProposalQuality`). kl_at_fit: the KL measured first after the current codebooks were fitted,
    the reference of the KL refit policy; None until a measurement with queries has been made.
    """

    version: int
    measured_at: float
    quality: ProposalQuality
    kl_at_fit: float | None = None
