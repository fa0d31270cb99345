"""`midx-sampler serve` as a process: starts both front ends, refuses bad settings, stops gracefully."""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from midx_service.commands import serve
from midx_service.settings import InvalidSettingsError, Settings, load_settings

_READY_LINE = re.compile(r"REST port (\d+), gRPC port (\d+)")


def _serve(*flags: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "midx_service.cli", "serve", "--http-port", "0", "--grpc-port", "0", *flags],
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def _wait_for_ports(process: subprocess.Popen[str], deadline_seconds: float = 60.0) -> tuple[int, int, list[str]]:
    assert process.stderr is not None
    lines: list[str] = []
    deadline = time.monotonic() + deadline_seconds
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        lines.append(line)
        match = _READY_LINE.search(line)
        if match:
            return int(match.group(1)), int(match.group(2)), lines
    raise AssertionError("the server did not report its ports:\n" + "".join(lines))


@pytest.fixture
def served() -> Iterator[subprocess.Popen[str]]:
    process = _serve("--device", "cpu")
    yield process
    if process.poll() is None:
        process.kill()
        process.wait(timeout=30)


@pytest.mark.slow
def test_sigterm_stops_gracefully(served: subprocess.Popen[str]) -> None:
    http_port, grpc_port, lines = _wait_for_ports(served)
    assert httpx.get(f"http://127.0.0.1:{http_port}/healthz").status_code == 200
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert response.status == health_pb2.HealthCheckResponse.SERVING

    served.send_signal(signal.SIGTERM)
    _, rest = served.communicate(timeout=60)

    assert served.returncode == 0
    assert "MIDX_API_TOKEN is not set" in "".join(lines)
    assert "health NOT_SERVING" in rest
    assert "stopped in" in rest


def test_invalid_setting_is_refused_by_name() -> None:
    process = _serve(env={"MIDX_BATCH_WINDOW_MS": "-3"})

    _, stderr = process.communicate(timeout=60)

    assert process.returncode == 2
    assert "batch_window_ms (MIDX_BATCH_WINDOW_MS)" in stderr


def test_unreachable_redis_stops_start_with_message() -> None:
    process = _serve("--device", "cpu", "--redis-url", "redis://127.0.0.1:9/0")

    _, stderr = process.communicate(timeout=60)

    assert process.returncode == 1
    assert "could not restore the indexes: cannot read the indexes from Redis at 127.0.0.1:9/0" in stderr


def test_flags_override_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MIDX_HTTP_PORT", "8100")
    monkeypatch.setenv("MIDX_MAX_BATCH", "7")

    settings = load_settings(http_port=8200)

    assert settings.http_port == 8200
    assert settings.max_batch == 7


def test_telemetry_flags_set_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MIDX_TELEMETRY_SAMPLE_SIZE", "64")
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    args = parser.parse_args(
        ["--auto-refit-mode", "kl", "--refit-kl-ratio", "2.5", "--telemetry-reservoir-size", "128"]
    )

    settings = load_settings(**{name: getattr(args, name) for name in Settings.model_fields})

    assert settings.auto_refit_mode == "kl"
    assert settings.refit_kl_ratio == 2.5
    assert settings.telemetry_reservoir_size == 128
    assert settings.telemetry_sample_size == 64
    assert settings.telemetry_interval_seconds == 60.0


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"grpc_port": 70000}, "grpc_port"),
        ({"device": "tpu"}, "device"),
        ({"refit_error_ratio": 0.5}, "refit_error_ratio"),
        ({"tls_cert_file": "/nonexistent/cert.pem", "tls_key_file": "/nonexistent/key.pem"}, "tls_cert_file"),
        ({"max_batch": 0}, "max_batch"),
        ({"redis_url": "http://127.0.0.1:6379"}, "redis_url"),
        ({"redis_prefix": "two words"}, "redis_prefix"),
        ({"redis_url": "redis://127.0.0.1:6379/0", "data_dir": "/tmp"}, "data_dir"),
        ({"snapshot_chunk_bytes": 1024}, "snapshot_chunk_bytes"),
        ({"refit_kl_ratio": 0.9}, "refit_kl_ratio"),
        ({"auto_refit_mode": "annealing"}, "auto_refit_mode"),
        ({"kl_refit_time_budget_seconds": 0}, "kl_refit_time_budget_seconds"),
        ({"kl_refit_max_queries": 4}, "kl_refit_max_queries"),
        ({"telemetry_reservoir_size": -1}, "telemetry_reservoir_size"),
        ({"telemetry_sample_size": -1}, "telemetry_sample_size"),
        ({"telemetry_interval_seconds": -5}, "telemetry_interval_seconds"),
    ],
)
def test_invalid_settings_name_the_setting(overrides: dict[str, object], named: str) -> None:
    with pytest.raises(InvalidSettingsError) as failure:
        load_settings(**overrides)

    assert named in str(failure.value)


def _busy_port() -> tuple[socket.socket, int]:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    return holder, holder.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize(("flag", "transport"), [("--http-port", "REST"), ("--grpc-port", "gRPC")])
def test_busy_port_stops_start_with_message(flag: str, transport: str) -> None:
    holder, port = _busy_port()
    try:
        arguments = ["--http-port", "0", "--grpc-port", "0", "--device", "cpu", flag, str(port)]
        process = subprocess.run(
            [sys.executable, "-m", "midx_service.cli", "serve", *arguments],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        holder.close()

    assert process.returncode == 1
    assert f"cannot listen for {transport}" in process.stderr
    assert f"{flag}" in process.stderr
    assert "Traceback" not in process.stderr


@pytest.mark.slow
def test_second_server_cannot_share_grpc_port(served: subprocess.Popen[str]) -> None:
    _, grpc_port, _ = _wait_for_ports(served)

    second = subprocess.run(
        [sys.executable, "-m", "midx_service.cli", "serve", "--http-port", "0", "--grpc-port", str(grpc_port)],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert second.returncode == 1
    assert "cannot listen for gRPC" in second.stderr
