"""End-to-end tests of `midx-sampler demo` on a tiny budget, through a real service."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path

import pytest

from midx_client import SamplerClient
from midx_service.cli import main
from midx_service.commands import demo as demo_command
from midx_service.data.glove import MissingDataError
from midx_service.demo.report import END_MARKER, START_MARKER
from tests.conftest import RunningServer

# A tiny budget over the 5,000 most frequent words keeps one run to a few seconds after the corpus is built.
TINY = ["--num-classes", "5000", "--steps", "4", "--batch-size", "16", "--eval-every", "2", "--eval-tokens", "64"]


@pytest.mark.slow
def test_demo_runs_every_sampler_through_service(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    markdown = tmp_path / "benchmarks.md"
    markdown.write_text("# Benchmarks\n\n<!-- core-benchmark:start -->\ncore\n<!-- core-benchmark:end -->\n")
    plot = tmp_path / "demo.png"

    code = main(["demo", *TINY, "--kl-refit-every", "2", "--json", "--markdown", str(markdown), "--plot", str(plot)])

    assert code == 0
    payload = json.loads(capsys.readouterr().out)
    results = payload["results"]
    assert [result["sampler"] for result in results] == ["full", "uniform", "unigram", "midx-rq", "midx-rq-kl"]
    for result in results:
        assert math.isfinite(result["perplexity"])
        assert result["perplexity"] > 1.0
        assert result["seconds"] > 0.0
        assert result["seconds_per_step"] == pytest.approx(result["seconds"] / 4)
        assert [point["step"] for point in result["curve"]] == [0, 2, 4]
    assert payload["context"]["transport"] == "gRPC to a local service"
    assert all(result["service_share"] > 0.0 for result in results[1:])
    # The service learned codebooks once, after step 2 of 4, from the queries it served.
    assert [refit["step"] for refit in results[4]["refits"]] == [2]
    refit = results[4]["refits"][0]
    assert refit["heldout_kl_after"] <= refit["heldout_kl_before"]
    assert all(result["refits"] == [] for result in results[:4])
    text = markdown.read_text()
    assert "core\n<!-- core-benchmark:end -->" in text
    assert START_MARKER in text
    assert END_MARKER in text
    assert "| midx-rq |" in text
    assert "| midx-rq-kl |" in text
    assert "had the service learn its codebooks by KL after steps 2," in text
    assert plot.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_demo_uses_running_service_over_rest(
    start_server: Callable[..., RunningServer], capsys: pytest.CaptureFixture[str]
) -> None:
    server = start_server(api_token="demo-test-token")

    code = main(
        [
            "demo",
            *TINY,
            "--samplers",
            "midx-rq",
            "--seeds",
            "3,5",
            "--url",
            server.http_url,
            "--token",
            "demo-test-token",
            "--json",
            "--no-write",
        ]
    )

    assert code == 0
    payload = json.loads(capsys.readouterr().out)
    assert [(result["sampler"], result["seed"]) for result in payload["results"]] == [("midx-rq", 3), ("midx-rq", 5)]
    assert payload["summary"][0]["runs"] == 2
    assert payload["context"]["transport"].startswith("REST to http://127.0.0.1:")
    assert server.server.registry.states() == []


def test_demo_rejects_unknown_sampler(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["demo", "--samplers", "full,exact", "--no-write"])

    assert code == 2
    assert "--samplers" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--seeds", "0,x"], "--seeds takes comma-separated integers, got '0,x'"),
        (["--seeds", "1,1"], "--seeds takes distinct integers of 0 or more, got '1,1'"),
        (["--seeds", "0,-1"], "--seeds takes distinct integers of 0 or more, got '0,-1'"),
        (["--seeds", "0,,1"], "--seeds takes comma-separated integers, got '0,,1'"),
        (["--seed", "-1"], "--seed must be 0 or more, got -1"),
        (["--kl-refit-seconds", "inf"], "--kl-refit-seconds must be above 0 and at most 86400, got inf"),
        (["--kl-refit-seconds", "nan"], "--kl-refit-seconds must be above 0 and at most 86400, got nan"),
        (["--seeds", "0,1", "--seed", "2"], "--seed and --seeds are mutually exclusive"),
        (["--kl-refit-every", "0"], "--kl-refit-every must be at least 1, got 0"),
        (["--kl-refit-seconds", "0"], "--kl-refit-seconds must be above 0 and at most 86400, got 0.0"),
    ],
)
def test_demo_rejects_bad_budget(arguments: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["demo", *arguments, "--no-write"])

    assert code == 2
    assert message in capsys.readouterr().err


def test_demo_warns_about_unused_refit_interval(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def stop_before_loading(*args: object) -> None:
        raise MissingDataError("stopped by the test before loading data")

    monkeypatch.setattr(demo_command, "_prepare_job", stop_before_loading)

    with caplog.at_level(logging.WARNING, logger="midx_service.commands.demo"):
        code = main(["demo", "--samplers", "midx-rq", "--kl-refit-every", "10", "--no-write"])

    assert code == 1
    assert "--kl-refit-every applies only to the midx-rq-kl run" in caplog.text


def test_demo_rejects_zero_steps(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["demo", "--steps", "0", "--no-write"])

    assert code == 2
    assert "--steps must be at least 1" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_stops_when_index_exists(
    start_server: Callable[..., RunningServer], capsys: pytest.CaptureFixture[str]
) -> None:
    server = start_server()
    with SamplerClient(server.grpc_target) as client:
        client.create_index("taken", dim=50)

        code = main(["demo", *TINY, "--samplers", "uniform", "--url", server.grpc_target, "--index-name", "taken"])

        assert code == 1
        assert "taken" in capsys.readouterr().err
        assert [info.name for info in client.list_indexes()] == ["taken"]


def test_demo_without_matplotlib_names_data_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec_without_matplotlib(name: str, package: str | None = None) -> object:
        return None if name == "matplotlib" else real_find_spec(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec_without_matplotlib)

    code = main(["demo", "--plot", str(tmp_path / "plot.png")])

    assert code == 1
    assert "midx-sampler[data]" in capsys.readouterr().err
    assert not (tmp_path / "plot.png").exists()
