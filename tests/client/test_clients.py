"""Both clients (gRPC and REST, blocking and asyncio) against a real server: same API, same results."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from midx_client import (
    AsyncRestSamplerClient,
    AsyncSamplerClient,
    IndexInfo,
    RestSamplerClient,
    SamplerClient,
    SamplerError,
    SampleResult,
)
from midx_service.core import IndexConfig, MidxIndex

DIM = 8
NUM_CLASSES = 400


@pytest.fixture
def table() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((NUM_CLASSES, DIM)).astype(np.float32)


@pytest.fixture(params=["grpc", "rest"])
def client(request: pytest.FixtureRequest, server: Any) -> Iterator[Any]:
    if request.param == "grpc":
        with SamplerClient(server.grpc_target, timeout_seconds=30) as grpc_client:
            yield grpc_client
    else:
        with RestSamplerClient(server.http_url, timeout_seconds=30) as rest_client:
            yield rest_client


def _queries(rows: int = 4, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, DIM)).astype(np.float32)


def test_full_workflow(client: Any, table: np.ndarray) -> None:
    created = client.create_index("words", DIM, num_codewords=8)
    version = client.upload_embeddings("words", table)
    info = client.get_index("words")
    sample = client.sample("words", _queries(), 5, positives=np.arange(4).reshape(4, 1))
    updated = client.update_embeddings("words", [0, NUM_CLASSES], np.ones((2, DIM), np.float32))
    log_prob = client.log_prob("words", _queries(), np.array([[0], [1], [2], [NUM_CLASSES]]), min_version=updated)
    rebuilt = client.rebuild("words")
    listed = client.list_indexes()
    client.delete_index("words")

    assert isinstance(created, IndexInfo)
    assert created.status == "empty"
    assert created.quantizer == "rq"
    assert version == 1
    assert info.num_classes == NUM_CLASSES
    assert info.status == "ready"
    assert info.device == "cpu"
    assert isinstance(sample, SampleResult)
    assert sample.ids.shape == (4, 5)
    assert sample.ids.dtype == np.int64
    assert sample.log_q.dtype == np.float32
    assert sample.positive_log_q.shape == (4, 1)
    assert sample.version == 1
    assert updated == 2
    assert log_prob.version == 2
    assert log_prob.log_q.shape == (4, 1)
    assert rebuilt == 3
    assert [entry.name for entry in listed] == ["words"]
    with pytest.raises(SamplerError) as failure:
        client.get_index("words")
    assert failure.value.code == "not_found"


def test_sample_agrees_with_core(client: Any, table: np.ndarray) -> None:
    client.create_index("words", DIM, num_codewords=8)
    client.upload_embeddings("words", table)
    queries = _queries(6)
    positives = np.arange(12).reshape(6, 2)
    core = MidxIndex.build(IndexConfig(DIM, num_codewords=8), table)
    expected = core.sample(queries, 9, positives=positives, exclude_positives=True, seed=21)

    result = client.sample("words", queries, 9, positives=positives, exclude_positives=True, seed=21)
    log_prob = client.log_prob("words", queries, result.ids)

    np.testing.assert_array_equal(result.ids, expected.ids.numpy())
    np.testing.assert_allclose(result.log_q, expected.log_q.numpy(), rtol=1e-6)
    assert expected.positive_log_q is not None
    np.testing.assert_allclose(result.positive_log_q, expected.positive_log_q.numpy(), rtol=1e-6)
    np.testing.assert_allclose(log_prob.log_q, core.log_prob(queries, result.ids).numpy(), rtol=1e-5)


@pytest.mark.parametrize("sampler", ["uniform", "unigram", "exact"])
def test_baseline_samplers_agree_with_core(client: Any, table: np.ndarray, sampler: str) -> None:
    client.create_index("words", DIM, num_codewords=8)
    weights = np.linspace(0.0, 2.0, NUM_CLASSES)
    client.upload_embeddings("words", table, weights)
    core = MidxIndex.build(IndexConfig(DIM, num_codewords=8), table, weights)
    expected = core.sample(_queries(), 6, sampler=sampler, seed=3)

    result = client.sample("words", _queries(), 6, sampler=sampler, seed=3)

    np.testing.assert_array_equal(result.ids, expected.ids.numpy())
    np.testing.assert_allclose(result.log_q, expected.log_q.numpy(), rtol=1e-6)


def test_torch_in_and_out(client: Any, table: np.ndarray) -> None:
    client.create_index("words", DIM, num_codewords=8)
    client.upload_embeddings("words", torch.from_numpy(table))

    result = client.sample("words", torch.from_numpy(_queries()), 3, output="torch")
    log_prob = client.log_prob("words", torch.from_numpy(_queries()), result.ids, output="torch")

    assert isinstance(result.ids, torch.Tensor)
    assert result.ids.dtype == torch.int64
    assert isinstance(log_prob.log_q, torch.Tensor)
    assert log_prob.log_q.shape == (4, 3)


def test_minus_infinity_survives_both_transports(client: Any, table: np.ndarray) -> None:
    client.create_index("popular", DIM, num_codewords=4, last_stage="popularity")
    weights = np.ones(NUM_CLASSES)
    weights[0] = 0.0
    client.upload_embeddings("popular", table, weights)

    log_prob = client.log_prob("popular", _queries(1), [[0, 1]])

    assert log_prob.log_q[0, 0] == -np.inf
    assert np.isfinite(log_prob.log_q[0, 1])


def test_empty_batch_keeps_shapes(client: Any, table: np.ndarray) -> None:
    client.create_index("words", DIM, num_codewords=8)
    client.upload_embeddings("words", table)

    result = client.sample("words", np.zeros((0, DIM), np.float32), 4)

    assert result.ids.shape == (0, 4)
    assert result.log_q.shape == (0, 4)


def test_errors_carry_code_and_message(client: Any) -> None:
    client.create_index("words", DIM)

    with pytest.raises(SamplerError) as exists:
        client.create_index("words", DIM)
    with pytest.raises(SamplerError) as empty:
        client.sample("words", _queries(), 2)

    assert exists.value.code == "already_exists"
    assert "exists" in exists.value.message
    assert exists.value.status in (409, "ALREADY_EXISTS")
    assert empty.value.code == "failed_precondition"


def test_token_is_sent(start_server: Any) -> None:
    running = start_server(api_token="s3cret")
    clients = [
        SamplerClient(running.grpc_target, token="s3cret"),
        RestSamplerClient(running.http_url, token="s3cret"),
        SamplerClient(running.grpc_target, token="wrong"),
        RestSamplerClient(running.http_url),
    ]

    assert clients[0].list_indexes() == []
    assert clients[1].list_indexes() == []
    for unauthorised in clients[2:]:
        with pytest.raises(SamplerError) as failure:
            unauthorised.list_indexes()
        assert failure.value.code == "unauthenticated"
    for each in clients:
        each.close()


def test_reads_are_retried_when_unavailable() -> None:
    # Nothing listens on port 9 of loopback, so every attempt fails with UNAVAILABLE.
    with (
        RestSamplerClient("http://127.0.0.1:9", retries=2, timeout_seconds=2) as rest,
        pytest.raises(SamplerError) as failure,
    ):
        rest.list_indexes()
    assert failure.value.code == "unavailable"


def test_async_clients_mirror_blocking_ones(server: Any, table: np.ndarray) -> None:
    async def workflow(client: Any, name: str) -> tuple[int, SampleResult, int]:
        async with client:
            await client.create_index(name, DIM, num_codewords=8)
            version = await client.upload_embeddings(name, table)
            result = await client.sample(name, _queries(), 3, seed=5)
            updated = await client.update_embeddings(name, [1], np.ones((1, DIM), np.float32))
            await client.log_prob(name, _queries(), result.ids)
            assert [entry.name for entry in await client.list_indexes()][-1] >= name
            assert (await client.get_index(name)).version == updated
            rebuilt = await client.rebuild(name)
            await client.delete_index(name)
            return version, result, rebuilt

    async def both() -> list[tuple[int, SampleResult, int]]:
        return [
            await workflow(AsyncSamplerClient(server.grpc_target), "g"),
            await workflow(AsyncRestSamplerClient(server.http_url), "r"),
        ]

    (grpc_version, grpc_result, grpc_rebuilt), (rest_version, rest_result, rest_rebuilt) = asyncio.run(both())

    assert grpc_version == rest_version == 1
    assert grpc_rebuilt == rest_rebuilt == 3
    np.testing.assert_array_equal(grpc_result.ids, rest_result.ids)


@pytest.mark.slow
def test_glove_sized_table_uploads(client: Any) -> None:
    table = np.random.default_rng(7).standard_normal((400_000, 50)).astype(np.float32)
    client.create_index("glove", 50)

    version = client.upload_embeddings("glove", table)
    info = client.get_index("glove")

    assert version == 1
    assert info.num_classes == 400_000
    assert info.status == "ready"
