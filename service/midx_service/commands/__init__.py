"""Subcommands of the midx-sampler command line."""
