"""The core benchmark on the GloVe 6B 50d table: throughput, scaling in N, build, updates and KL(P || Q)."""

from __future__ import annotations

import logging
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch

from midx_service.bench.samplers import Floor, two_stage_multinomial
from midx_service.core import IndexConfig, MidxIndex
from midx_service.core.learned import fit_kl_codebooks

logger = logging.getLogger(__name__)

BATCH = 1024
NUM_SAMPLES = 100
TARGET_CODEWORDS = 64


@dataclass(frozen=True)
class BenchPlan:
    """The figures one run measures; `quick` trades repeats and coverage for a run of a few minutes."""

    codewords: tuple[int, ...]
    scaling_sizes: tuple[int, ...]
    kl_queries: int
    repeats: int
    exact_repeats: int
    learned_codewords: tuple[int, ...] = ()
    learning_seconds: float = 60.0

    @classmethod
    def full(cls) -> BenchPlan:
        return cls((32, 64, 128, 256), (40_000, 400_000, 4_000_000), 1024, 15, 2, (32, 64, 128), 120.0)

    @classmethod
    def quick(cls) -> BenchPlan:
        return cls((32, 64), (40_000, 400_000, 4_000_000), 256, 5, 1, (64,), 60.0)


def run_benchmark(
    table: np.ndarray,
    queries: np.ndarray,
    plan: BenchPlan,
    *,
    training_queries: np.ndarray | None = None,
    device: str = "cpu",
    table_name: str = "GloVe 6B 50d",
    progress: Callable[[str], None] = logger.info,
) -> dict[str, Any]:
    """Measure every figure of the benchmark in one run and return them as one JSON-ready dict.

    table: (N, D) float32 class table (GloVe rows in frequency order, which the unigram baseline's
    Zipf weights 1 / (rank + 1) rely on). queries: (Q, D) context-like query vectors; the first
    BATCH are timed and the first plan.kl_queries enter the KL estimate. training_queries: (R, D)
    queries the learned codebooks are fitted on, for each K in plan.learned_codewords; they should not
    overlap the evaluation queries.
    """
    torch_table = torch.from_numpy(np.ascontiguousarray(table, dtype=np.float32)).to(device)
    weights = 1.0 / torch.arange(1, table.shape[0] + 1, dtype=torch.float64)
    batch = _query_batch(queries, BATCH, device)
    started = time.perf_counter()
    result: dict[str, Any] = {
        "machine": machine_description(),
        "table": table_name,
        "batch": BATCH,
        "num_samples": NUM_SAMPLES,
        "num_classes": int(table.shape[0]),
        "dim": int(table.shape[1]),
        "throughput": [],
        "kl": [],
    }

    progress("timing exact softmax sampling")
    exact_index = MidxIndex.build(IndexConfig(dim=table.shape[1], num_codewords=1), torch_table, weights, device=device)
    exact_seconds = _median_seconds(
        partial(exact_index.sample, batch, NUM_SAMPLES, sampler="exact", seed=0), plan.exact_repeats
    )
    result["throughput"].append(_throughput("exact", None, exact_seconds))
    kl_queries = _query_batch(queries, plan.kl_queries, device)
    for sampler in ("uniform", "unigram"):
        divergence = _kl(torch_table, exact_index, kl_queries, sampler)
        result["kl"].append({"sampler": sampler, "num_codewords": None, "kl": divergence})

    for num_codewords in plan.codewords:
        for quantizer in ("rq", "pq"):
            progress(f"building midx-{quantizer} with K = {num_codewords}")
            config = IndexConfig(dim=table.shape[1], num_codewords=num_codewords, quantizer=quantizer)
            build_started = time.perf_counter()
            index = MidxIndex.build(config, torch_table, weights, device=device)
            build_seconds = time.perf_counter() - build_started
            if quantizer == "rq" and num_codewords == TARGET_CODEWORDS:
                result["build_seconds"] = build_seconds
                result["update_1000_rows_seconds"] = _update_seconds(index, plan.repeats)
            seconds = _median_seconds(partial(index.sample, batch, NUM_SAMPLES, seed=0), plan.repeats)
            result["throughput"].append(_throughput(f"midx-{quantizer}", num_codewords, seconds))
            result["kl"].append(
                {
                    "sampler": f"midx-{quantizer}",
                    "num_codewords": num_codewords,
                    "kl": _kl(torch_table, index, kl_queries, "midx"),
                    "quantization_error": index.quantization_error,
                }
            )
            if quantizer == "rq" and num_codewords in plan.learned_codewords and training_queries is not None:
                progress(f"learning KL codebooks with K = {num_codewords} (at most {plan.learning_seconds:.0f} s)")
                result["kl"].append(_learned_kl(index, torch_table, kl_queries, training_queries, plan))
            if quantizer == "rq":
                progress(f"timing the two-stage multinomial sampler and the floor with K = {num_codewords}")
                generator = torch.Generator(device=device).manual_seed(0)
                seconds = _median_seconds(
                    partial(two_stage_multinomial, index, batch, NUM_SAMPLES, generator), plan.repeats
                )
                result["throughput"].append(_throughput("two-stage", num_codewords, seconds))
                floor = Floor(index, BATCH)
                seconds = _median_seconds(partial(floor, batch, NUM_SAMPLES, generator), plan.repeats)
                result["throughput"].append(_throughput("floor", num_codewords, seconds))

    result["scaling"] = _scaling(torch_table, batch, plan, device, progress)
    result["targets"] = check_targets(result)
    result["wall_seconds"] = time.perf_counter() - started
    return result


def check_targets(result: dict[str, Any]) -> dict[str, Any]:
    """Compare the measured figures with the performance targets; each entry gives value, target and met."""

    def qps(sampler: str, num_codewords: int | None) -> float:
        for entry in result["throughput"]:
            if entry["sampler"] == sampler and entry["num_codewords"] == num_codewords:
                return float(entry["queries_per_second"])
        return math.nan

    def kl(sampler: str, num_codewords: int | None) -> float:
        for entry in result["kl"]:
            if entry["sampler"] == sampler and entry["num_codewords"] == num_codewords:
                return float(entry["kl"])
        return math.nan

    midx = qps("midx-rq", TARGET_CODEWORDS)
    scaling = {entry["num_classes"]: entry["seconds_per_query"] for entry in result.get("scaling", [])}
    smallest, largest = (min(scaling), max(scaling)) if scaling else (0, 0)
    targets = {
        "midx_over_exact": (midx / qps("exact", None), ">= 100"),
        "midx_over_two_stage": (midx / qps("two-stage", TARGET_CODEWORDS), ">= 10"),
        "floor_over_midx": (qps("floor", TARGET_CODEWORDS) / midx, "<= 4"),
        "largest_over_smallest_seconds_per_query": (
            scaling[largest] / scaling[smallest] if scaling else math.nan,
            "<= 1.3",
        ),
        "build_seconds": (result.get("build_seconds", math.nan), "< 15"),
        "update_1000_rows_seconds": (result.get("update_1000_rows_seconds", math.nan), "< 0.05"),
        "midx_rq_kl_over_uniform_kl": (kl("midx-rq", TARGET_CODEWORDS) / kl("uniform", None), "< 0.5"),
        "midx_rq_kl_over_unigram_kl": (kl("midx-rq", TARGET_CODEWORDS) / kl("unigram", None), "< 0.5"),
        "learned_kl_over_kmeans_kl": (kl("midx-rq-kl", TARGET_CODEWORDS) / kl("midx-rq", TARGET_CODEWORDS), "<= 0.8"),
    }
    return {
        name: {"value": value, "target": target, "met": _meets(value, target)}
        for name, (value, target) in targets.items()
    }


def machine_description() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def _meets(value: float, target: str) -> bool:
    operator, bound = target.split()
    comparisons = {
        ">=": value >= float(bound),
        "<=": value <= float(bound),
        "<": value < float(bound),
    }
    return bool(comparisons[operator])


def _query_batch(queries: np.ndarray, count: int, device: str) -> torch.Tensor:
    if queries.shape[0] < count:
        raise ValueError(f"the benchmark needs {count} queries, got {queries.shape[0]}")
    return torch.from_numpy(np.ascontiguousarray(queries[:count], dtype=np.float32)).to(device)


def _median_seconds(call: Callable[[], object], repeats: int) -> float:
    call()  # warm-up: first-touch allocations and lazily built structures
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        timings.append(time.perf_counter() - started)
    return statistics.median(timings)


def _throughput(sampler: str, num_codewords: int | None, seconds: float) -> dict[str, Any]:
    return {
        "sampler": sampler,
        "num_codewords": num_codewords,
        "seconds_per_batch": seconds,
        "queries_per_second": BATCH / seconds,
    }


def _update_seconds(index: MidxIndex, repeats: int) -> float:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randperm(index.num_classes, generator=generator)[:1000]
    rows = index.embeddings[ids] + 0.1 * torch.randn(1000, index.config.dim, generator=generator)
    return _median_seconds(partial(index.update_rows, ids, rows), repeats)


def _scaling(
    table: torch.Tensor, batch: torch.Tensor, plan: BenchPlan, device: str, progress: Callable[[str], None]
) -> list[dict[str, Any]]:
    """Seconds per query of midx-rq at K = 64 on tables sub-sampled from, or tiled with noise over, GloVe."""
    entries = []
    generator = torch.Generator().manual_seed(2)
    for size in plan.scaling_sizes:
        progress(f"timing midx-rq on {size:,} classes")
        scaled = _resize_table(table.cpu(), size, generator).to(device)
        index = MidxIndex.build(IndexConfig(dim=table.shape[1], num_codewords=TARGET_CODEWORDS), scaled, device=device)
        seconds = _median_seconds(partial(index.sample, batch, NUM_SAMPLES, seed=0), plan.repeats)
        entries.append({"num_classes": size, "seconds_per_query": seconds / BATCH})
    return entries


def _resize_table(table: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    if size <= table.shape[0]:
        return table[torch.randperm(table.shape[0], generator=generator)[:size]]
    copies = math.ceil(size / table.shape[0])
    tiled = table.repeat(copies, 1)[:size]
    # Noise of a tenth of the per-coordinate spread keeps the copies distinct but on the same shape.
    spread = table.std(dim=0, keepdim=True)
    return tiled.add_(torch.randn(tiled.shape, generator=generator).mul_(0.1 * spread))


def _learned_kl(
    index: MidxIndex, table: torch.Tensor, kl_queries: torch.Tensor, training_queries: np.ndarray, plan: BenchPlan
) -> dict[str, Any]:
    train = torch.from_numpy(np.ascontiguousarray(training_queries, dtype=np.float32)).to(table.device)
    learned, report = fit_kl_codebooks(index, train, max_steps=10_000, time_budget_seconds=plan.learning_seconds)
    return {
        "sampler": "midx-rq-kl",
        "num_codewords": index.config.num_codewords,
        "kl": _kl(table, learned, kl_queries, "midx"),
        "quantization_error": learned.quantization_error,
        "accepted": report.accepted,
        "learning_seconds": report.seconds,
        "training_queries": report.num_train_queries,
    }


def _kl(table: torch.Tensor, index: MidxIndex, queries: torch.Tensor, sampler: str) -> float:
    """Mean over queries of KL(P || Q) in nats, P the exact softmax over the table, in chunks of queries."""
    ids = torch.arange(index.num_classes, device=queries.device)
    total = 0.0
    for chunk in queries.split(64):
        log_p = torch.log_softmax((chunk @ table.T).double(), dim=1)
        if sampler == "midx":
            log_q = index.log_prob_all(chunk).double()
        else:
            log_q = index.log_prob(chunk, ids.expand(chunk.shape[0], -1), sampler=sampler).double()
        p = log_p.exp()
        # Classes with P = 0 contribute nothing, also where Q = 0.
        total += float(torch.where(p > 0, p * (log_p - log_q), 0.0).sum())
    return total / queries.shape[0]
