"""Codebooks learned to minimise KL(P || Q) over a set of queries, starting from the k-means ones.

For fixed codes the KL is a smooth convex function of the codewords. With P_1(a | z) and P_2(b | z)
the exact softmax's mass on the classes whose first (second) code is a (b),

    KL(z) = sum_i P_i log P_i - sum_i P_i log w_i - sum_a P_1(a | z) s1[a] - sum_b P_2(b | z) s2[b] + log Z(z),

so once the marginals are computed (one exact softmax pass over the table per query) every evaluation
and gradient costs O(R K^2) and is exact. Codes can then be re-assigned to the nearest codeword and the
codewords refined again; the variant with the lowest KL on held-out queries wins, and the k-means
codebooks stay unless a learned variant beats them there.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from midx_service.core.index import MidxIndex, normalise_rows, relative_residual_norms
from midx_service.core.quantizer import Codebooks
from midx_service.core.validation import ArrayLike, as_float_matrix
from midx_service.errors import InvalidArgumentError

logger = logging.getLogger(__name__)

MIN_QUERIES = 8
_QUERY_CHUNK = 64


@dataclass(frozen=True)
class KlFitReport:
    """Outcome of a learned refit: held-out KL before and after, and whether the result was kept."""

    heldout_kl_before: float
    heldout_kl_after: float
    accepted: bool
    reassigned_codes: bool
    steps: int
    seconds: float
    num_train_queries: int
    num_heldout_queries: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Targets:
    """Per query: the exact softmax's code marginals and the constant part of the KL."""

    first: torch.Tensor  # (R, K) P_1(a | z)
    second: torch.Tensor  # (R, K) P_2(b | z)
    constant: torch.Tensor  # (R,) sum_i P_i log P_i - sum_i P_i log w_i


def fit_kl_codebooks(
    index: MidxIndex,
    queries: ArrayLike,
    *,
    max_steps: int = 200,
    time_budget_seconds: float = 60.0,
    heldout_fraction: float = 0.25,
    reassign_codes: bool = True,
    seed: int = 0,
) -> tuple[MidxIndex, KlFitReport]:
    """Learn codewords that lower KL(P || Q) on `queries` (R, D); return the index to serve and a report.

    The queries are split at random into a training and a held-out part. The returned index is a new
    snapshot with learned codebooks when they lower the held-out KL, else `index` itself. The time
    budget bounds the optimisation steps; the exact softmax passes cost O(R N D) on top.
    """
    started = time.perf_counter()
    query_matrix = as_float_matrix(queries, "queries", index.config.dim, index.device)
    if query_matrix.shape[0] < MIN_QUERIES:
        raise InvalidArgumentError(
            f"a learned refit needs at least {MIN_QUERIES} queries, got {query_matrix.shape[0]}; "
            "serve more sample requests first or upload queries"
        )
    if index.config.metric == "cosine":
        query_matrix = normalise_rows(query_matrix)
    generator = torch.Generator(device=index.device).manual_seed(seed)
    order = torch.randperm(query_matrix.shape[0], generator=generator, device=index.device)
    num_heldout = max(1, round(heldout_fraction * query_matrix.shape[0]))
    heldout, train = query_matrix[order[:num_heldout]], query_matrix[order[num_heldout:]]

    codes = index.codes
    train_targets = code_marginals(index, train, codes)
    heldout_targets = code_marginals(index, heldout, codes)
    baseline = float(kl_objective(index, index.codebooks, heldout, heldout_targets).mean())

    deadline = started + time_budget_seconds
    learned, steps = _minimise(index, index.codebooks, train, train_targets, max_steps, deadline)
    best_codebooks, best_codes, best_kl = (
        learned,
        codes,
        float(kl_objective(index, learned, heldout, heldout_targets).mean()),
    )
    reassigned = False
    if reassign_codes and time.perf_counter() < deadline:
        new_codes = learned.encode(index.embeddings)
        if not torch.equal(new_codes, codes):
            targets = code_marginals(index, train, new_codes)
            refined, more_steps = _minimise(index, learned, train, targets, max_steps, deadline, new_codes)
            steps += more_steps
            heldout_new = code_marginals(index, heldout, new_codes)
            kl_new = float(kl_objective(index, refined, heldout, heldout_new, new_codes).mean())
            if kl_new < best_kl:
                best_codebooks, best_codes, best_kl, reassigned = refined, new_codes, kl_new, True

    accepted = best_kl < baseline
    result = index
    if accepted:
        row_error = relative_residual_norms(index.embeddings, best_codebooks, best_codes)
        result = MidxIndex(
            index.config,
            index.embeddings,
            index.weights,
            best_codebooks,
            best_codes,
            row_error,
            fit_quantization_error=0.0,
            codebook_fit="kl",
        )
        result.fit_quantization_error = result.quantization_error
    report = KlFitReport(
        heldout_kl_before=baseline,
        heldout_kl_after=best_kl if accepted else baseline,
        accepted=accepted,
        reassigned_codes=reassigned and accepted,
        steps=steps,
        seconds=time.perf_counter() - started,
        num_train_queries=int(train.shape[0]),
        num_heldout_queries=int(heldout.shape[0]),
    )
    logger.info(
        "learned refit: held-out KL %.4f -> %.4f (%s), %d steps, %.1f s",
        baseline,
        best_kl,
        "accepted" if accepted else "rejected",
        steps,
        report.seconds,
    )
    return result, report


def code_marginals(index: MidxIndex, queries: torch.Tensor, codes: torch.Tensor) -> _Targets:
    """Return the exact softmax's mass per first and per second code, and the KL's constant part."""
    num_codewords = index.config.num_codewords
    first, second, constant = [], [], []
    log_weight = None
    if index.config.last_stage == "popularity" and index.weights is not None:
        log_weight = torch.where(index.weights > 0, index.weights.log(), 0.0)
    for chunk in queries.split(_QUERY_CHUNK):
        logits = (chunk @ index.embeddings.T).double()
        shift = logits.amax(dim=1, keepdim=True)
        # One (rows, N) buffer for P, filled in place: this pass over all classes dominates a refit.
        p = (logits - shift).exp_()
        total = p.sum(dim=1, keepdim=True)
        p /= total
        rows = chunk.shape[0]
        first.append(
            torch.zeros(rows, num_codewords, dtype=torch.float64, device=p.device).index_add_(1, codes[:, 0], p)
        )
        second.append(
            torch.zeros(rows, num_codewords, dtype=torch.float64, device=p.device).index_add_(1, codes[:, 1], p)
        )
        # sum_i P_i log P_i with log P_i = logit_i - shift - log total, and sum_i P_i = 1.
        entropy_term = torch.einsum("rn,rn->r", p, logits) - (shift + total.log()).squeeze(1)
        if log_weight is not None:
            entropy_term = entropy_term - p @ log_weight
        constant.append(entropy_term)
    return _Targets(torch.cat(first), torch.cat(second), torch.cat(constant))


def kl_objective(
    index: MidxIndex,
    codebooks: Codebooks,
    queries: torch.Tensor,
    targets: _Targets,
    codes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return the (R,) exact KL(P || Q) per query for the given codebooks and codes (float64, differentiable)."""
    codes = index.codes if codes is None else codes
    num_codewords = index.config.num_codewords
    cell = codes[:, 0] * num_codewords + codes[:, 1]
    if index.config.last_stage == "popularity" and index.weights is not None:
        mass = torch.zeros(num_codewords * num_codewords, dtype=torch.float64, device=cell.device)
        mass.index_add_(0, cell, index.weights)
    else:
        mass = torch.bincount(cell, minlength=num_codewords * num_codewords).double()

    first_part, second_part = codebooks.split(queries.double())
    s1 = first_part @ codebooks.first.double().T
    s2 = second_part @ codebooks.second.double().T
    # log Z = logsumexp_a (s1[a] + log sum_b w_ab exp(s2[b])), factorised to stay O(R K^2) in time and
    # O(R K) in memory; float64 keeps exp(s2 - max) from underflowing for any realistic logits.
    shift = s2.amax(dim=1, keepdim=True).detach()
    row_mass = torch.exp(s2 - shift) @ mass.view(num_codewords, num_codewords).T
    nonempty = mass.view(num_codewords, num_codewords).sum(dim=1) > 0
    log_row_mass = torch.where(nonempty, torch.log(torch.where(nonempty, row_mass, 1.0)), -math.inf) + shift
    log_z = torch.logsumexp(s1 + log_row_mass, dim=1)
    return targets.constant - (targets.first * s1).sum(dim=1) - (targets.second * s2).sum(dim=1) + log_z


def _minimise(
    index: MidxIndex,
    start: Codebooks,
    queries: torch.Tensor,
    targets: _Targets,
    max_steps: int,
    deadline: float,
    codes: torch.Tensor | None = None,
) -> tuple[Codebooks, int]:
    first = start.first.detach().double().clone().requires_grad_(True)
    second = start.second.detach().double().clone().requires_grad_(True)
    optimiser = torch.optim.LBFGS([first, second], lr=1.0, max_iter=20, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = kl_objective(index, Codebooks(start.quantizer, first, second), queries, targets, codes).mean()
        loss.backward()
        return loss

    steps = 0
    while steps < max_steps and time.perf_counter() < deadline:
        optimiser.step(closure)
        steps += 20
    return Codebooks(start.quantizer, first.detach().float(), second.detach().float()), steps
