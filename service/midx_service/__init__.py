"""MIDX sampling service: the index core, the registry and the gRPC and REST front ends."""
