"""The CI load test: about 30 s of load against a server started on loopback, through loadtest/run.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

RUN = Path(__file__).resolve().parents[2] / "loadtest" / "run.py"
EXPECTED_CALLS = {
    ("REST", "POST /v1/indexes/[name]/sample"),
    ("REST", "PATCH /v1/indexes/[name]/embeddings"),
    ("REST", "POST /v1/indexes/[name]/log-prob"),
    ("gRPC", "Sample"),
    ("gRPC", "UpdateEmbeddings"),
    ("gRPC", "LogProb"),
}


def run_load_test(out: Path, *arguments: str, timeout_seconds: float) -> tuple[subprocess.CompletedProcess, dict]:
    result = subprocess.run(
        [sys.executable, str(RUN), "--out", str(out), *arguments],
        capture_output=True,
        text=True,
        timeout=timeout_seconds,
    )
    summary_path = out / "summary.json"
    assert summary_path.exists(), f"no summary written:\n{result.stdout}\n{result.stderr}"
    return result, json.loads(summary_path.read_text())


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_glove_load_has_no_errors_and_fast_health(tmp_path):
    result, summary = run_load_test(
        tmp_path, "--table", "glove", "--run-time-seconds", "30", "--users", "4", timeout_seconds=360
    )
    report = f"{result.stdout}\n{result.stderr[-3000:]}"

    assert result.returncode == 0, report
    assert summary["problems"] == [], report
    assert summary["failures"] == 0, report
    assert summary["health"]["failures"] == 0, report
    assert summary["health"]["p99_ms"] <= 500, report
    calls = {(call["transport"], call["call"]): call for call in summary["calls"]}
    assert set(calls) == EXPECTED_CALLS, report
    for key, call in calls.items():
        assert call["requests"] > 0, f"{key} never ran\n{report}"
    assert (tmp_path / "report.html").stat().st_size > 0
    assert (tmp_path / "locust_stats.csv").exists()


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_load_fails_when_health_limit_exceeded(tmp_path):
    result, summary = run_load_test(
        tmp_path,
        *("--table", "random", "--rows", "5000", "--update-rows", "50"),
        *("--run-time-seconds", "3", "--users", "2", "--health-p99-ms", "0.001"),
        timeout_seconds=180,
    )

    assert result.returncode == 1
    assert summary["failures"] == 0
    assert any("GET /healthz p99 latency" in problem for problem in summary["problems"]), summary["problems"]
    assert "verdict: FAILED" in result.stdout
