"""Measure sample round trips over gRPC and REST against in-process sampling, side by side in one run.

    python scripts/bench_transport.py --markdown docs/benchmarks.md

starts `midx-sampler serve` as a separate process on free loopback ports, uploads a random table of
the GloVe shape (400,000 x 50 by default) over gRPC, builds the same index in this process, and then
times B = 1024 queries, M = 100 samples per call: in-process `MidxIndex.sample`, the gRPC client, the
REST client with .npz bodies and the REST client with JSON. The transports take turns within each
round, and the first transport changes from round to round, so load from other jobs on the machine
spreads over all of them. The figures are the medians over rounds of the mean time per call. Both
processes use the malloc thresholds of `midx_service.allocator`.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from midx_client import RestSamplerClient, SamplerClient, SamplerError
from midx_service.allocator import keep_freed_buffers
from midx_service.bench.report import replace_section
from midx_service.bench.runner import machine_description
from midx_service.core import IndexConfig, MidxIndex

SECTION = "transport-benchmark"
TRANSPORTS = ("inprocess", "grpc", "rest", "rest-json")
INDEX_NAME = "bench"
# The round trip must reach this share of the in-process throughput.
GRPC_TARGET_RATIO = 0.5
_SERVER_START_SECONDS = 120.0


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=400_000, help="classes N in the random table")
    parser.add_argument("--dim", type=int, default=50, help="embedding dimension D")
    parser.add_argument("--num-codewords", type=int, default=64, help="codewords K per codebook")
    parser.add_argument("--batch", type=int, default=1024, help="queries B per call")
    parser.add_argument("--num-samples", type=int, default=100, help="samples M per query")
    parser.add_argument("--rounds", type=int, default=7, help="rounds; each times every transport once")
    parser.add_argument("--calls", type=int, default=5, help="calls per transport in each round")
    parser.add_argument(
        "--transports",
        default=",".join(TRANSPORTS),
        help=f"comma-separated subset of {', '.join(TRANSPORTS)} (inprocess is always measured)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads in this process and the server (sets OMP_NUM_THREADS); default: torch's own",
    )
    parser.add_argument("--markdown", type=Path, default=None, help="write the section into this Markdown file")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.transports.split(",")) - set(TRANSPORTS))
    if unknown:
        parser.error(f"unknown transports {unknown}; choose from {', '.join(TRANSPORTS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    # The same malloc thresholds as `midx-sampler serve`, so in-process sampling is not the one side
    # without them.
    keep_freed_buffers()
    result = run(args)
    command = "python scripts/bench_transport.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.markdown is not None:
        replace_section(args.markdown, render_markdown(result, command.strip()), SECTION)
        print(f"wrote the {SECTION} section of {args.markdown}", file=sys.stderr)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(render_markdown(result, command.strip()))
    return 0


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start the server, build both indexes, time every transport and return the figures."""
    rng = np.random.default_rng(0)
    table = rng.standard_normal((args.rows, args.dim)).astype(np.float32)
    queries = rng.standard_normal((args.batch, args.dim)).astype(np.float32)
    transports = ["inprocess"] + [name for name in args.transports.split(",") if name != "inprocess"]
    token = secrets.token_urlsafe(16)
    load_before = os.getloadavg()

    with _server(token, args.threads) as (http_port, grpc_port):
        grpc_client = SamplerClient(f"127.0.0.1:{grpc_port}", token=token, timeout_seconds=600)
        rest_client = RestSamplerClient(f"http://127.0.0.1:{http_port}", token=token, timeout_seconds=600)
        json_client = RestSamplerClient(f"http://127.0.0.1:{http_port}", token=token, timeout_seconds=600, binary=False)
        _wait_until_serving(f"127.0.0.1:{grpc_port}", token)
        grpc_client.create_index(INDEX_NAME, args.dim, num_codewords=args.num_codewords)
        started = time.perf_counter()
        grpc_client.upload_embeddings(INDEX_NAME, table)
        upload_seconds = time.perf_counter() - started
        started = time.perf_counter()
        index = MidxIndex.build(IndexConfig(args.dim, num_codewords=args.num_codewords), table)
        build_seconds = time.perf_counter() - started

        calls: dict[str, Callable[[], Any]] = {
            "inprocess": lambda: index.sample(queries, args.num_samples),
            "grpc": lambda: grpc_client.sample(INDEX_NAME, queries, args.num_samples),
            "rest": lambda: rest_client.sample(INDEX_NAME, queries, args.num_samples),
            "rest-json": lambda: json_client.sample(INDEX_NAME, queries, args.num_samples),
        }
        for name in transports:
            _check_shape(name, calls[name](), args.batch, args.num_samples)
        seconds = _time_rounds({name: calls[name] for name in transports}, args.rounds, args.calls)
        for client in (grpc_client, rest_client, json_client):
            client.close()

    return _summarise(args, seconds, upload_seconds, build_seconds, load_before)


def _time_rounds(calls: dict[str, Callable[[], Any]], rounds: int, calls_per_round: int) -> dict[str, list[float]]:
    """Return, per transport, the mean seconds per call of each round."""
    names = list(calls)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for round_number in range(rounds):
        shift = round_number % len(names)
        for name in names[shift:] + names[:shift]:
            started = time.perf_counter()
            for _ in range(calls_per_round):
                calls[name]()
            seconds[name].append((time.perf_counter() - started) / calls_per_round)
    return seconds


def _summarise(
    args: argparse.Namespace,
    seconds: dict[str, list[float]],
    upload_seconds: float,
    build_seconds: float,
    load_before: tuple[float, float, float],
) -> dict[str, Any]:
    in_process = statistics.median(seconds["inprocess"])
    transports = []
    for name, per_round in seconds.items():
        median = statistics.median(per_round)
        transports.append(
            {
                "transport": name,
                "median_ms": median * 1e3,
                "min_ms": min(per_round) * 1e3,
                "max_ms": max(per_round) * 1e3,
                "queries_per_second": args.batch / median,
                "share_of_in_process": in_process / median,
            }
        )
    result: dict[str, Any] = {
        "machine": machine_description(),
        "rows": args.rows,
        "dim": args.dim,
        "num_codewords": args.num_codewords,
        "batch": args.batch,
        "num_samples": args.num_samples,
        "rounds": args.rounds,
        "calls_per_round": args.calls,
        "upload_seconds": upload_seconds,
        "build_seconds": build_seconds,
        "load_average_before": list(load_before),
        "load_average_after": list(os.getloadavg()),
        "transports": transports,
    }
    grpc = next((entry for entry in transports if entry["transport"] == "grpc"), None)
    if grpc is not None:
        result["grpc_target"] = {
            "share_of_in_process": grpc["share_of_in_process"],
            "required": GRPC_TARGET_RATIO,
            "met": grpc["share_of_in_process"] >= GRPC_TARGET_RATIO,
        }
    return result


def render_markdown(result: dict[str, Any], command: str) -> str:
    """Render a `run` result as the transport section of docs/benchmarks.md."""
    machine = result["machine"]
    before = ", ".join(f"{value:.1f}" for value in result["load_average_before"])
    after = ", ".join(f"{value:.1f}" for value in result["load_average_after"])
    lines = [
        "## Transports: sample round trip",
        "",
        f"Command: `{command}`. Machine: {machine['cpu']}, {machine['cpu_count']} CPUs, "
        f"torch {machine['torch']} with {machine['torch_threads']} intra-op thread(s). Server and client are "
        f"separate processes on loopback. Table: random, {result['rows']:,} x {result['dim']}, "
        f"K = {result['num_codewords']}. B = {result['batch']} queries, M = {result['num_samples']} samples "
        f"per call, one call at a time. {result['rounds']} rounds of {result['calls_per_round']} calls per "
        "transport, taking turns; "
        f"the figures are medians over rounds. Load average (1, 5, 15 min) before: {before}; after: {after}. "
        f"Upload of the table over gRPC including the server's build: {result['upload_seconds']:.1f} s.",
        "",
        "| transport | ms per call (median) | min | max | queries/s | share of in-process |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for entry in result["transports"]:
        lines.append(
            f"| {entry['transport']} | {entry['median_ms']:.1f} | {entry['min_ms']:.1f} | {entry['max_ms']:.1f} | "
            f"{entry['queries_per_second']:,.0f} | {entry['share_of_in_process']:.2f} |"
        )
    target = result.get("grpc_target")
    if target is not None:
        lines += [
            "",
            f"gRPC round trip at least {target['required']:g} x the in-process throughput: "
            f"{target['share_of_in_process']:.2f} x, {'met' if target['met'] else 'not met'}.",
        ]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ server


@contextmanager
def _server(token: str, threads: int | None) -> Iterator[tuple[int, int]]:
    """Run `midx-sampler serve` on two free loopback ports; yield (http_port, grpc_port)."""
    http_port, grpc_port = _free_port(), _free_port()
    environment = {key: value for key, value in os.environ.items() if not key.startswith("MIDX_")}
    environment["MIDX_API_TOKEN"] = token
    if threads is not None:
        environment["OMP_NUM_THREADS"] = str(threads)
    command = [
        sys.executable,
        "-m",
        "midx_service.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--http-port",
        str(http_port),
        "--grpc-port",
        str(grpc_port),
        "--device",
        "cpu",
    ]
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, env=environment, stdout=log, stderr=log)
        try:
            yield http_port, grpc_port
        except BaseException:
            _stop(process)
            log.seek(0)
            sys.stderr.write(log.read().decode(errors="replace")[-4000:])
            raise
        _stop(process)


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _free_port() -> int:
    # The port is free when this returns, and the server binds it a moment later. Another process
    # could take it in between, which a benchmark run can afford.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_until_serving(target: str, token: str) -> None:
    deadline = time.monotonic() + _SERVER_START_SECONDS
    with SamplerClient(target, token=token, retries=0, timeout_seconds=10) as client:
        while True:
            try:
                client.list_indexes()
                return
            except SamplerError as error:
                if error.code != "unavailable" or time.monotonic() > deadline:
                    raise
            time.sleep(0.2)


def _check_shape(transport: str, result: Any, batch: int, num_samples: int) -> None:
    ids = result.ids
    if tuple(ids.shape) != (batch, num_samples):
        raise RuntimeError(f"{transport} returned ids of shape {tuple(ids.shape)}, expected ({batch}, {num_samples})")


if __name__ == "__main__":
    sys.exit(main())
