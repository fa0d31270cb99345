"""The gRPC front end through real channels: RPCs, status codes, wire-level bad input, token, TLS, health."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from midx_client._proto import sampler_pb2 as pb
from midx_client._proto import sampler_pb2_grpc as pb_grpc
from midx_service.core.telemetry import measure_quality
from tests.conftest import LEARNABLE_CODEWORDS, LEARNABLE_DIM, learnable_queries, learnable_table

DIM = 8
NUM_CLASSES = 300


def _tensor(array: np.ndarray) -> pb.Tensor:
    return pb.Tensor(dtype=str(array.dtype), shape=list(array.shape), data=array.tobytes())


@pytest.fixture
def table() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((NUM_CLASSES, DIM)).astype(np.float32)


@pytest.fixture
def stub(server: Any) -> Iterator[pb_grpc.SamplerStub]:
    with grpc.insecure_channel(server.grpc_target) as channel:
        yield pb_grpc.SamplerStub(channel)


@pytest.fixture
def words(stub: pb_grpc.SamplerStub, table: np.ndarray) -> str:
    stub.CreateIndex(pb.CreateIndexRequest(name="words", config=pb.IndexConfig(dim=DIM, num_codewords=8)))
    chunks = [
        pb.UploadEmbeddingsRequest(name="words", num_rows=NUM_CLASSES, embeddings=_tensor(table[:100])),
        pb.UploadEmbeddingsRequest(embeddings=_tensor(table[100:])),
    ]
    assert stub.UploadEmbeddings(iter(chunks)).version == 1
    return "words"


def _queries(rows: int = 3) -> np.ndarray:
    return np.random.default_rng(1).standard_normal((rows, DIM)).astype(np.float32)


def _code(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as failure:
        call()
    return failure.value.code()


def _failure(call: Any) -> Any:
    with pytest.raises(grpc.RpcError) as failure:
        call()
    return failure.value


def _message(call: Any) -> str:
    with pytest.raises(grpc.RpcError) as failure:
        call()
    return str(failure.value.details())


def test_every_rpc_round_trip(stub: pb_grpc.SamplerStub, words: str) -> None:
    sample = stub.Sample(pb.SampleRequest(name="words", queries=_tensor(_queries()), num_samples=4))
    updated = stub.UpdateEmbeddings(
        pb.UpdateEmbeddingsRequest(
            name="words", ids=_tensor(np.array([1, 2])), embeddings=_tensor(np.ones((2, DIM), np.float32))
        )
    )
    log_prob = stub.LogProb(
        pb.LogProbRequest(name="words", queries=_tensor(_queries()), ids=_tensor(np.zeros((3, 2), np.int64)))
    )
    rebuilt = stub.Rebuild(pb.RebuildRequest(name="words"))
    info = stub.GetIndex(pb.GetIndexRequest(name="words"))
    listed = stub.ListIndexes(pb.ListIndexesRequest())
    stub.DeleteIndex(pb.DeleteIndexRequest(name="words"))

    assert sample.version == 1
    assert sample.ids.dtype == "int64"
    assert list(sample.ids.shape) == [3, 4]
    assert sample.log_q.dtype == "float32"
    assert not sample.HasField("positive_log_q")
    assert updated.version == 2
    assert list(log_prob.log_q.shape) == [3, 2]
    assert log_prob.version == 2
    assert rebuilt.version == 3
    assert info.version == 3
    assert info.status == "ready"
    assert info.config.num_codewords == 8
    assert [entry.name for entry in listed.indexes] == ["words"]
    assert _code(lambda: stub.GetIndex(pb.GetIndexRequest(name="words"))) == grpc.StatusCode.NOT_FOUND


def test_sample_rejects_unknown_dtype(stub: pb_grpc.SamplerStub, words: str) -> None:
    queries = pb.Tensor(dtype="float16", shape=[1, DIM], data=bytes(2 * DIM))

    message = _message(lambda: stub.Sample(pb.SampleRequest(name="words", queries=queries, num_samples=2)))

    assert "float16" in message


def test_sample_rejects_shape_that_disagrees_with_bytes(stub: pb_grpc.SamplerStub, words: str) -> None:
    queries = pb.Tensor(dtype="float32", shape=[2, DIM], data=bytes(4 * DIM))

    code = _code(lambda: stub.Sample(pb.SampleRequest(name="words", queries=queries, num_samples=2)))

    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_sample_rejects_nan_query(stub: pb_grpc.SamplerStub, words: str) -> None:
    queries = _queries()
    queries[1, 3] = np.inf

    message = _message(lambda: stub.Sample(pb.SampleRequest(name="words", queries=_tensor(queries), num_samples=2)))

    assert "row 1" in message


def test_upload_rejects_checksum_mismatch(stub: pb_grpc.SamplerStub, words: str, table: np.ndarray) -> None:
    chunk = pb.UploadEmbeddingsRequest(
        name="words", num_rows=NUM_CLASSES, embeddings=_tensor(table), sha256=b"\x00" * 32
    )

    message = _message(lambda: stub.UploadEmbeddings(iter([chunk])))

    assert "corrupted" in message
    assert stub.GetIndex(pb.GetIndexRequest(name="words")).version == 1


def test_upload_rejects_missing_rows(stub: pb_grpc.SamplerStub, words: str, table: np.ndarray) -> None:
    chunk = pb.UploadEmbeddingsRequest(name="words", num_rows=NUM_CLASSES + 1, embeddings=_tensor(table))

    message = _message(lambda: stub.UploadEmbeddings(iter([chunk])))

    assert "num_rows" in message
    assert stub.GetIndex(pb.GetIndexRequest(name="words")).version == 1


def test_create_existing_index_already_exists(stub: pb_grpc.SamplerStub, words: str) -> None:
    request = pb.CreateIndexRequest(name="words", config=pb.IndexConfig(dim=DIM))

    assert _code(lambda: stub.CreateIndex(request)) == grpc.StatusCode.ALREADY_EXISTS


def test_sample_without_table_fails_precondition(stub: pb_grpc.SamplerStub) -> None:
    stub.CreateIndex(pb.CreateIndexRequest(name="empty", config=pb.IndexConfig(dim=DIM)))
    request = pb.SampleRequest(name="empty", queries=_tensor(_queries()), num_samples=2)

    assert _code(lambda: stub.Sample(request)) == grpc.StatusCode.FAILED_PRECONDITION


def test_min_version_times_out(stub: pb_grpc.SamplerStub, words: str) -> None:
    request = pb.SampleRequest(name="words", queries=_tensor(_queries()), num_samples=2, min_version=9)

    assert _code(lambda: stub.Sample(request)) == grpc.StatusCode.FAILED_PRECONDITION


# --------------------------------------------------------------------- learned refits, telemetry


@pytest.mark.slow
def test_rebuild_kl_swaps_in_learned_codebooks(start_server: Any) -> None:
    running = start_server(kl_refit_time_budget_seconds=20)
    config = pb.IndexConfig(dim=LEARNABLE_DIM, num_codewords=LEARNABLE_CODEWORDS)
    with grpc.insecure_channel(running.grpc_target) as channel:
        stub = pb_grpc.SamplerStub(channel)
        stub.CreateIndex(pb.CreateIndexRequest(name="learned", config=config))
        table = learnable_table()
        stub.UploadEmbeddings(
            iter([pb.UploadEmbeddingsRequest(name="learned", num_rows=240, embeddings=_tensor(table))])
        )

        rebuilt = stub.Rebuild(pb.RebuildRequest(name="learned", mode="kl", queries=_tensor(learnable_queries())))
        info = stub.GetIndex(pb.GetIndexRequest(name="learned"))

    assert rebuilt.version == 2
    assert info.version == 2
    assert info.codebook_fit == "kl"
    report = info.last_refit
    assert (report.mode, report.trigger, report.accepted, report.version) == ("kl", "request", True, 2)
    assert report.num_queries == 200
    assert report.heldout_kl_after < report.heldout_kl_before


def test_rebuild_kl_without_gain_keeps_index(stub: pb_grpc.SamplerStub, words: str) -> None:
    # Zero queries make P uniform, which the current Q already matches exactly.
    queries = _tensor(np.zeros((16, DIM), np.float32))

    rebuilt = stub.Rebuild(pb.RebuildRequest(name="words", mode="kl", queries=queries))
    info = stub.GetIndex(pb.GetIndexRequest(name="words"))

    assert rebuilt.version == 1
    assert info.version == 1
    assert info.codebook_fit == "kmeans"
    assert not info.last_refit.accepted
    assert info.last_refit.heldout_kl_after == info.last_refit.heldout_kl_before


@pytest.mark.parametrize(
    ("mode", "queries", "code"),
    [
        ("annealing", None, grpc.StatusCode.INVALID_ARGUMENT),
        ("kmeans", np.zeros((16, DIM), np.float32), grpc.StatusCode.INVALID_ARGUMENT),
        ("kl", np.zeros((16, DIM + 1), np.float32), grpc.StatusCode.INVALID_ARGUMENT),
        ("kl", np.full((16, DIM), np.inf, np.float32), grpc.StatusCode.INVALID_ARGUMENT),
        ("kl", np.zeros((3, DIM), np.float32), grpc.StatusCode.INVALID_ARGUMENT),
        ("kl", np.zeros((16, DIM), np.int64), grpc.StatusCode.INVALID_ARGUMENT),
        ("kl", np.zeros((5000, DIM), np.float32), grpc.StatusCode.RESOURCE_EXHAUSTED),
        ("kl", None, grpc.StatusCode.FAILED_PRECONDITION),
    ],
)
def test_rebuild_rejects_bad_request(
    stub: pb_grpc.SamplerStub, words: str, mode: str, queries: np.ndarray | None, code: grpc.StatusCode
) -> None:
    request = pb.RebuildRequest(name="words", mode=mode)
    if queries is not None:
        request.queries.CopyFrom(_tensor(queries))

    assert _code(lambda: stub.Rebuild(request)) == code
    info = stub.GetIndex(pb.GetIndexRequest(name="words"))
    assert info.version == 1
    assert not info.HasField("last_refit")


def test_get_index_reports_measured_quality(server: Any, stub: pb_grpc.SamplerStub, words: str) -> None:
    queries = np.random.default_rng(3).standard_normal((40, DIM)).astype(np.float32)
    stub.LogProb(pb.LogProbRequest(name="words", queries=_tensor(queries), ids=_tensor(np.zeros((40, 1), np.int64))))
    server.call(server.server.monitor.measure("words"))

    info = stub.GetIndex(pb.GetIndexRequest(name="words"))

    snapshot = server.call(server.server.registry.snapshot("words"))
    expected = measure_quality(snapshot.index, queries)
    quality = info.quality
    assert quality.version == 1
    assert quality.num_queries == 40
    assert quality.kl == pytest.approx(expected.kl, rel=1e-12)
    assert not quality.HasField("kl_at_fit")  # 40 queries are fewer than the sample size of 64
    assert quality.effective_sample_fraction == pytest.approx(expected.effective_sample_fraction, rel=1e-12)
    assert quality.empty_cell_fraction == pytest.approx(expected.empty_cell_fraction)
    assert quality.largest_cell_fraction == pytest.approx(expected.largest_cell_fraction)
    assert quality.quantization_error_ratio == pytest.approx(expected.quantization_error_ratio)
    assert quality.codeword_drift == pytest.approx(expected.codeword_drift)
    assert quality.measured_at > 0


def test_get_index_has_no_quality_before_a_measurement(stub: pb_grpc.SamplerStub) -> None:
    info = stub.CreateIndex(pb.CreateIndexRequest(name="fresh", config=pb.IndexConfig(dim=DIM)))

    assert not info.HasField("quality")
    assert not info.HasField("last_refit")
    assert info.codebook_fit == "kmeans"


def test_message_above_limit_is_resource_exhausted(start_server: Any) -> None:
    running = start_server(max_message_bytes=64 * 1024)
    queries = np.zeros((4096, DIM), np.float32)  # 128 KiB
    with grpc.insecure_channel(running.grpc_target) as channel:
        stub = pb_grpc.SamplerStub(channel)

        code = _code(lambda: stub.Sample(pb.SampleRequest(name="words", queries=_tensor(queries), num_samples=1)))

    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_batch_and_num_samples_above_limit_are_resource_exhausted(start_server: Any, table: np.ndarray) -> None:
    running = start_server(max_batch=3, max_num_samples=10)
    with grpc.insecure_channel(running.grpc_target) as channel:
        stub = pb_grpc.SamplerStub(channel)
        stub.CreateIndex(pb.CreateIndexRequest(name="words", config=pb.IndexConfig(dim=DIM, num_codewords=8)))
        chunk = pb.UploadEmbeddingsRequest(name="words", num_rows=NUM_CLASSES, embeddings=_tensor(table))
        stub.UploadEmbeddings(iter([chunk]))

        def sample(rows: int, num_samples: int) -> Any:
            request = pb.SampleRequest(name="words", queries=_tensor(_queries(rows)), num_samples=num_samples)
            return stub.Sample(request)

        def log_prob(rows: int) -> Any:
            ids = np.zeros((rows, 1), np.int64)
            return stub.LogProb(pb.LogProbRequest(name="words", queries=_tensor(_queries(rows)), ids=_tensor(ids)))

        batch = _failure(lambda: sample(4, 2))
        too_many = _failure(lambda: sample(2, 11))
        log_prob_batch = _failure(lambda: log_prob(4))
        too_few = _code(lambda: sample(2, 0))
        allowed = sample(3, 10)

    assert batch.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "MIDX_MAX_BATCH" in batch.details()
    assert too_many.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "MIDX_MAX_NUM_SAMPLES" in too_many.details()
    assert log_prob_batch.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert too_few == grpc.StatusCode.INVALID_ARGUMENT
    assert list(allowed.ids.shape) == [3, 10]


def test_table_above_limit_is_resource_exhausted(start_server: Any, table: np.ndarray) -> None:
    running = start_server(max_body_bytes=4096)
    with grpc.insecure_channel(running.grpc_target) as channel:
        stub = pb_grpc.SamplerStub(channel)
        stub.CreateIndex(pb.CreateIndexRequest(name="words", config=pb.IndexConfig(dim=DIM, num_codewords=8)))
        chunk = pb.UploadEmbeddingsRequest(name="words", num_rows=NUM_CLASSES, embeddings=_tensor(table))

        message = _message(lambda: stub.UploadEmbeddings(iter([chunk])))

    assert "MIDX_MAX_BODY_BYTES" in message


def test_health_serves_and_token_guards_sampler(start_server: Any) -> None:
    running = start_server(api_token="s3cret")
    with grpc.insecure_channel(running.grpc_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        stub = pb_grpc.SamplerStub(channel)

        status = health.Check(health_pb2.HealthCheckRequest(service="midx.v1.Sampler")).status
        missing = _code(lambda: stub.ListIndexes(pb.ListIndexesRequest()))
        wrong = _code(lambda: stub.ListIndexes(pb.ListIndexesRequest(), metadata=[("authorization", "Bearer x")]))
        listed = stub.ListIndexes(pb.ListIndexesRequest(), metadata=[("authorization", "Bearer s3cret")])

    assert status == health_pb2.HealthCheckResponse.SERVING
    assert missing == grpc.StatusCode.UNAUTHENTICATED
    assert wrong == grpc.StatusCode.UNAUTHENTICATED
    assert list(listed.indexes) == []


def test_health_turns_not_serving_on_stop(start_server: Any) -> None:
    running = start_server()
    with grpc.insecure_channel(running.grpc_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service="midx.v1.Sampler")
        watch = health.Watch(request)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING

        running.call(running.server.health.enter_graceful_shutdown())

        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """Write a self-signed certificate for 127.0.0.1 / localhost and its key; return their paths."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


def test_tls_channel_works_and_plaintext_fails(start_server: Any, tmp_path: Path) -> None:
    cert, key = make_certificate(tmp_path)
    running = start_server(tls_cert_file=str(cert), tls_key_file=str(key))
    credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())

    with grpc.secure_channel(running.grpc_target, credentials) as channel:
        listed = pb_grpc.SamplerStub(channel).ListIndexes(pb.ListIndexesRequest(), timeout=10)
    with grpc.insecure_channel(running.grpc_target) as channel:
        code = _code(lambda: pb_grpc.SamplerStub(channel).ListIndexes(pb.ListIndexesRequest(), timeout=5))

    assert list(listed.indexes) == []
    assert code == grpc.StatusCode.UNAVAILABLE
