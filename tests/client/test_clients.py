"""Both clients (gRPC and REST, blocking and asyncio) against a real server: same API, same results."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from midx_client import (
    AsyncRestSamplerClient,
    AsyncSamplerClient,
    IndexInfo,
    ProposalQuality,
    RefitReport,
    RestSamplerClient,
    SamplerClient,
    SamplerError,
    SampleResult,
)
from midx_client._convert import info_from_json
from midx_service.core import IndexConfig, MidxIndex
from midx_service.data.glove import load_glove
from tests.conftest import LEARNABLE_CODEWORDS, LEARNABLE_DIM, learnable_queries, learnable_table

DIM = 8
NUM_CLASSES = 400


@pytest.fixture
def table() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((NUM_CLASSES, DIM)).astype(np.float32)


@pytest.fixture(params=["grpc", "rest", "rest-json"])
def client(request: pytest.FixtureRequest, server: Any) -> Iterator[Any]:
    if request.param == "grpc":
        with SamplerClient(server.grpc_target, timeout_seconds=30) as grpc_client:
            yield grpc_client
    else:
        binary = request.param == "rest"
        with RestSamplerClient(server.http_url, timeout_seconds=30, binary=binary) as rest_client:
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


def test_positives_as_vector_mean_one_per_query(client: Any, table: np.ndarray) -> None:
    client.create_index("words", DIM, num_codewords=8)
    client.upload_embeddings("words", table)

    result = client.sample("words", _queries(), 3, positives=np.array([4, 5, 6, 7]))
    empty = client.sample("words", np.zeros((0, DIM), np.float32), 3, positives=np.zeros((0, 2), np.int64))

    assert result.positive_log_q.shape == (4, 1)
    assert empty.positive_log_q.shape == (0, 2)


def test_rest_client_sends_npz_unless_told_json(server: Any, table: np.ndarray) -> None:
    seen: list[tuple[str, str, str]] = []

    def record(response: Any) -> None:
        request = response.request
        seen.append((request.url.path, request.headers["content-type"], response.headers["content-type"]))

    with SamplerClient(server.grpc_target) as setup:
        setup.create_index("words", DIM, num_codewords=8)
        setup.upload_embeddings("words", table)
    for binary in (True, False):
        with RestSamplerClient(server.http_url, binary=binary) as rest:
            rest._http.event_hooks["response"].append(record)
            rest.sample("words", _queries(), 3)
            rest.log_prob("words", _queries(), [[0], [1], [2], [3]])
            rest.update_embeddings("words", [0], np.ones((1, DIM), np.float32))

    npz, json_type = "application/x-npz", "application/json"
    assert seen == [
        ("/v1/indexes/words/sample", npz, npz),
        ("/v1/indexes/words/log-prob", npz, npz),
        ("/v1/indexes/words/embeddings", npz, json_type),
        ("/v1/indexes/words/sample", json_type, json_type),
        ("/v1/indexes/words/log-prob", json_type, json_type),
        ("/v1/indexes/words/embeddings", json_type, json_type),
    ]


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

    async def all_clients() -> list[tuple[int, SampleResult, int]]:
        return [
            await workflow(AsyncSamplerClient(server.grpc_target), "g"),
            await workflow(AsyncRestSamplerClient(server.http_url), "r"),
            await workflow(AsyncRestSamplerClient(server.http_url, binary=False), "j"),
        ]

    grpc, rest, rest_json = asyncio.run(all_clients())

    assert grpc[0] == rest[0] == rest_json[0] == 1
    assert grpc[2] == rest[2] == rest_json[2] == 3
    np.testing.assert_array_equal(grpc[1].ids, rest[1].ids)
    np.testing.assert_array_equal(grpc[1].ids, rest_json[1].ids)


@pytest.mark.slow
def test_rebuild_kl_learns_from_served_queries(client: Any) -> None:
    client.create_index("learned", LEARNABLE_DIM, num_codewords=LEARNABLE_CODEWORDS)
    client.upload_embeddings("learned", learnable_table())
    client.sample("learned", learnable_queries(), 2)

    rebuilt = client.rebuild("learned", mode="kl")
    info = _wait_for_quality(client, "learned", version=2)

    assert rebuilt == 2
    assert info.codebook_fit == "kl"
    assert isinstance(info.last_refit, RefitReport)
    assert info.last_refit.mode == "kl"
    assert info.last_refit.accepted
    assert info.last_refit.heldout_kl_after < info.last_refit.heldout_kl_before
    # The server measures every index after a refit, on its 64 most recent queries by default.
    assert isinstance(info.quality, ProposalQuality)
    assert info.quality.num_queries == 64
    assert info.quality.kl > 0
    assert 0 < info.quality.effective_sample_fraction <= 1
    assert info.quality.kl_at_fit == info.quality.kl


def test_rebuild_kl_with_uploaded_queries_can_keep_index(client: Any, table: np.ndarray) -> None:
    client.create_index("words", DIM, num_codewords=8)
    client.upload_embeddings("words", table)

    # Zero queries make P uniform, which the current Q already matches exactly.
    rebuilt = client.rebuild("words", mode="kl", queries=torch.zeros(16, DIM))
    info = client.get_index("words")

    assert rebuilt == 1
    assert info.codebook_fit == "kmeans"
    assert info.last_refit.mode == "kl"
    assert not info.last_refit.accepted
    assert info.last_refit.version == 1
    assert info.last_refit.num_queries == 16


def test_rebuild_rejects_unknown_mode(client: Any, table: np.ndarray) -> None:
    client.create_index("words", DIM, num_codewords=8)
    client.upload_embeddings("words", table)

    with pytest.raises(SamplerError) as failure:
        client.rebuild("words", mode="annealing")

    assert failure.value.code == "invalid_argument"
    assert "annealing" in failure.value.message
    assert client.get_index("words").last_refit is None


def test_async_clients_rebuild_with_mode(server: Any, table: np.ndarray) -> None:
    async def rebuild(client: Any, name: str) -> tuple[int, IndexInfo]:
        async with client:
            await client.create_index(name, DIM, num_codewords=8)
            await client.upload_embeddings(name, table)
            version = await client.rebuild(name, mode="kl", queries=np.zeros((16, DIM), np.float32))
            return version, await client.get_index(name)

    async def both() -> list[tuple[int, IndexInfo]]:
        return [
            await rebuild(AsyncSamplerClient(server.grpc_target), "g"),
            await rebuild(AsyncRestSamplerClient(server.http_url), "r"),
        ]

    for version, info in asyncio.run(both()):
        assert version == 1
        assert info.last_refit.mode == "kl"
        assert not info.last_refit.accepted


def test_infinite_kl_reaches_client(client: Any, server: Any, table: np.ndarray) -> None:
    client.create_index("popular", DIM, num_codewords=8, last_stage="popularity")
    weights = np.ones(NUM_CLASSES)
    weights[:10] = 0.0  # classes the softmax can draw but Q never proposes: the KL is infinite
    client.upload_embeddings("popular", table, weights)
    client.sample("popular", _queries(8), 2)
    server.call(server.server.monitor.measure("popular"))

    info = client.get_index("popular")

    assert info.quality.num_queries == 8
    assert info.quality.kl == math.inf
    assert info.quality.effective_sample_fraction == 0.0


def test_infinite_kl_survives_json() -> None:
    body = {
        "name": "words",
        "dim": DIM,
        "num_codewords": 8,
        "quantizer": "rq",
        "last_stage": "popularity",
        "metric": "dot",
        "unigram_alpha": 0.75,
        "num_classes": NUM_CLASSES,
        "version": 1,
        "status": "ready",
        "quantization_error": 0.5,
        "fit_quantization_error": 0.5,
        "device": "cpu",
        "quality": {
            "version": 1,
            "measured_at": 1.0,
            "num_queries": 4,
            "kl": None,
            "kl_at_fit": None,
            "effective_sample_fraction": 0.0,
            "empty_cell_fraction": 0.1,
            "largest_cell_fraction": 0.2,
            "quantization_error_ratio": 1.0,
            "codeword_drift": 0.0,
        },
    }

    info = info_from_json(body)

    assert info.quality.kl == math.inf
    assert info.quality.kl_at_fit is None
    assert info.last_refit is None
    assert info.codebook_fit == "kmeans"


def _wait_for_quality(client: Any, name: str, version: int, timeout: float = 30.0) -> IndexInfo:
    deadline = time.monotonic() + timeout
    while True:
        info = client.get_index(name)
        if info.quality is not None and info.quality.version >= version:
            return info
        if time.monotonic() > deadline:
            raise TimeoutError(f"index {name!r} was not measured at version {version} within {timeout} s")
        time.sleep(0.02)


@pytest.mark.slow
@pytest.mark.parametrize("client", ["grpc", "rest"], indirect=True)  # both REST forms upload the same body
def test_glove_table_uploads(client: Any) -> None:
    table, _ = load_glove()
    client.create_index("glove", 50)

    version = client.upload_embeddings("glove", table)
    info = client.get_index("glove")
    result = client.sample("glove", table[:3], 5, positives=np.arange(3)[:, None], seed=1)

    assert version == 1
    assert info.num_classes == 400_000
    assert info.status == "ready"
    assert result.ids.shape == (3, 5)
    assert np.isfinite(result.positive_log_q).all()


@pytest.mark.parametrize("name", ["runs?v=2", "model#3", "x/../y", "a/b"])
def test_reserved_characters_never_reach_another_index(client: Any, table: np.ndarray, name: str) -> None:
    client.create_index("y", dim=DIM, num_codewords=4)
    client.create_index("runs", dim=DIM, num_codewords=4)

    with pytest.raises(SamplerError) as raised:
        client.create_index(name, dim=DIM)
    with pytest.raises(SamplerError):
        client.delete_index(name)

    assert raised.value.code == "invalid_argument"
    assert sorted(info.name for info in client.list_indexes()) == ["runs", "y"]
