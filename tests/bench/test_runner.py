"""Tests of the core benchmark's runner and report on a small synthetic table."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from midx_service.bench.report import END_MARKER, START_MARKER, render_markdown, replace_section
from midx_service.bench.runner import BenchPlan, run_benchmark
from midx_service.bench.samplers import two_stage_multinomial
from midx_service.core import IndexConfig, MidxIndex
from tests.core.conftest import assert_draws_follow, brute_force_log_q

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def result():
    generator = np.random.default_rng(0)
    table = generator.standard_normal((3000, 8)).astype(np.float32)
    queries = generator.standard_normal((1024, 8)).astype(np.float32) * 0.5
    training = generator.standard_normal((64, 8)).astype(np.float32) * 0.5
    plan = BenchPlan(
        codewords=(8, 64),
        scaling_sizes=(1000, 6000),
        kl_queries=32,
        repeats=1,
        exact_repeats=1,
        learned_codewords=(8,),
        learning_seconds=5.0,
    )
    return run_benchmark(table, queries, plan, training_queries=training, table_name="synthetic")


def test_benchmark_reports_every_figure(result):
    samplers = {(entry["sampler"], entry["num_codewords"]) for entry in result["throughput"]}
    assert samplers == {
        ("exact", None),
        *((f"midx-{quantizer}", k) for quantizer in ("rq", "pq") for k in (8, 64)),
        *((name, k) for name in ("two-stage", "floor") for k in (8, 64)),
    }
    assert all(entry["queries_per_second"] > 0 for entry in result["throughput"])
    assert [entry["num_classes"] for entry in result["scaling"]] == [1000, 6000]
    assert result["build_seconds"] > 0
    assert result["update_1000_rows_seconds"] > 0
    kl_entries = {(entry["sampler"], entry["num_codewords"]): entry["kl"] for entry in result["kl"]}
    assert set(kl_entries) == {
        ("uniform", None),
        ("unigram", None),
        ("midx-rq-kl", 8),
        *((f"midx-{q}", k) for q in ("rq", "pq") for k in (8, 64)),
    }
    assert all(value >= -1e-9 for value in kl_entries.values())
    assert kl_entries[("midx-rq", 64)] < kl_entries[("uniform", None)]


def test_targets_compare_measured_ratios(result):
    targets = result["targets"]

    assert targets["build_seconds"]["met"] == (result["build_seconds"] < 15)
    midx = next(e for e in result["throughput"] if e["sampler"] == "midx-rq" and e["num_codewords"] == 64)
    exact = next(e for e in result["throughput"] if e["sampler"] == "exact")
    assert targets["midx_over_exact"]["value"] == pytest.approx(
        midx["queries_per_second"] / exact["queries_per_second"]
    )


def test_markdown_section_is_replaced_in_place(result, tmp_path):
    path = tmp_path / "benchmarks.md"
    path.write_text("# Benchmarks\n\nIntro.\n\n<!-- other:start -->\nkept\n<!-- other:end -->\n")

    replace_section(path, render_markdown(result, "midx-sampler bench"))
    replace_section(path, render_markdown(result, "midx-sampler bench"))

    text = path.read_text()
    assert text.count(START_MARKER) == 1
    assert text.count(END_MARKER) == 1
    assert "kept" in text
    assert "| midx-rq | 64 |" in text


def test_two_stage_baseline_draws_from_the_midx_proposal():
    table = torch.randn(50, 4, generator=torch.Generator().manual_seed(1))
    index = MidxIndex.build(IndexConfig(dim=4, num_codewords=3), table)
    query = torch.randn(1, 4, generator=torch.Generator().manual_seed(2))

    ids, log_q = two_stage_multinomial(index, query, 50_000, torch.Generator().manual_seed(3))

    expected = brute_force_log_q(index, query)
    assert_draws_follow(ids, expected[0].exp())
    torch.testing.assert_close(log_q.double(), expected.gather(1, ids), atol=1e-5, rtol=0)
