"""Benchmarks of the index core against reference samplers."""
