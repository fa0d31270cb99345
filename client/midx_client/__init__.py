"""Python client of the MIDX sampling service and the trainer-side sampled softmax loss."""

from midx_client.errors import SamplerError
from midx_client.grpc_client import AsyncSamplerClient, SamplerClient
from midx_client.loss import sampled_softmax_loss, sampled_softmax_loss_from_logits
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
