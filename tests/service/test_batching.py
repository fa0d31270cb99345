"""Dynamic batching: concurrent sample requests are coalesced, and each caller gets its own rows."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np

from midx_client import AsyncRestSamplerClient, AsyncSamplerClient, SamplerClient
from midx_service.core import IndexConfig, MidxIndex

DIM = 8
NUM_CLASSES = 300


def _histogram_total(histogram: Any, suffix: str) -> float:
    return sum(
        sample.value for metric in histogram.collect() for sample in metric.samples if sample.name.endswith(suffix)
    )


def test_concurrent_requests_coalesce_and_keep_their_rows(start_server: Any, hold_compute: Any, poll: Any) -> None:
    # The window is at its maximum and the only compute thread is held, so every request reaches the
    # batcher while the first of its key still waits to run: the rest must form one group per key.
    running = start_server(batch_window_ms=1000.0, compute_threads=1)
    table = np.random.default_rng(0).standard_normal((NUM_CLASSES, DIM)).astype(np.float32)
    core = MidxIndex.build(IndexConfig(DIM, num_codewords=8), table)
    rng = np.random.default_rng(1)
    # Different batch sizes and two num_samples values, so the server forms two groups.
    requests = [(rng.standard_normal((rows, DIM)).astype(np.float32), 4 + 3 * (i % 2)) for i, rows in
                enumerate([1, 3, 2, 5, 4, 1, 2, 3])]  # fmt: skip
    positives = [np.arange(queries.shape[0]).reshape(-1, 1) for queries, _ in requests]
    with SamplerClient(running.grpc_target) as setup:
        setup.create_index("words", DIM, num_codewords=8)
        setup.upload_embeddings("words", table)
    batcher = running.server.service.batcher
    gate = hold_compute(running)

    async def run() -> list[Any]:
        grpc_client = AsyncSamplerClient(running.grpc_target)
        rest_client = AsyncRestSamplerClient(running.http_url)
        calls = [
            (grpc_client if i % 2 else rest_client).sample("words", queries, num_samples, positives=positives[i])
            for i, (queries, num_samples) in enumerate(requests)
        ]
        pending = asyncio.gather(*calls)
        await asyncio.to_thread(poll, lambda: batcher.pending_requests == len(requests), "every request")
        gate.open()
        results = await pending
        await grpc_client.close()
        await rest_client.close()
        return results

    results = asyncio.run(run())

    metrics = running.server.metrics
    calls = _histogram_total(metrics.batch_requests, "_count")
    coalesced_requests = _histogram_total(metrics.batch_requests, "_sum")
    assert coalesced_requests == len(requests)
    assert calls == 4, "per key, the first request runs at once and the other three share one call"
    for (queries, num_samples), result, positive in zip(requests, results, positives, strict=True):
        assert result.ids.shape == (queries.shape[0], num_samples)
        assert result.version == 1
        np.testing.assert_allclose(result.log_q, core.log_prob(queries, result.ids).numpy(), atol=1e-5)
        np.testing.assert_allclose(result.positive_log_q, core.log_prob(queries, positive).numpy(), atol=1e-5)


def test_bad_request_in_a_batch_fails_alone(start_server: Any, hold_compute: Any, poll: Any) -> None:
    running = start_server(batch_window_ms=1000.0, compute_threads=1)
    table = np.random.default_rng(0).standard_normal((NUM_CLASSES, DIM)).astype(np.float32)
    queries = np.random.default_rng(2).standard_normal((2, DIM)).astype(np.float32)
    with SamplerClient(running.grpc_target) as setup:
        setup.create_index("words", DIM, num_codewords=8)
        setup.upload_embeddings("words", table)
    batcher = running.server.service.batcher
    gate = hold_compute(running)

    async def run() -> list[Any]:
        client = AsyncSamplerClient(running.grpc_target)
        # The leader runs alone once the gate opens. The good and the bad request wait behind it in
        # one group, and the group's merged call fails because of the bad positive.
        leader = asyncio.ensure_future(client.sample("words", queries, 3, positives=[[0], [1]]))
        await asyncio.to_thread(poll, lambda: batcher.pending_requests == 1, "the leading request")
        good = client.sample("words", queries, 3, positives=[[0], [1]])
        bad = client.sample("words", queries, 3, positives=[[0], [NUM_CLASSES + 1]])
        followers = asyncio.gather(good, bad, return_exceptions=True)
        await asyncio.to_thread(poll, lambda: batcher.pending_requests == 3, "the two followers")
        gate.open()
        results = [await leader, *await followers]
        await client.close()
        return results

    leader, good, bad = asyncio.run(run())

    assert leader.ids.shape == (2, 3)
    assert good.ids.shape == (2, 3)
    assert getattr(bad, "code", None) == "invalid_argument"
    calls = _histogram_total(running.server.metrics.batch_requests, "_count")
    assert calls == 2, "the leader's call and the followers' merged call; the retries alone are not counted"


def test_lone_request_skips_the_window(start_server: Any) -> None:
    running = start_server(batch_window_ms=1000.0)
    table = np.random.default_rng(0).standard_normal((NUM_CLASSES, DIM)).astype(np.float32)
    queries = np.random.default_rng(3).standard_normal((2, DIM)).astype(np.float32)
    with SamplerClient(running.grpc_target) as client:
        client.create_index("words", DIM, num_codewords=8)
        client.upload_embeddings("words", table)
        client.sample("words", queries, 3, seed=1)  # warms up the path; seeded requests never wait

        durations = []
        for _ in range(3):
            started = time.perf_counter()
            client.sample("words", queries, 3)
            durations.append(time.perf_counter() - started)

    # Each would take at least the 1 s window if a request alone waited for company.
    assert max(durations) < 1.0, durations
