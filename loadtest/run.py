"""Run the locust load test headless against a sampling server started on loopback, and report on it.

    python loadtest/run.py --run-time-seconds 60 --users 4 --out out/loadtest

Starts `midx-sampler serve` on 127.0.0.1, on ports the OS picks, with a random API token and state in
memory (unless --redis-url or --data-dir is given), and uploads the table. While locust runs
loadtest/locustfile.py for a bounded time, a thread probes GET /healthz every 100 ms. Then the server
stops and the runner writes OUT/summary.json, OUT/summary.md, locust's CSV files (OUT/locust_*.csv),
its HTML report (OUT/report.html) and the logs (OUT/server.log, OUT/locust.log).

The exit code is 1 when a request failed or broke a response check, when locust reported an error,
or when a health probe failed. It is also 1 when the probe's p99 latency exceeded --health-p99-ms,
and 0 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import http.client
import json
import logging
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from workload import TABLES, WorkloadSettings, ensure_index, load_table

from midx_client import RestSamplerClient, SamplerError

logger = logging.getLogger("loadtest.run")

LOCUSTFILE = Path(__file__).resolve().with_name("locustfile.py")
LOOPBACK = "127.0.0.1"
MIB = 1024 * 1024


def parse_arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/loadtest"), help="folder for the report files")
    parser.add_argument("--run-time-seconds", type=int, default=60, help="how long locust sends load")
    parser.add_argument("--users", type=int, default=4, help="concurrent simulated trainers (REST and gRPC)")
    parser.add_argument("--spawn-rate", type=float, default=4.0, help="users started per second")
    parser.add_argument(
        "--user-classes",
        nargs="+",
        default=["RestTrainer", "GrpcTrainer"],
        choices=["RestTrainer", "GrpcTrainer"],
        help="which locust users to run",
    )

    parser.add_argument("--table", choices=TABLES, default="glove", help="class table to upload")
    parser.add_argument("--rows", type=int, default=400_000, help="rows of the random table")
    parser.add_argument("--dim", type=int, default=50, help="columns of the random table")
    parser.add_argument("--batch-size", type=int, default=256, help="queries per sample call (B)")
    parser.add_argument("--num-samples", type=int, default=100, help="negatives per query (M)")
    parser.add_argument("--update-rows", type=int, default=1000, help="rows replaced by one update call")

    parser.add_argument("--device", default="cpu", help="the server's --device (auto, cpu, cuda)")
    parser.add_argument("--redis-url", default=None, help="the server's --redis-url; in memory without it")
    parser.add_argument("--data-dir", type=Path, default=None, help="the server's --data-dir for snapshots")

    parser.add_argument("--health-p99-ms", type=float, default=500.0, help="fail above this /healthz p99")
    parser.add_argument("--health-interval-ms", type=float, default=100.0, help="time between health probes")
    parser.add_argument(
        "--server-start-timeout-seconds", type=float, default=120.0, help="limit for the server's start-up"
    )
    parser.add_argument("--setup-timeout-seconds", type=float, default=600.0, help="limit for the upload")
    parser.add_argument("--log-level", default="INFO", help="logging level of this runner")
    args = parser.parse_args(argv)

    if args.run_time_seconds < 1:
        parser.error(f"--run-time-seconds is {args.run_time_seconds}; it must be at least 1")
    if args.users < 1:
        parser.error(f"--users is {args.users}; it must be at least 1")
    return args


# The line `midx-sampler serve` logs once both front ends listen. With port 0 it is the only record
# of the ports the OS picked.
SERVING_LINE = re.compile(rb"serving on \S+: REST port (\d+), gRPC port (\d+)")


class ServerProcess:
    """`midx-sampler serve` in a child process on loopback ports chosen by the OS (MIDX_*_PORT=0)."""

    def __init__(self, args: argparse.Namespace, token: str, log_path: Path) -> None:
        environ = {key: value for key, value in os.environ.items() if not key.startswith("MIDX_")}
        environ.update(
            MIDX_HOST=LOOPBACK,
            MIDX_HTTP_PORT="0",
            MIDX_GRPC_PORT="0",
            MIDX_DEVICE=args.device,
            MIDX_API_TOKEN=token,
        )
        if args.redis_url:
            environ["MIDX_REDIS_URL"] = args.redis_url
        if args.data_dir:
            environ["MIDX_DATA_DIR"] = str(args.data_dir)
        self.log_path = log_path
        self.log_file = log_path.open("wb")
        command = [sys.executable, "-m", "midx_service.cli", "--log-level", "INFO", "serve"]
        self.process = subprocess.Popen(command, env=environ, stdout=self.log_file, stderr=subprocess.STDOUT)
        self.ps = psutil.Process(self.process.pid)
        self.http_port = 0
        self.grpc_port = 0

    @property
    def http_url(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}"

    @property
    def grpc_address(self) -> str:
        return f"{LOOPBACK}:{self.grpc_port}"

    def rss_bytes(self) -> int:
        return int(self.ps.memory_info().rss)

    def wait_until_healthy(self, timeout_seconds: float) -> None:
        """Wait for the log line with the ports, then for GET /healthz to return 200."""
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"the server exited with code {self.process.returncode} during start-up; "
                    f"see {self.log_path}:\n{self.log_tail()}"
                )
            if not self.http_port:
                match = SERVING_LINE.search(self.log_path.read_bytes())
                if match:
                    self.http_port, self.grpc_port = int(match.group(1)), int(match.group(2))
            elif probe_health(LOOPBACK, self.http_port, timeout_seconds=1.0)[1] == 200:
                return
            time.sleep(0.1)
        raise RuntimeError(f"the server was not healthy within {timeout_seconds:.0f} s; see {self.log_path}")

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout_seconds: float = 30.0) -> int:
        """Stop the server with SIGTERM (its graceful stop), then SIGKILL after the timeout."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_seconds)
            except subprocess.TimeoutExpired:
                logger.error("the server ignored SIGTERM for %.0f s; killing it", timeout_seconds)
                self.process.kill()
                self.process.wait()
        self.log_file.close()
        return int(self.process.returncode)


def probe_health(host: str, port: int, *, timeout_seconds: float) -> tuple[float, int | None, str]:
    """GET /healthz on a new connection, as a kubelet does; return (latency ms, status or None, error)."""
    started = time.perf_counter()
    connection = http.client.HTTPConnection(host, port, timeout=timeout_seconds)
    try:
        connection.request("GET", "/healthz")
        response = connection.getresponse()
        response.read()
        return (time.perf_counter() - started) * 1000.0, response.status, ""
    except OSError as error:
        return (time.perf_counter() - started) * 1000.0, None, f"{type(error).__name__}: {error}"
    finally:
        connection.close()


@dataclass
class HealthReport:
    probes: int = 0
    failures: int = 0
    p50_ms: float = 0.0
    p95_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    first_failure: str = ""


class HealthProbe(threading.Thread):
    """Probes GET /healthz at a fixed interval until stopped, and samples the server's RSS each second."""

    def __init__(self, server: ServerProcess, interval_ms: float) -> None:
        super().__init__(name="health-probe", daemon=True)
        self.server = server
        self.interval_seconds = interval_ms / 1000.0
        self.latencies_ms: list[float] = []
        self.failures: list[str] = []
        self.peak_rss_bytes = 0
        self._stopped = threading.Event()

    def run(self) -> None:
        next_rss_sample = 0.0
        while not self._stopped.is_set():
            started = time.monotonic()
            latency_ms, status, error = probe_health(LOOPBACK, self.server.http_port, timeout_seconds=5.0)
            self.latencies_ms.append(latency_ms)
            if status != 200:
                self.failures.append(error or f"HTTP {status}")
            if started >= next_rss_sample:
                # psutil.Error: the server exited, which the run reports through its exit code.
                with contextlib.suppress(psutil.Error):
                    self.peak_rss_bytes = max(self.peak_rss_bytes, self.server.rss_bytes())
                next_rss_sample = started + 1.0
            self._stopped.wait(max(0.0, self.interval_seconds - (time.monotonic() - started)))

    def stop(self) -> HealthReport:
        self._stopped.set()
        self.join()
        if not self.latencies_ms:
            return HealthReport()
        latencies = np.asarray(self.latencies_ms)
        p50, p95, p99 = np.percentile(latencies, [50, 95, 99])
        return HealthReport(
            probes=len(latencies),
            failures=len(self.failures),
            p50_ms=round(float(p50), 2),
            p95_ms=round(float(p95), 2),
            p99_ms=round(float(p99), 2),
            max_ms=round(float(latencies.max()), 2),
            first_failure=self.failures[0] if self.failures else "",
        )


@dataclass
class CallStats:
    """One row of locust's stats: one call over one transport (REST calls named "METHOD path")."""

    transport: str
    call: str
    requests: int
    failures: int
    requests_per_second: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float


@dataclass
class Summary:
    settings: dict[str, Any]
    run_time_seconds: int
    users: int
    calls: list[CallStats]
    health: HealthReport
    memory_mib: dict[str, float]
    locust_exit_code: int
    failure_messages: list[str] = field(default_factory=list)
    exceptions: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def failures(self) -> int:
        return sum(call.failures for call in self.calls)

    def queries_per_second(self, transport: str | None = None) -> float:
        """Sampled queries per second: sample calls per second times the batch size."""
        batch_size = int(self.settings["batch_size"])
        return sum(
            call.requests_per_second * batch_size
            for call in self.calls
            if call.call in SAMPLE_CALLS and (transport is None or call.transport == transport)
        )


SAMPLE_CALLS = ("Sample", "POST /v1/indexes/[name]/sample")


def read_locust_stats(path: Path) -> list[CallStats]:
    """Parse locust's OUT/locust_stats.csv, leaving out its Aggregated row."""
    calls = []
    with path.open(newline="") as file:
        for row in csv.DictReader(file):
            if row["Name"] == "Aggregated":
                continue
            is_grpc = row["Type"] == "grpc"
            calls.append(
                CallStats(
                    transport="gRPC" if is_grpc else "REST",
                    call=row["Name"] if is_grpc else f"{row['Type']} {row['Name']}",
                    requests=int(row["Request Count"]),
                    failures=int(row["Failure Count"]),
                    requests_per_second=round(float(row["Requests/s"]), 2),
                    p50_ms=_percentile(row["50%"]),
                    p95_ms=_percentile(row["95%"]),
                    p99_ms=_percentile(row["99%"]),
                    max_ms=round(float(row["Max Response Time"]), 1),
                )
            )
    return calls


def _percentile(text: str) -> float:
    # Locust writes "N/A" for a percentile of a call that never completed.
    return float(text) if text not in ("", "N/A") else float("nan")


def read_locust_messages(path: Path, column: str, count_column: str) -> list[str]:
    """Return "N x message" lines from locust's failures or exceptions CSV (empty when absent)."""
    if not path.exists():
        return []
    with path.open(newline="") as file:
        return [f"{row[count_column]} x {row[column].strip()}" for row in csv.DictReader(file)]


def judge(summary: Summary, health_p99_limit_ms: float) -> list[str]:
    """Return why the run failed, one line per reason; empty when it passed."""
    problems = []
    if not summary.calls or sum(call.requests for call in summary.calls) == 0:
        problems.append("no request completed")
    if summary.failures:
        problems.append(f"{summary.failures} requests failed or broke a response check")
    if summary.exceptions:
        problems.append(f"locust users raised {len(summary.exceptions)} kinds of exceptions")
    if summary.locust_exit_code != 0:
        problems.append(f"locust exited with code {summary.locust_exit_code}")
    if summary.health.probes == 0:
        problems.append("no health probe ran")
    if summary.health.failures:
        problems.append(
            f"{summary.health.failures} of {summary.health.probes} health probes failed, "
            f"first: {summary.health.first_failure}"
        )
    if summary.health.p99_ms > health_p99_limit_ms:
        problems.append(
            f"GET /healthz p99 latency was {summary.health.p99_ms:.1f} ms, above the {health_p99_limit_ms:.0f} ms limit"
        )
    return problems


def render_markdown(summary: Summary) -> str:
    """Render the summary as the Markdown that docs/loadtest.md shows."""
    settings = summary.settings
    workload = (
        f"table {settings['table']} ({settings['rows']} x {settings['dim']}), "
        f"K = {settings['num_codewords']}, B = {settings['batch_size']}, M = {settings['num_samples']}, "
        f"{settings['update_rows']} rows per update"
    )
    lines = [
        f"{summary.users} users for {summary.run_time_seconds} s; {workload}.",
        "",
        "| transport | call | requests | failures | req/s | p50 ms | p95 ms | p99 ms | max ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for call in sorted(summary.calls, key=lambda call: (call.transport, call.call)):
        lines.append(
            f"| {call.transport} | {call.call} | {call.requests} | {call.failures} | "
            f"{call.requests_per_second:.2f} | {call.p50_ms:.0f} | {call.p95_ms:.0f} | {call.p99_ms:.0f} | "
            f"{call.max_ms:.0f} |"
        )

    total_rps = sum(call.requests_per_second for call in summary.calls)
    queries = (
        f"{summary.queries_per_second():.0f} (REST {summary.queries_per_second('REST'):.0f}, "
        f"gRPC {summary.queries_per_second('gRPC'):.0f})"
    )
    health = summary.health
    latencies = f"p50 {health.p50_ms:.1f} ms, p95 {health.p95_ms:.1f} ms, p99 {health.p99_ms:.1f} ms"
    memory = summary.memory_mib
    verdict = "FAILED: " + "; ".join(summary.problems) if summary.problems else "passed"
    lines += [
        "",
        f"- requests/s: {total_rps:.2f} in all; sampled queries/s: {queries}",
        f"- errors: {summary.failures} failed requests, {len(summary.exceptions)} kinds of user exceptions",
        f"- GET /healthz during the load: {health.probes} probes, {health.failures} failed, {latencies}, "
        f"max {health.max_ms:.1f} ms",
        f"- server RSS: {memory.get('started', 0):.0f} MiB after start, "
        f"{memory.get('before_load', 0):.0f} MiB after the upload, "
        f"{memory.get('after_load', 0):.0f} MiB after the load "
        f"(peak {memory.get('peak_during_load', 0):.0f} MiB)",
        f"- verdict: {verdict}",
    ]
    lines += [f"  - failure: {message}" for message in summary.failure_messages[:10]]
    lines += [f"  - exception: {message}" for message in summary.exceptions[:10]]
    return "\n".join(lines) + "\n"


def run_locust(args: argparse.Namespace, server: ServerProcess, settings: WorkloadSettings, out: Path) -> int:
    command = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--host",
        server.http_url,
        "--users",
        str(args.users),
        "--spawn-rate",
        str(args.spawn_rate),
        "--run-time",
        f"{args.run_time_seconds}s",
        "--stop-timeout",
        "30",
        "--csv",
        str(out / "locust"),
        "--html",
        str(out / "report.html"),
        "--only-summary",
        "--exit-code-on-error",
        "1",
        *args.user_classes,
    ]
    environ = {key: value for key, value in os.environ.items() if not key.startswith("MIDX_")}
    environ.update(settings.to_environ())
    # The OS picked the gRPC port when the server started.
    environ["MIDX_GRPC_ADDRESS"] = server.grpc_address
    # The locust process needs no more than the load's time, the stop timeout and the start-up.
    timeout_seconds = args.run_time_seconds + 30 + args.setup_timeout_seconds
    with (out / "locust.log").open("wb") as log_file:
        process = subprocess.Popen(command, env=environ, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            return process.wait(timeout_seconds)
        except subprocess.TimeoutExpired:
            logger.error("locust ran past %.0f s; killing it", timeout_seconds)
            process.kill()
            process.wait()
            return -1


@dataclass
class Measurements:
    health: HealthReport
    memory_mib: dict[str, float]
    locust_exit_code: int


def measure(
    args: argparse.Namespace, server: ServerProcess, settings: WorkloadSettings, table: np.ndarray, out: Path
) -> Measurements:
    """Upload the table, then run locust while probing /healthz; return what the probe and psutil saw."""
    server.wait_until_healthy(args.server_start_timeout_seconds)
    memory = {"started": server.rss_bytes() / MIB}

    with RestSamplerClient(
        server.http_url, token=settings.api_token, timeout_seconds=args.setup_timeout_seconds, retries=0
    ) as client:
        ensure_index(client, settings, table, ready_timeout_seconds=args.setup_timeout_seconds)
    memory["before_load"] = server.rss_bytes() / MIB

    probe = HealthProbe(server, args.health_interval_ms)
    probe.start()
    logger.info("running locust for %d s with %d users %s", args.run_time_seconds, args.users, args.user_classes)
    try:
        locust_exit_code = run_locust(args, server, settings, out)
    finally:
        health = probe.stop()
    memory["after_load"] = server.rss_bytes() / MIB
    memory["peak_during_load"] = max(probe.peak_rss_bytes / MIB, memory["after_load"])
    return Measurements(health, {key: round(value, 1) for key, value in memory.items()}, locust_exit_code)


def run(args: argparse.Namespace) -> int:
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("locust_*.csv"):
        stale.unlink()
    settings = WorkloadSettings(
        table=args.table,
        rows=args.rows,
        dim=args.dim,
        batch_size=args.batch_size,
        num_samples=args.num_samples,
        update_rows=args.update_rows,
        api_token=secrets.token_hex(16),
    )
    table = load_table(settings)
    settings = replace(settings, rows=table.shape[0], dim=table.shape[1])

    server = ServerProcess(args, settings.api_token or "", out / "server.log")
    try:
        measurements = measure(args, server, settings, table, out)
    finally:
        server_exit_code = server.stop()
    logger.info("server stopped with exit code %d", server_exit_code)

    summary = Summary(
        settings={key: value for key, value in asdict(settings).items() if key not in ("api_token", "grpc_address")},
        run_time_seconds=args.run_time_seconds,
        users=args.users,
        calls=read_locust_stats(out / "locust_stats.csv"),
        health=measurements.health,
        memory_mib=measurements.memory_mib,
        locust_exit_code=measurements.locust_exit_code,
        failure_messages=read_locust_messages(out / "locust_failures.csv", "Error", "Occurrences"),
        exceptions=read_locust_messages(out / "locust_exceptions.csv", "Message", "Count"),
    )
    summary.problems = judge(summary, args.health_p99_ms)
    write_reports(summary, out)
    return 1 if summary.problems else 0


def write_reports(summary: Summary, out: Path) -> None:
    document = asdict(summary)
    document["failures"] = summary.failures
    document["queries_per_second"] = round(summary.queries_per_second(), 1)
    (out / "summary.json").write_text(json.dumps(document, indent=2) + "\n")
    markdown = render_markdown(summary)
    (out / "summary.md").write_text(markdown)
    print(markdown, end="")
    print(f"reports in {out}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_arguments(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except (RuntimeError, ValueError, OSError, SamplerError) as error:
        logger.error("load test failed: %s", error)
        return 1


if __name__ == "__main__":
    sys.exit(main())
