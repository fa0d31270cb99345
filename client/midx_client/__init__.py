"""Python client of the MIDX sampling service and the trainer-side sampled softmax loss."""

from midx_client.loss import sampled_softmax_loss, sampled_softmax_loss_from_logits

__all__ = ["sampled_softmax_loss", "sampled_softmax_loss_from_logits"]
