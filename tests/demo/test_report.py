"""Tests of the main job's output: the docs section, the plot and the JSON object."""

from __future__ import annotations

from pathlib import Path

from midx_service.demo.report import (
    END_MARKER,
    START_MARKER,
    RunContext,
    format_table,
    render_markdown,
    replace_section,
    results_json,
    write_plot,
)
from midx_service.demo.training import CurvePoint, RunResult, TrainingConfig

CONTEXT = RunContext(
    command="midx-sampler demo",
    transport="gRPC to a local service",
    num_classes=400_000,
    num_train_tokens=1000,
    num_heldout_tokens=100,
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
    text = render_markdown(_results(), TrainingConfig(steps=10), CONTEXT, 4000.0, "demo.png")

    assert "| full | 300.0 | 1.00 | 20.0 | 2.000 | 1.000 | 0% |" in text
    assert "| midx-rq | 350.0 | 1.17 | 2.0 | 0.200 | 0.100 | 50% |" in text
    assert "![held-out perplexity against training time](demo.png)" in text
    assert "the evaluations, took 30 s." in text


def test_table_compares_step_time_with_full() -> None:
    table = format_table(_results(), 4000.0)

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


def test_plot_is_png(tmp_path: Path) -> None:
    path = tmp_path / "plot.png"

    write_plot(_results(), path)

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
