"""Generated gRPC code for the midx.v1 protocol; regenerate with scripts/gen_proto.py."""
