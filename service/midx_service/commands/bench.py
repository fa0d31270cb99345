"""Benchmark the index core on the GloVe 6B 50d table (throughput, scaling, build, updates, KL)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from midx_service.bench.report import render_markdown, replace_section
from midx_service.bench.runner import BenchPlan, run_benchmark

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quick",
        action="store_true",
        help="reduced run (K in 32, 64; fewer repeats and queries), about 3 minutes on 2 cores",
    )
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object on stdout")
    parser.add_argument("--device", default="cpu", help="torch device to run the index on (cpu, cuda)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's own choice, one per core)",
    )
    parser.add_argument(
        "--markdown",
        type=Path,
        default=None,
        metavar="PATH",
        help="write the results into the benchmark section of this Markdown file (e.g. docs/benchmarks.md)",
    )


def run(args: argparse.Namespace) -> int:
    from midx_service.data.corpus import context_queries
    from midx_service.data.glove import load_glove

    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    plan = BenchPlan.quick() if args.quick else BenchPlan.full()
    started = time.perf_counter()
    logger.info("loading the GloVe table and context queries")
    table, _ = load_glove()
    queries = context_queries(max(1024, plan.kl_queries), seed=0)
    training_queries = context_queries(512 if args.quick else 2048, seed=1)
    result = run_benchmark(table, queries, plan, training_queries=training_queries, device=args.device)
    command = "midx-sampler bench" + (" --quick" if args.quick else "")
    if args.threads is not None:
        command += f" --threads {args.threads}"
    logger.info("benchmark finished in %.0f s", time.perf_counter() - started)

    if args.markdown is not None:
        replace_section(args.markdown, render_markdown(result, command))
        logger.info("wrote the benchmark section of %s", args.markdown)
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render_markdown(result, command))
    return 0
