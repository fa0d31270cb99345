"""Python client of the MIDX sampling service and the trainer-side sampled softmax loss."""

from __future__ import annotations

from typing import Any

from midx_client.errors import SamplerError
from midx_client.grpc_client import AsyncSamplerClient, SamplerClient
from midx_client.rest_client import AsyncRestSamplerClient, RestSamplerClient
from midx_client.types import IndexInfo, LogProbResult, ProposalQuality, RefitReport, SampleResult

# The loss needs torch; it is imported on first use so the clients load without it.
_LOSS_NAMES = ("sampled_softmax_loss", "sampled_softmax_loss_from_logits")


def __getattr__(name: str) -> Any:
    if name in _LOSS_NAMES:
        from midx_client import loss

        return getattr(loss, name)
    raise AttributeError(f"module 'midx_client' has no attribute {name!r}")


__all__ = [
    "AsyncRestSamplerClient",
    "AsyncSamplerClient",
    "IndexInfo",
    "LogProbResult",
    "ProposalQuality",
    "RefitReport",
    "RestSamplerClient",
    "SampleResult",
    "SamplerClient",
    "SamplerError",
    "sampled_softmax_loss",
    "sampled_softmax_loss_from_logits",
]
