"""Measure what the telemetry and learned refits cost on a table of a given size; print one JSON object.

The figures docs/telemetry.md quotes come from `python scripts/measure_telemetry_cost.py` (the
defaults: a GloVe-sized random table, 400,000 x 50, K = 64). Costs depend on the table's shape, not its
values, so a random table replaces real embeddings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Any

import torch

from midx_service.core import IndexConfig, MidxIndex
from midx_service.core.learned import code_marginals
from midx_service.core.telemetry import measure_quality
from midx_service.reservoir import QueryReservoir


def measure(
    num_classes: int, dim: int, num_codewords: int, sample_size: int, batch: int, device: str
) -> dict[str, Any]:
    """Return the seconds each step takes: reservoir copy, one quality measurement, one softmax pass."""
    generator = torch.Generator().manual_seed(0)
    table = torch.randn(num_classes, dim, generator=generator) * 0.4
    queries = torch.randn(max(sample_size, batch), dim, generator=generator)
    index = MidxIndex.build(IndexConfig(dim=dim, num_codewords=num_codewords), table, device=device)

    reservoir = QueryReservoir(4096, dim)
    rows = queries[:batch].numpy()
    repeats = 200
    started = time.perf_counter()
    for _ in range(repeats):
        reservoir.add(rows)
    reservoir_seconds = (time.perf_counter() - started) / repeats

    started = time.perf_counter()
    measure_quality(index, queries[:sample_size].to(index.device))
    quality_seconds = time.perf_counter() - started

    # One exact softmax pass of a kl refit: the per-code marginals of P for every query.
    started = time.perf_counter()
    code_marginals(index, queries[:sample_size].to(index.device), index.codes)
    marginals_seconds = time.perf_counter() - started

    return {
        "num_classes": num_classes,
        "dim": dim,
        "num_codewords": num_codewords,
        "sample_size": sample_size,
        "batch": batch,
        "device": str(index.device),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "reservoir_add_seconds": reservoir_seconds,
        "measure_quality_seconds": quality_seconds,
        "kl_refit_pass_seconds_per_query": marginals_seconds / sample_size,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-classes", type=int, default=400_000, help="rows N of the random table")
    parser.add_argument("--dim", type=int, default=50, help="dimension D")
    parser.add_argument("--num-codewords", type=int, default=64, help="codewords K per codebook")
    parser.add_argument("--sample-size", type=int, default=64, help="queries per quality measurement")
    parser.add_argument("--batch", type=int, default=1024, help="rows of one request copied into the reservoir")
    parser.add_argument("--device", default="cpu", help="torch device: cpu or cuda")
    args = parser.parse_args(argv)

    result = measure(args.num_classes, args.dim, args.num_codewords, args.sample_size, args.batch, args.device)
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
