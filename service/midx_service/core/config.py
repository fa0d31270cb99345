"""Configuration of one MIDX index and the result type every sampler returns."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch

from midx_service.errors import InvalidArgumentError

Quantizer = Literal["rq", "pq"]
LastStage = Literal["uniform", "popularity"]
Metric = Literal["dot", "cosine"]
SamplerName = Literal["midx", "uniform", "unigram", "exact"]

QUANTIZERS: tuple[str, ...] = ("rq", "pq")
LAST_STAGES: tuple[str, ...] = ("uniform", "popularity")
METRICS: tuple[str, ...] = ("dot", "cosine")
SAMPLERS: tuple[str, ...] = ("midx", "uniform", "unigram", "exact")

MAX_NUM_CODEWORDS = 4096


@dataclass(frozen=True)
class IndexConfig:
    """Shape and kind of an index: what a client sends when it creates one.

    `unigram_alpha` is the exponent of the unigram baseline (Q proportional to weight ** alpha).
    """

    dim: int
    num_codewords: int = 64
    quantizer: Quantizer = "rq"
    last_stage: LastStage = "uniform"
    metric: Metric = "dot"
    unigram_alpha: float = 0.75

    def __post_init__(self) -> None:
        if isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim < 1:
            raise InvalidArgumentError(f"dim must be a positive integer, got {self.dim!r}")
        if (
            isinstance(self.num_codewords, bool)
            or not isinstance(self.num_codewords, int)
            or not 1 <= self.num_codewords <= MAX_NUM_CODEWORDS
        ):
            raise InvalidArgumentError(
                f"num_codewords must be an integer in [1, {MAX_NUM_CODEWORDS}], got {self.num_codewords!r}"
            )
        _check_choice("quantizer", self.quantizer, QUANTIZERS)
        _check_choice("last_stage", self.last_stage, LAST_STAGES)
        _check_choice("metric", self.metric, METRICS)
        if self.quantizer == "pq" and self.dim < 2:
            raise InvalidArgumentError(
                f"quantizer 'pq' splits each vector in two halves and needs dim >= 2, got dim {self.dim}"
            )
        alpha = self.unigram_alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 10.0:
            raise InvalidArgumentError(f"unigram_alpha must be a number in [0, 10], got {alpha!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> IndexConfig:
        known = {field: values[field] for field in cls.__dataclass_fields__ if field in values}
        unknown = sorted(set(values) - set(cls.__dataclass_fields__))
        if unknown:
            raise InvalidArgumentError(
                f"unknown index option(s) {unknown}; expected some of {sorted(cls.__dataclass_fields__)}"
            )
        return cls(**known)


@dataclass(frozen=True)
class SampleResult:
    """Negatives drawn for a batch of B queries.

    ids: (B, M) int64 class ids. log_q: (B, M) float32, the normalised natural log of each draw's
    proposal probability. positive_log_q: (B, P) float32 log Q of the caller's positives under the full
    proposal (before any exclusion), or None when no positives were given. A log Q of -inf marks a class
    that can never be drawn.
    """

    ids: torch.Tensor
    log_q: torch.Tensor
    positive_log_q: torch.Tensor | None = None


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InvalidArgumentError(f"{name} must be one of {list(choices)}, got {value!r}")
