"""The transport benchmark runs end to end on a small table and writes its Markdown section in place."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_small_run_writes_its_section(tmp_path: Path) -> None:
    report = tmp_path / "benchmarks.md"
    report.write_text(
        "# Benchmarks\n\n<!-- core-benchmark:start -->\nkept\n<!-- core-benchmark:end -->\n\n"
        "<!-- transport-benchmark:start -->\nold figures\n<!-- transport-benchmark:end -->\n"
    )
    command = [
        sys.executable,
        str(ROOT / "scripts" / "bench_transport.py"),
        "--rows", "2000", "--dim", "8", "--num-codewords", "8", "--batch", "16", "--num-samples", "5",
        "--rounds", "2", "--calls", "1", "--markdown", str(report),
    ]  # fmt: skip

    completed = subprocess.run(command, capture_output=True, text=True, timeout=240)

    assert completed.returncode == 0, completed.stderr
    text = report.read_text()
    assert text.count("<!-- transport-benchmark:start -->") == 1
    assert text.count("<!-- transport-benchmark:end -->") == 1
    assert "kept" in text
    assert "old figures" not in text
    for transport in ("inprocess", "grpc", "rest", "rest-json"):
        assert f"| {transport} |" in text
    assert "gRPC round trip at least 0.5 x the in-process throughput" in text


def test_unknown_transport_is_rejected() -> None:
    completed = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_transport.py"), "--transports", "grpc,carrier-pigeon"],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert completed.returncode == 2
    assert "carrier-pigeon" in completed.stderr
