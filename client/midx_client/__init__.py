"""Python client of the MIDX sampling service and the trainer-side sampled softmax loss."""
