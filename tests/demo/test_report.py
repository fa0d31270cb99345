"""Tests of the main job's output: the docs section, the plot and the JSON object."""

from __future__ import annotations

from pathlib import Path

import pytest

from midx_service.demo.report import (
    END_MARKER,
    START_MARKER,
    RunContext,
    format_table,
    render_markdown,
    replace_section,
    results_json,
    summarise,
    write_plot,
)
from midx_service.demo.sources import KlRefit
from midx_service.demo.training import CurvePoint, RefitPoint, RunResult, TrainingConfig

CONTEXT = RunContext(
    command="midx-sampler demo",
    transport="gRPC to a local service",
    num_classes=400_000,
    num_train_tokens=1000,
    eval_tokens=64,
    unigram_weights="Zipf weights",
    midx_index="K = 64 residual quantisation",
    machine="2 CPU cores",
    total_seconds=30.0,
)


def _results() -> list[RunResult]:
    full = RunResult("full", steps=10, seconds=20.0, service_seconds=0.0, setup_seconds=0.0)
    full.curve = [CurvePoint(0, 0.0, 4000.0), CurvePoint(10, 20.0, 300.0)]
    midx = RunResult("midx-rq", steps=10, seconds=2.0, service_seconds=1.0, setup_seconds=3.0)
    midx.curve = [CurvePoint(0, 0.0, 4000.0), CurvePoint(10, 2.0, 350.0)]
    return [full, midx]


def _seeded_results() -> list[RunResult]:
    """midx-rq and midx-rq-kl over seeds 0 and 1, the KL runs with one learned refit at step 5."""
    results = []
    for seed, (kmeans, learned) in enumerate([(360.0, 350.0), (380.0, 354.0)]):
        midx = RunResult("midx-rq", steps=10, seconds=2.0 + seed, service_seconds=1.0, setup_seconds=3.0, seed=seed)
        midx.curve = [CurvePoint(0, 0.0, 4000.0), CurvePoint(5, 1.0, 500.0), CurvePoint(10, 2.0 + seed, kmeans)]
        kl = RunResult("midx-rq-kl", steps=10, seconds=6.0, service_seconds=5.0, setup_seconds=3.0, seed=seed)
        kl.curve = [CurvePoint(0, 0.0, 4000.0), CurvePoint(5, 5.0, 480.0), CurvePoint(10, 6.0, learned)]
        kl.refits = [
            RefitPoint(5, KlRefit(7, accepted=True, seconds=4.0, heldout_kl_before=2.0 + seed, heldout_kl_after=1.0))
        ]
        results += [midx, kl]
    return results


def test_replace_section_keeps_other_sections(tmp_path: Path) -> None:
    path = tmp_path / "benchmarks.md"
    path.write_text("# Benchmarks\n\n<!-- core-benchmark:start -->\ncore table\n<!-- core-benchmark:end -->\n")

    replace_section(path, "first demo table\n")
    replace_section(path, "second demo table\n")

    text = path.read_text()
    assert "core table" in text
    assert "second demo table" in text
    assert "first demo table" not in text
    assert text.count(START_MARKER) == 1
    assert text.count(END_MARKER) == 1
    assert text.index("core-benchmark:end") < text.index(START_MARKER)


def test_replace_section_creates_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "docs" / "benchmarks.md"

    replace_section(path, "demo table\n")

    assert path.read_text().startswith("# Benchmarks\n")
    assert f"{START_MARKER}\ndemo table\n{END_MARKER}\n" in path.read_text()


def test_markdown_lists_every_sampler() -> None:
    text = render_markdown(_results(), TrainingConfig(steps=10), CONTEXT, "demo.png")

    assert "| full | 300.0 | 1.00 | 20.0 | 2.000 | 1.000 | 0% |" in text
    assert "| midx-rq | 350.0 | 1.17 | 2.0 | 0.200 | 0.100 | 50% |" in text
    assert "![held-out perplexity against training time](demo.png)" in text
    assert "the evaluations, took 30 s." in text


def test_table_compares_step_time_with_full() -> None:
    table = format_table(_results())

    assert "0.100x" in table
    assert "held-out perplexity before training: 4000" in table


def test_json_has_required_fields() -> None:
    payload = results_json(_results(), TrainingConfig(steps=10), CONTEXT)

    first = payload["results"][0]
    assert [result["sampler"] for result in payload["results"]] == ["full", "midx-rq"]
    assert first["perplexity"] == 300.0
    assert first["seconds"] == 20.0
    assert first["seconds_per_step"] == 2.0
    assert payload["config"]["steps"] == 10


def test_summary_gives_mean_and_sample_std() -> None:
    summaries = summarise(_seeded_results())

    assert [summary.sampler for summary in summaries] == ["midx-rq", "midx-rq-kl"]
    kmeans, learned = summaries
    assert kmeans.perplexity == pytest.approx(370.0)
    # Two runs 20 apart: the sample standard deviation is 20 / sqrt(2).
    assert kmeans.perplexity_std == pytest.approx(20.0 / 2**0.5)
    assert kmeans.seconds == pytest.approx(2.5)
    assert learned.refit_seconds == pytest.approx(4.0)
    assert [point.perplexity for point in kmeans.mean_curve()] == [4000.0, 500.0, 370.0]
    assert [point.seconds for point in kmeans.mean_curve()] == [0.0, 1.0, 2.5]


def test_markdown_reports_seeds_and_refits() -> None:
    text = render_markdown(_seeded_results(), TrainingConfig(steps=10), CONTEXT, None)

    assert "once per seed (0, 1)" in text
    assert "| midx-rq | 370.0 ± 14.1 |" in text
    assert "| midx-rq-kl | 352.0 ± 2.8 |" in text
    assert "| sampler | seed 0 | seed 1 |" in text
    assert "| midx-rq-kl | 350.0 | 354.0 |" in text
    assert "after steps 5," in text
    assert "2 of 2 refits were accepted" in text
    assert "| 5 | 2.500 | 1.000 |" in text


def test_json_lists_runs_refits_and_summary() -> None:
    payload = results_json(_seeded_results(), TrainingConfig(steps=10), CONTEXT)

    assert [(run["sampler"], run["seed"]) for run in payload["results"]] == [
        ("midx-rq", 0),
        ("midx-rq-kl", 0),
        ("midx-rq", 1),
        ("midx-rq-kl", 1),
    ]
    assert payload["results"][1]["refits"] == [
        {"step": 5, "accepted": True, "seconds": 4.0, "heldout_kl_before": 2.0, "heldout_kl_after": 1.0}
    ]
    assert payload["results"][0]["refits"] == []
    summary = {entry["sampler"]: entry for entry in payload["summary"]}
    assert summary["midx-rq-kl"]["runs"] == 2
    assert summary["midx-rq-kl"]["perplexity"] == pytest.approx(352.0)
    assert payload["config"]["seeds"] == [0, 1]


def test_table_shows_spread_and_refits() -> None:
    table = format_table(_seeded_results())

    assert "370.0 ± 14.1" in table
    assert "midx-rq-kl: 2 of 2 learned refits accepted, 4.0 s per run" in table
    assert "Held-out KL(P || Q) 2.50 -> 1.00 at step 5\n" in table


def test_plot_is_png(tmp_path: Path) -> None:
    path = tmp_path / "plot.png"

    write_plot(_seeded_results(), path)

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
