"""Proposal-quality figures of an index: KL(P || Q), effective sample size, cell occupancy, staleness.

P is the exact softmax over every class, so each figure costs O(R N D) for R queries: callers run it
on a small sample of recent queries, off the request path.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from midx_service.core.index import MidxIndex, normalise_rows
from midx_service.core.validation import ArrayLike, as_float_matrix

# Queries per chunk of the exact softmax: bounds the (chunk x N) float64 matrices to 64 x N.
QUERY_CHUNK = 64


@dataclass(frozen=True)
class ProposalQuality:
    """Telemetry of one index snapshot.

    kl: mean over the queries of KL(P || Q) in nats (None without queries).
    effective_sample_fraction: mean over the queries of 1 / sum_i P_i^2 / Q_i, the expected effective
        sample size of importance-weighted draws from Q divided by the number of draws (1 when Q = P).
    num_queries: queries the two figures above were computed on.
    empty_cell_fraction: share of the K * K cells that hold no class.
    largest_cell_fraction: share of all classes held by the most populated cell.
    quantization_error_ratio: current mean relative quantisation error over the one at the last fit;
        above 1 the codebooks have gone stale as the embeddings moved.
    codeword_drift: mean distance from each codeword to the mean of the vectors now assigned to it
        (the step a k-means refit would make first), relative to the mean codeword norm.
    """

    kl: float | None
    effective_sample_fraction: float | None
    num_queries: int
    empty_cell_fraction: float
    largest_cell_fraction: float
    quantization_error_ratio: float
    codeword_drift: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure_quality(index: MidxIndex, queries: ArrayLike | None = None) -> ProposalQuality:
    """Compute every telemetry figure of `index`, the KL and effective sample size on `queries` (R, D)."""
    kl = effective = None
    num_queries = 0
    if queries is not None:
        query_matrix = as_float_matrix(queries, "queries", index.config.dim, index.device)
        num_queries = query_matrix.shape[0]
        if num_queries > 0:
            kl, effective = kl_and_effective_sample_fraction(index, query_matrix)
    count = index.cells.count
    fit_error = index.fit_quantization_error
    return ProposalQuality(
        kl=kl,
        effective_sample_fraction=effective,
        num_queries=num_queries,
        empty_cell_fraction=float((count == 0).double().mean()),
        largest_cell_fraction=float(count.max()) / index.num_classes,
        quantization_error_ratio=index.quantization_error / fit_error if fit_error > 0 else 1.0,
        codeword_drift=codeword_drift(index),
    )


def kl_and_effective_sample_fraction(index: MidxIndex, queries: torch.Tensor) -> tuple[float, float]:
    """Return the mean KL(P || Q) and mean 1 / sum_i P_i^2 / Q_i over (R, D) queries, exactly."""
    if index.config.metric == "cosine":
        queries = normalise_rows(queries)
    kl_total = 0.0
    effective_total = 0.0
    for chunk in queries.split(QUERY_CHUNK):
        log_p = torch.log_softmax((chunk @ index.embeddings.T).double(), dim=1)
        log_q = index.log_prob_all(chunk).double()
        p = log_p.exp()
        drawn = p > 0
        # P > 0 where Q = 0 (a class of weight 0) makes both figures degenerate: KL is +inf and the
        # effective sample size 0, which is what they report.
        kl_terms = torch.where(drawn, p * (log_p - log_q), 0.0)
        second_moment = torch.where(drawn, torch.exp(2 * log_p - log_q), 0.0).sum(dim=1)
        kl_total += float(kl_terms.sum())
        effective_total += float((1.0 / second_moment).sum())
    return kl_total / queries.shape[0], effective_total / queries.shape[0]


def codeword_drift(index: MidxIndex) -> float:
    """Mean distance from each used codeword to the mean of its assigned vectors, over the mean codeword norm."""
    codebooks = index.codebooks
    first_part, second_part = codebooks.split(index.embeddings)
    if codebooks.quantizer == "rq":
        second_part = second_part - codebooks.first[index.codes[:, 0]]
    shifts = []
    norms = []
    for codewords, vectors, codes in (
        (codebooks.first, first_part, index.codes[:, 0]),
        (codebooks.second, second_part, index.codes[:, 1]),
    ):
        num_codewords = codewords.shape[0]
        sums = torch.zeros(num_codewords, vectors.shape[1], dtype=torch.float64, device=vectors.device)
        sums.index_add_(0, codes, vectors.double())
        counts = torch.bincount(codes, minlength=num_codewords)
        used = counts > 0
        means = sums[used] / counts[used, None]
        shifts.append((means - codewords[used].double()).norm(dim=1))
        norms.append(codewords[used].double().norm(dim=1))
    mean_norm = float(torch.cat(norms).mean())
    return float(torch.cat(shifts).mean()) / mean_norm if mean_norm > 0 else 0.0
