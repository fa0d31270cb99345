"""The log-Q-corrected sampled softmax loss, computed from the service's negatives and their log Q."""

from __future__ import annotations

import math
from typing import Any, Literal, Protocol

import torch

Reduction = Literal["mean", "sum", "none"]


class SampleLike(Protocol):
    """What the loss reads from a sample answer: the negatives' ids and log Q and the positives' log Q.

    ids: (B, M) int64. log_q: (B, M) float. positive_log_q: (B, P) float, or None when the request
    named no positives. Numpy arrays and tensors on any device are accepted.
    """

    @property
    def ids(self) -> Any: ...

    @property
    def log_q(self) -> Any: ...

    @property
    def positive_log_q(self) -> Any: ...


def sampled_softmax_loss(
    queries: torch.Tensor,
    positive_embeddings: torch.Tensor,
    negative_embeddings: torch.Tensor,
    positives: Any,
    sample: SampleLike,
    *,
    correct_positive: bool = True,
    remove_accidental_hits: bool = True,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Compute the sampled softmax loss from query vectors and class embeddings.

    queries: (B, D). positive_embeddings: (B, D) for one positive per query or (B, P, D).
    negative_embeddings: (B, M, D), the rows of `sample.ids`. positives: the (B,) or (B, P) class ids
    of the positives, used to find accidental hits. sample: the service's answer for these queries,
    requested with the same positives when `correct_positive` is set. Logits are dot products; for an
    index with the cosine metric, normalise the vectors first. Gradients flow into the queries and
    both embedding tensors. See `sampled_softmax_loss_from_logits` for the loss itself.
    """
    if queries.dim() != 2:
        raise ValueError(f"queries must be (B, D), got shape {tuple(queries.shape)}")
    batch, dim = queries.shape
    if positive_embeddings.dim() == 2:
        positive_embeddings = positive_embeddings.unsqueeze(1)
    if positive_embeddings.dim() != 3 or positive_embeddings.shape[0] != batch or positive_embeddings.shape[2] != dim:
        raise ValueError(
            f"positive_embeddings must be ({batch}, {dim}) or ({batch}, P, {dim}) for queries of shape "
            f"({batch}, {dim}), got {tuple(positive_embeddings.shape)}"
        )
    if negative_embeddings.dim() != 3 or negative_embeddings.shape[0] != batch or negative_embeddings.shape[2] != dim:
        raise ValueError(
            f"negative_embeddings must be ({batch}, M, {dim}) for queries of shape ({batch}, {dim}), "
            f"got {tuple(negative_embeddings.shape)}"
        )

    positive_logits = torch.einsum("bd,bpd->bp", queries, positive_embeddings)
    negative_logits = torch.einsum("bd,bmd->bm", queries, negative_embeddings)
    return sampled_softmax_loss_from_logits(
        positive_logits,
        negative_logits,
        positives,
        sample,
        correct_positive=correct_positive,
        remove_accidental_hits=remove_accidental_hits,
        reduction=reduction,
    )


def sampled_softmax_loss_from_logits(
    positive_logits: torch.Tensor,
    negative_logits: torch.Tensor,
    positives: Any,
    sample: SampleLike,
    *,
    correct_positive: bool = True,
    remove_accidental_hits: bool = True,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Compute the sampled softmax loss from the positives' and the negatives' logits.

    positive_logits: (B,) or (B, P), the model's logit o_y of each positive. negative_logits: (B, M),
    the logit o_j of each drawn negative `sample.ids[b, j]`. positives: the (B,) or (B, P) ids.

    Each negative's logit is corrected to o_j - log(M Q(j|z)), where log Q comes from `sample.log_q`
    and M is the number of draws. With `correct_positive` (the default) the positive is corrected the
    same way with `sample.positive_log_q`, as the MIDX authors train; without it the positive keeps
    o_y, the classic sampled softmax, whose value tends to the full softmax cross-entropy as M grows.
    With the corrected positive the value does not estimate the cross-entropy (it is log(M + 1) for
    every query when Q equals the softmax), but the gradient does. That holds exactly in the limit
    without accidental-hit masking; with masking, the gradient lacks the positive's own softmax
    term P(y|z), which is small when the softmax is spread over many classes.

    A positive whose log Q is -inf (a class the proposal never draws, for example one of weight 0)
    cannot be corrected: its term uses the uncorrected logit o_y instead of producing NaN.
    With `remove_accidental_hits` (the default) a negative equal to any positive of its query is
    left out of that query's terms. Every (query, positive) pair is one term: a softmax over that
    positive and the query's negatives, so the other positives of the query never act as negatives.

    reduction: "mean" over all B x P terms (the default), "sum", or "none" for the terms themselves,
    shaped like `positives`. Raises ValueError on mismatched shapes, a missing or +inf/NaN
    positive_log_q, or a negative whose log Q is not finite (a negative that was drawn must have Q > 0).
    """
    one_positive = positive_logits.dim() == 1
    positive_logits = positive_logits.unsqueeze(1) if one_positive else positive_logits
    if positive_logits.dim() != 2 or negative_logits.dim() != 2:
        raise ValueError(
            f"positive_logits must be (B,) or (B, P) and negative_logits (B, M), got shapes "
            f"{tuple(positive_logits.shape)} and {tuple(negative_logits.shape)}"
        )
    batch, num_positives = positive_logits.shape
    num_samples = negative_logits.shape[1]
    if negative_logits.shape[0] != batch:
        raise ValueError(
            f"negative_logits has {negative_logits.shape[0]} rows but positive_logits has {batch}; "
            "give one row per query"
        )
    if num_samples == 0:
        raise ValueError("negative_logits has 0 columns; request at least one negative per query")
    device = negative_logits.device
    dtype = negative_logits.dtype
    positive_ids = _as_matrix(positives, "positives", (batch, num_positives), torch.int64, device)
    negative_ids = _as_matrix(sample.ids, "sample.ids", (batch, num_samples), torch.int64, device)
    log_q = _as_matrix(sample.log_q, "sample.log_q", (batch, num_samples), dtype, device)
    if not bool(torch.isfinite(log_q).all()):
        raise ValueError(
            "sample.log_q has a non-finite entry, but every drawn negative has Q > 0; pass the log_q "
            "that came with these negatives"
        )

    log_num_samples = math.log(num_samples)
    corrected_negatives = negative_logits - (log_q + log_num_samples)
    if remove_accidental_hits:
        hits = (negative_ids.unsqueeze(2) == positive_ids.unsqueeze(1)).any(dim=2)
        corrected_negatives = corrected_negatives.masked_fill(hits, -math.inf)

    corrected_positives = positive_logits
    if correct_positive:
        corrected_positives = positive_logits - _positive_correction(
            sample.positive_log_q, (batch, num_positives), dtype, device, log_num_samples
        )

    # The positive sits in the same log-sum-exp as the masked (-inf) negatives, so the log-sum-exp is
    # finite and its gradient defined even when every negative of a query is an accidental hit.
    logits = torch.cat(
        [
            corrected_positives.unsqueeze(2),
            corrected_negatives.unsqueeze(1).expand(batch, num_positives, num_samples),
        ],
        dim=2,
    )
    terms = torch.logsumexp(logits, dim=2) - corrected_positives

    if reduction == "mean":
        return terms.mean()
    if reduction == "sum":
        return terms.sum()
    if reduction == "none":
        return terms.squeeze(1) if one_positive else terms
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def _positive_correction(
    positive_log_q: Any,
    shape: tuple[int, int],
    dtype: torch.dtype,
    device: torch.device,
    log_num_samples: float,
) -> torch.Tensor:
    """Return log(M Q(y|z)) per positive, and 0 where log Q is -inf so that term stays uncorrected."""
    if positive_log_q is None:
        raise ValueError(
            "correct_positive needs sample.positive_log_q: request the sample with positives=..., "
            "or pass correct_positive=False"
        )
    log_q = _as_matrix(positive_log_q, "sample.positive_log_q", shape, dtype, device)
    if bool(torch.isnan(log_q).any() | torch.isposinf(log_q).any()):
        raise ValueError("sample.positive_log_q has a NaN or +inf entry; a log probability is at most 0")
    never_drawn = torch.isneginf(log_q)
    return torch.where(never_drawn, 0.0, log_q + log_num_samples)


def _as_matrix(
    values: Any, name: str, shape: tuple[int, int], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    tensor = torch.as_tensor(values, device=device)
    if tensor.dim() == 1 and shape[1] == 1:
        tensor = tensor.unsqueeze(1)
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}")
    if dtype == torch.int64 and tensor.is_floating_point():
        raise ValueError(f"{name} must hold integer class ids, got dtype {tensor.dtype}")
    return tensor.to(dtype)
