"""Tests of the headless runner's report: reading locust's CSV files and judging a run."""

from __future__ import annotations

import math

import pytest
from run import (
    CallStats,
    HealthReport,
    Summary,
    judge,
    read_locust_messages,
    read_locust_stats,
    render_markdown,
)
from workload import WorkloadSettings

# The header locust 2.x writes to PREFIX_stats.csv.
STATS_HEADER = (
    "Type,Name,Request Count,Failure Count,Median Response Time,Average Response Time,Min Response Time,"
    "Max Response Time,Average Content Size,Requests/s,Failures/s,50%,66%,75%,80%,90%,95%,98%,99%,99.9%,"
    "99.99%,100%"
)


def stats_row(kind: str, name: str, requests: int, failures: int, rps: float, p50: str, p99: str) -> str:
    return (
        f"{kind},{name},{requests},{failures},{p50},12.5,3.1,88.0,2048,{rps},0.0,{p50},20,22,24,30,40,50,{p99},90,90,90"
    )


def make_summary(**changes) -> Summary:
    values = dict(
        settings={**WorkloadSettings().__dict__, "api_token": None},
        run_time_seconds=30,
        users=4,
        calls=[
            CallStats("REST", "POST /v1/indexes/[name]/sample", 100, 0, 3.5, 10, 40, 60, 80),
            CallStats("gRPC", "Sample", 200, 0, 6.5, 5, 20, 30, 50),
            CallStats("gRPC", "UpdateEmbeddings", 50, 0, 1.0, 5, 20, 30, 50),
        ],
        health=HealthReport(probes=300, failures=0, p50_ms=2, p95_ms=5, p99_ms=9, max_ms=20),
        memory_mib={"started": 300, "before_load": 600, "after_load": 650, "peak_during_load": 700},
        locust_exit_code=0,
    )
    values.update(changes)
    return Summary(**values)


def test_read_locust_stats_skips_aggregated_row(tmp_path):
    path = tmp_path / "locust_stats.csv"
    path.write_text(
        "\n".join(
            [
                STATS_HEADER,
                stats_row("POST", "/v1/indexes/[name]/sample", 120, 2, 4.25, "11", "60"),
                stats_row("grpc", "Sample", 300, 0, 10.0, "7", "35"),
                stats_row("grpc", "LogProb", 0, 0, 0.0, "N/A", "N/A"),
                stats_row("", "Aggregated", 420, 2, 14.25, "9", "55"),
            ]
        )
        + "\n"
    )

    calls = read_locust_stats(path)

    assert [(call.transport, call.call) for call in calls] == [
        ("REST", "POST /v1/indexes/[name]/sample"),
        ("gRPC", "Sample"),
        ("gRPC", "LogProb"),
    ]
    assert (calls[0].requests, calls[0].failures, calls[0].requests_per_second) == (120, 2, 4.25)
    assert (calls[0].p50_ms, calls[0].p99_ms, calls[0].max_ms) == (11.0, 60.0, 88.0)
    assert math.isnan(calls[2].p99_ms)


def test_read_locust_messages_counts_each_message(tmp_path):
    path = tmp_path / "locust_failures.csv"
    path.write_text(
        "Method,Name,Error,Occurrences,First Seen,Last Seen\n"
        "grpc,Sample,\"ResponseCheckError('log_q has 1 non-finite values')\",3,1,2\n"
    )

    assert read_locust_messages(path, "Error", "Occurrences") == [
        "3 x ResponseCheckError('log_q has 1 non-finite values')"
    ]
    assert read_locust_messages(tmp_path / "missing.csv", "Error", "Occurrences") == []


def test_judge_passes_clean_run():
    assert judge(make_summary(), health_p99_limit_ms=500) == []


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"calls": []}, "no request completed"),
        (
            {"calls": [CallStats("gRPC", "Sample", 10, 1, 1.0, 5, 6, 7, 8)]},
            "1 requests failed or broke a response check",
        ),
        ({"exceptions": ["1 x ZeroDivisionError"]}, "raised 1 kinds of exceptions"),
        ({"locust_exit_code": 1}, "locust exited with code 1"),
        ({"health": HealthReport()}, "no health probe ran"),
        (
            {"health": HealthReport(probes=10, failures=2, p99_ms=3, first_failure="HTTP 500")},
            "2 of 10 health probes failed, first: HTTP 500",
        ),
        ({"health": HealthReport(probes=10, p99_ms=501)}, "p99 latency was 501.0 ms, above the 500 ms limit"),
    ],
)
def test_judge_fails_run(changes, reason):
    problems = judge(make_summary(**changes), health_p99_limit_ms=500)

    assert any(reason in problem for problem in problems), problems


def test_queries_per_second_counts_sample_calls_only():
    summary = make_summary()

    assert summary.queries_per_second() == pytest.approx((3.5 + 6.5) * 256)
    assert summary.queries_per_second("REST") == pytest.approx(3.5 * 256)
    assert summary.queries_per_second("gRPC") == pytest.approx(6.5 * 256)


def test_render_markdown_lists_calls_and_verdict():
    summary = make_summary()
    summary.problems = ["locust exited with code 1"]

    text = render_markdown(summary)

    assert "| gRPC | Sample | 200 | 0 | 6.50 | 5 | 20 | 30 | 50 |" in text
    assert "sampled queries/s: 2560 (REST 896, gRPC 1664)" in text
    assert "p99 9.0 ms" in text
    assert "650 MiB after the load" in text
    assert "verdict: FAILED: locust exited with code 1" in text
