"""Dynamic batching: concurrent sample requests are coalesced, and each caller gets its own rows."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from midx_client import AsyncRestSamplerClient, AsyncSamplerClient
from midx_service.core import IndexConfig, MidxIndex

DIM = 8
NUM_CLASSES = 300


def _histogram_total(histogram: Any, suffix: str) -> float:
    return sum(
        sample.value for metric in histogram.collect() for sample in metric.samples if sample.name.endswith(suffix)
    )


def test_concurrent_requests_coalesce_and_keep_their_rows(start_server: Any) -> None:
    running = start_server(batch_window_ms=200.0)
    table = np.random.default_rng(0).standard_normal((NUM_CLASSES, DIM)).astype(np.float32)
    core = MidxIndex.build(IndexConfig(DIM, num_codewords=8), table)
    rng = np.random.default_rng(1)
    # Different batch sizes and two num_samples values, so the server forms two groups.
    requests = [(rng.standard_normal((rows, DIM)).astype(np.float32), 4 + 3 * (i % 2)) for i, rows in
                enumerate([1, 3, 2, 5, 4, 1, 2, 3])]  # fmt: skip
    positives = [np.arange(queries.shape[0]).reshape(-1, 1) for queries, _ in requests]

    async def run() -> list[Any]:
        grpc_client = AsyncSamplerClient(running.grpc_target)
        rest_client = AsyncRestSamplerClient(running.http_url)
        await grpc_client.create_index("words", DIM, num_codewords=8)
        await grpc_client.upload_embeddings("words", table)
        calls = [
            (grpc_client if i % 2 else rest_client).sample("words", queries, num_samples, positives=positives[i])
            for i, (queries, num_samples) in enumerate(requests)
        ]
        results = await asyncio.gather(*calls)
        await grpc_client.close()
        await rest_client.close()
        return results

    results = asyncio.run(run())

    metrics = running.server.metrics
    calls = _histogram_total(metrics.batch_requests, "_count")
    coalesced_requests = _histogram_total(metrics.batch_requests, "_sum")
    assert coalesced_requests == len(requests)
    assert calls < len(requests), "concurrent requests should share core calls"
    for (queries, num_samples), result, positive in zip(requests, results, positives, strict=True):
        assert result.ids.shape == (queries.shape[0], num_samples)
        assert result.version == 1
        np.testing.assert_allclose(result.log_q, core.log_prob(queries, result.ids).numpy(), atol=1e-5)
        np.testing.assert_allclose(result.positive_log_q, core.log_prob(queries, positive).numpy(), atol=1e-5)


def test_bad_request_in_a_batch_fails_alone(start_server: Any) -> None:
    running = start_server(batch_window_ms=200.0)
    table = np.random.default_rng(0).standard_normal((NUM_CLASSES, DIM)).astype(np.float32)
    queries = np.random.default_rng(2).standard_normal((2, DIM)).astype(np.float32)

    async def run() -> list[Any]:
        client = AsyncSamplerClient(running.grpc_target)
        await client.create_index("words", DIM, num_codewords=8)
        await client.upload_embeddings("words", table)
        good = client.sample("words", queries, 3, positives=[[0], [1]])
        bad = client.sample("words", queries, 3, positives=[[0], [NUM_CLASSES + 1]])
        results = await asyncio.gather(good, bad, return_exceptions=True)
        await client.close()
        return results

    good, bad = asyncio.run(run())

    assert good.ids.shape == (2, 3)
    assert getattr(bad, "code", None) == "invalid_argument"
