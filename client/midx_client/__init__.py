"""Python client of the MIDX sampling service and the trainer-side sampled softmax loss."""

from typing import Any

from midx_client.errors import SamplerError
from midx_client.grpc_client import AsyncSamplerClient, SamplerClient
from midx_client.rest_client import AsyncRestSamplerClient, RestSamplerClient
from midx_client.types import IndexInfo, LogProbResult, SampleResult

__all__ = [
    "AsyncRestSamplerClient",
    "AsyncSamplerClient",
    "IndexInfo",
    "LogProbResult",
    "RestSamplerClient",
    "SampleResult",
    "SamplerClient",
    "SamplerError",
    "sampled_softmax_loss",
    "sampled_softmax_loss_from_logits",
]

_LOSS_FUNCTIONS = ("sampled_softmax_loss", "sampled_softmax_loss_from_logits")


def __getattr__(name: str) -> Any:
    # The loss needs torch; importing it lazily keeps the client usable where torch is absent.
    if name in _LOSS_FUNCTIONS:
        from midx_client import loss

        return getattr(loss, name)
    raise AttributeError(f"module 'midx_client' has no attribute {name!r}")
