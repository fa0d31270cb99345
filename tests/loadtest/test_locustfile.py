"""Tests of loadtest/locustfile.py through locust's own command line, against a server on loopback."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from midx_client import RestSamplerClient

LOCUSTFILE = Path(__file__).resolve().parents[2] / "loadtest" / "locustfile.py"


def run_locust(server, tmp_path: Path, run_time: str, **environ: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if not key.startswith("MIDX_")}
    env.update(
        MIDX_GRPC_ADDRESS=server.grpc_target,
        MIDX_LOADTEST_TABLE="random",
        MIDX_LOADTEST_ROWS="3000",
        MIDX_LOADTEST_DIM="8",
        MIDX_LOADTEST_BATCH_SIZE="16",
        MIDX_LOADTEST_NUM_SAMPLES="10",
        MIDX_LOADTEST_UPDATE_ROWS="20",
    )
    env.update(environ)
    command = [
        *(sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless"),
        *("--host", server.http_url, "--users", "2", "--spawn-rate", "2", "--run-time", run_time),
        *("--stop-timeout", "10", "--csv", str(tmp_path / "locust"), "--only-summary"),
    ]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_locust_cli_creates_index_and_passes(server, tmp_path):
    result = run_locust(server, tmp_path, "6s", MIDX_LOADTEST_INDEX="cli-run")
    output = result.stdout + result.stderr[-3000:]

    assert result.returncode == 0, output
    with RestSamplerClient(server.http_url) as client:
        info = client.get_index("cli-run")
    assert info.num_classes == 3000
    with (tmp_path / "locust_stats.csv").open(newline="") as file:
        rows = {row["Name"]: row for row in csv.DictReader(file)}
    for name in ("Sample", "/v1/indexes/[name]/sample"):
        assert int(rows[name]["Request Count"]) > 0, output
    assert int(rows["Aggregated"]["Failure Count"]) == 0, output


def test_locust_stops_when_index_shape_differs(server, tmp_path):
    with RestSamplerClient(server.http_url) as client:
        client.create_index("clash", 4, num_codewords=4)
        client.upload_embeddings("clash", np.random.default_rng(0).standard_normal((100, 4), dtype=np.float32))

    result = run_locust(server, tmp_path, "60s", MIDX_LOADTEST_INDEX="clash")
    output = result.stdout + result.stderr

    assert result.returncode == 1, output
    assert "setting up index 'clash' failed" in output
    assert "has dim 4 but the load test's table has 8" in output
