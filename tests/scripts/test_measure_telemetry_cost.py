"""The telemetry cost script runs end to end on a tiny table and prints every figure as JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_prints_costs_for_tiny_table() -> None:
    completed = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "measure_telemetry_cost.py"),
            "--num-classes",
            "500",
            "--dim",
            "8",
            "--num-codewords",
            "4",
            "--sample-size",
            "16",
            "--batch",
            "32",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout)
    assert result["num_classes"] == 500
    assert result["device"] == "cpu"
    for key in ("reservoir_add_seconds", "measure_quality_seconds", "kl_refit_pass_seconds_per_query"):
        assert result[key] > 0, key
