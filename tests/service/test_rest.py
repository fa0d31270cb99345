"""The REST front end through a real HTTP server on a loopback port: routes, codes, bad input."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from midx_client import RestSamplerClient, SamplerClient
from midx_service.core import IndexConfig, MidxIndex
from midx_service.core.telemetry import measure_quality
from tests.conftest import LEARNABLE_CODEWORDS, LEARNABLE_DIM, learnable_queries, learnable_table

DIM = 8
NUM_CLASSES = 300


@pytest.fixture
def table() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((NUM_CLASSES, DIM)).astype(np.float32)


@pytest.fixture
def http(server: Any) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.http_url, timeout=30) as client:
        yield client


@pytest.fixture
def words(http: httpx.Client, table: np.ndarray) -> str:
    """An index 'words' built from `table`, at version 1."""
    assert http.put("/v1/indexes/words", json={"dim": DIM, "num_codewords": 8}).status_code == 201
    response = http.put("/v1/indexes/words/embeddings", content=_npy(table), headers=_NPY)
    assert response.json() == {"version": 1}
    return "words"


_NPY = {"content-type": "application/x-npy"}
_NPZ = {"content-type": "application/x-npz"}


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _load_npz(response: httpx.Response) -> dict[str, np.ndarray]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/x-npz"
    with np.load(io.BytesIO(response.content), allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


def _queries(rows: int = 4, seed: int = 1) -> list[list[float]]:
    return np.random.default_rng(seed).standard_normal((rows, DIM)).astype(np.float32).tolist()


def _error(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"]["code"] == code
    return str(body["error"]["message"])


def _version(http: httpx.Client, name: str = "words") -> int:
    return int(http.get(f"/v1/indexes/{name}").json()["version"])


def _sample_works(http: httpx.Client, name: str = "words") -> None:
    response = http.post(f"/v1/indexes/{name}/sample", json={"queries": _queries(), "num_samples": 3})
    assert response.status_code == 200, response.text


# ------------------------------------------------------------------------------------------ routes


def test_health_and_ready_routes(http: httpx.Client) -> None:
    assert http.get("/healthz").json() == {"status": "ok"}
    assert http.get("/readyz").status_code == 200

    http.put("/v1/indexes/empty", json={"dim": DIM})

    _error(http.get("/readyz"), 503, "unavailable")
    assert 'midx_index_ready{index="empty"} 0.0' in http.get("/metrics").text


def test_unknown_route_and_method_use_error_shape(http: httpx.Client) -> None:
    missing = http.get("/v1/nonexistent")
    wrong_method = http.delete("/healthz")

    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"
    assert "GET /v1/nonexistent" in missing.json()["error"]["message"]
    assert wrong_method.status_code == 405
    assert wrong_method.json()["error"]["code"] == "method_not_allowed"
    assert wrong_method.headers["allow"] == "GET"
    # The server keeps serving after both.
    assert http.get("/healthz").status_code == 200


def test_readyz_counts_index_serving_during_rebuild(
    start_server: Any, hold_compute: Any, poll: Any, table: np.ndarray
) -> None:
    running = start_server(compute_threads=1)
    with httpx.Client(base_url=running.http_url, timeout=30) as http:
        http.put("/v1/indexes/words", json={"dim": DIM, "num_codewords": 8})
        http.put("/v1/indexes/words/embeddings", content=_npy(table), headers=_NPY)
        gate = hold_compute(running)
        upload = threading.Thread(
            target=http.put, args=("/v1/indexes/words/embeddings",), kwargs={"content": _npy(table), "headers": _NPY}
        )
        upload.start()
        poll(lambda: http.get("/v1/indexes/words").json()["status"] == "building", "the second build")

        ready = http.get("/readyz")
        metrics = http.get("/metrics").text

        gate.open()
        upload.join(30)
        assert ready.status_code == 200, ready.text
        assert 'midx_index_ready{index="words"} 1.0' in metrics
        assert _version(http) == 2


def test_readyz_fails_during_first_build(start_server: Any, hold_compute: Any, poll: Any, table: np.ndarray) -> None:
    running = start_server(compute_threads=1)
    with httpx.Client(base_url=running.http_url, timeout=30) as http:
        http.put("/v1/indexes/words", json={"dim": DIM, "num_codewords": 8})
        gate = hold_compute(running)
        upload = threading.Thread(
            target=http.put, args=("/v1/indexes/words/embeddings",), kwargs={"content": _npy(table), "headers": _NPY}
        )
        upload.start()
        poll(lambda: http.get("/v1/indexes/words").json()["status"] == "building", "the first build")

        building = http.get("/readyz")

        gate.open()
        upload.join(30)
        assert "words (building)" in _error(building, 503, "unavailable")
        assert http.get("/readyz").status_code == 200


def test_readyz_fails_after_failed_build(start_server: Any, table: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    running = start_server()

    def failing_build(*args: Any) -> Any:
        raise RuntimeError("simulated build failure")

    monkeypatch.setattr(running.server.registry, "_build", failing_build)
    with httpx.Client(base_url=running.http_url, timeout=30) as http:
        http.put("/v1/indexes/words", json={"dim": DIM, "num_codewords": 8})

        upload = http.put("/v1/indexes/words/embeddings", content=_npy(table), headers=_NPY)

        assert "RuntimeError" in _error(upload, 500, "internal")
        assert http.get("/v1/indexes/words").json()["status"] == "failed"
        assert "words (failed)" in _error(http.get("/readyz"), 503, "unavailable")


def test_index_lifecycle_routes(http: httpx.Client, table: np.ndarray) -> None:
    created = http.put("/v1/indexes/items", json={"dim": DIM, "num_codewords": 4, "metric": "cosine"})
    assert created.status_code == 201
    assert created.json()["status"] == "empty"
    assert created.json()["version"] == 0

    body = {"embeddings": table[:50].tolist(), "weights": [1.0] * 50}
    assert http.put("/v1/indexes/items/embeddings", json=body).json() == {"version": 1}
    info = http.get("/v1/indexes/items").json()
    listed = http.get("/v1/indexes").json()["indexes"]
    deleted = http.delete("/v1/indexes/items")

    assert info["num_classes"] == 50
    assert info["status"] == "ready"
    assert info["metric"] == "cosine"
    assert info["device"] == "cpu"
    assert info["quantization_error"] >= 0
    assert [entry["name"] for entry in listed] == ["items"]
    assert deleted.status_code == 204
    _error(http.get("/v1/indexes/items"), 404, "not_found")


def test_sample_matches_core_for_same_seed(http: httpx.Client, words: str, table: np.ndarray) -> None:
    queries = _queries(5)
    positives = [[1], [2], [3], [4], [5]]
    core = MidxIndex.build(IndexConfig(DIM, num_codewords=8), table)
    expected = core.sample(np.array(queries, dtype=np.float32), 7, positives=np.array(positives), seed=11)

    response = http.post(
        "/v1/indexes/words/sample",
        json={"queries": queries, "num_samples": 7, "positives": positives, "seed": 11},
    ).json()

    assert response["version"] == 1
    np.testing.assert_array_equal(response["ids"], expected.ids.numpy())
    np.testing.assert_allclose(response["log_q"], expected.log_q.numpy(), rtol=1e-6)
    assert expected.positive_log_q is not None
    np.testing.assert_allclose(response["positive_log_q"], expected.positive_log_q.numpy(), rtol=1e-6)


def test_update_log_prob_and_rebuild_routes(http: httpx.Client, words: str, table: np.ndarray) -> None:
    new_rows = np.random.default_rng(5).standard_normal((2, DIM)).astype(np.float32)
    patched = http.patch(
        "/v1/indexes/words/embeddings", json={"ids": [0, NUM_CLASSES], "embeddings": new_rows.tolist()}
    )
    patched_npz = http.patch(
        "/v1/indexes/words/embeddings", content=_npz(ids=np.array([3]), embeddings=new_rows[:1]), headers=_NPZ
    )
    log_prob = http.post(
        "/v1/indexes/words/log-prob", json={"queries": _queries(2), "ids": [[0, NUM_CLASSES], [1, 2]]}
    ).json()
    rebuilt = http.post("/v1/indexes/words/rebuild").json()

    assert patched.json() == {"version": 2}
    assert patched_npz.json() == {"version": 3}
    assert log_prob["version"] == 3
    assert np.array(log_prob["log_q"]).shape == (2, 2)
    assert rebuilt == {"version": 4}
    assert http.get("/v1/indexes/words").json()["num_classes"] == NUM_CLASSES + 1


def test_sample_npz_body_and_answer_match_core(http: httpx.Client, words: str, table: np.ndarray) -> None:
    queries = np.array(_queries(5), dtype=np.float32)
    positives = np.arange(1, 11, dtype=np.int64).reshape(5, 2)
    core = MidxIndex.build(IndexConfig(DIM, num_codewords=8), table)
    expected = core.sample(queries, 7, positives=positives, exclude_positives=True, seed=11)

    response = http.post(
        "/v1/indexes/words/sample",
        params={"num_samples": 7, "exclude_positives": "true", "seed": 11},
        content=_npz(queries=queries, positives=positives),
        headers={**_NPZ, "accept": "application/x-npz"},
    )

    arrays = _load_npz(response)
    assert sorted(arrays) == ["ids", "log_q", "positive_log_q", "version"]
    assert arrays["version"].shape == ()
    assert int(arrays["version"]) == 1
    assert arrays["ids"].dtype == np.int64
    assert arrays["log_q"].dtype == np.float32
    np.testing.assert_array_equal(arrays["ids"], expected.ids.numpy())
    np.testing.assert_allclose(arrays["log_q"], expected.log_q.numpy(), rtol=1e-6)
    assert expected.positive_log_q is not None
    np.testing.assert_allclose(arrays["positive_log_q"], expected.positive_log_q.numpy(), rtol=1e-6)


def test_log_prob_npz_keeps_minus_infinity(http: httpx.Client, table: np.ndarray) -> None:
    http.put("/v1/indexes/popular", json={"dim": DIM, "num_codewords": 4, "last_stage": "popularity"})
    weights = np.ones(NUM_CLASSES)
    weights[0] = 0.0
    http.put("/v1/indexes/popular/embeddings", content=_npz(embeddings=table, weights=weights), headers=_NPZ)
    queries = np.array(_queries(2), dtype=np.float32)
    ids = np.array([[0, 1], [2, 0]], dtype=np.int64)

    response = http.post(
        "/v1/indexes/popular/log-prob",
        params={"sampler": "midx"},
        content=_npz(queries=queries, ids=ids),
        headers={**_NPZ, "accept": "application/x-npz"},
    )

    arrays = _load_npz(response)
    assert sorted(arrays) == ["log_q", "version"]
    assert arrays["log_q"][0, 0] == -np.inf
    assert arrays["log_q"][1, 1] == -np.inf
    assert np.isfinite(arrays["log_q"][0, 1])


def test_answer_format_follows_accept_header(http: httpx.Client, words: str) -> None:
    queries = np.array(_queries(3), dtype=np.float32)
    npz_body = {"params": {"num_samples": 4}, "content": _npz(queries=queries)}

    npz_without_accept = http.post("/v1/indexes/words/sample", headers=_NPZ, **npz_body)
    npz_preferring_json = http.post(
        "/v1/indexes/words/sample",
        headers={**_NPZ, "accept": "application/json, application/x-npz;q=0.5"},
        **npz_body,
    )
    json_asking_npz = http.post(
        "/v1/indexes/words/sample",
        json={"queries": queries.tolist(), "num_samples": 4},
        headers={"accept": "application/x-npz, */*;q=0.1"},
    )

    assert npz_without_accept.headers["content-type"] == "application/json"
    assert np.array(npz_without_accept.json()["ids"]).shape == (3, 4)
    assert npz_preferring_json.headers["content-type"] == "application/json"
    assert npz_without_accept.headers["vary"] == "accept"
    assert _load_npz(json_asking_npz)["ids"].shape == (3, 4)


def test_npz_sample_requires_num_samples(http: httpx.Client, words: str) -> None:
    content = _npz(queries=np.array(_queries(), dtype=np.float32))

    response = http.post("/v1/indexes/words/sample", content=content, headers=_NPZ)

    assert "num_samples" in _error(response, 400, "invalid_argument")
    _sample_works(http)


def test_json_sample_rejects_query_options(http: httpx.Client, words: str) -> None:
    response = http.post("/v1/indexes/words/sample", params={"seed": 3}, json={"queries": _queries(), "num_samples": 3})

    assert "['seed']" in _error(response, 400, "invalid_argument")


def test_npz_sample_rejects_unknown_arrays(http: httpx.Client, words: str) -> None:
    content = _npz(queries=np.array(_queries(), dtype=np.float32), negatives=np.zeros((4, 1), np.int64))

    response = http.post("/v1/indexes/words/sample", params={"num_samples": 3}, content=content, headers=_NPZ)

    assert "negatives" in _error(response, 400, "invalid_argument")


def test_npz_sample_rejects_non_finite_query(http: httpx.Client, words: str) -> None:
    queries = np.array(_queries(), dtype=np.float32)
    queries[2, 5] = -np.inf

    response = http.post(
        "/v1/indexes/words/sample", params={"num_samples": 3}, content=_npz(queries=queries), headers=_NPZ
    )

    assert "row 2" in _error(response, 400, "invalid_argument")
    _sample_works(http)


def test_sample_rejects_unsupported_content_type(http: httpx.Client, words: str) -> None:
    response = http.post(
        "/v1/indexes/words/sample",
        params={"num_samples": 3},
        content=_npy(np.array(_queries(), dtype=np.float32)),
        headers=_NPY,
    )

    assert "application/x-npz" in _error(response, 400, "invalid_argument")


def test_upload_npz_with_weights_and_digest(http: httpx.Client, table: np.ndarray) -> None:
    http.put("/v1/indexes/popular", json={"dim": DIM, "num_codewords": 4, "last_stage": "popularity"})
    weights = np.arange(NUM_CLASSES, dtype=np.float64)
    body = _npz(embeddings=table, weights=weights)
    digest = "sha-256=:" + base64.b64encode(hashlib.sha256(body).digest()).decode() + ":"

    response = http.put("/v1/indexes/popular/embeddings", content=body, headers={**_NPZ, "content-digest": digest})
    log_q = http.post("/v1/indexes/popular/log-prob", json={"queries": _queries(1), "ids": [[0, 1]]}).json()["log_q"]

    assert response.json() == {"version": 1}
    assert log_q[0][0] is None  # class 0 has weight 0: log Q is -inf, sent as null
    assert isinstance(log_q[0][1], float)


def test_metrics_route_reports_requests_and_indexes(http: httpx.Client, words: str) -> None:
    _sample_works(http)

    text = http.get("/metrics").text

    assert 'midx_requests_total{method="sample",status="200",transport="rest"} 1.0' in text
    assert 'midx_index_version{index="words"} 1.0' in text
    assert f'midx_index_classes{{index="words"}} {float(NUM_CLASSES)}' in text
    assert "midx_samples_total" in text
    assert "midx_batch_queries_bucket" in text
    assert "midx_index_build_seconds" in text
    assert "midx_index_quantization_error" in text


@pytest.mark.slow
def test_health_and_metrics_stay_fast_under_load(start_server: Any, poll: Any) -> None:
    running = start_server(compute_threads=2)
    rng = np.random.default_rng(0)
    with SamplerClient(running.grpc_target) as setup:
        setup.create_index("big", 32, num_codewords=16)
        setup.upload_embeddings("big", rng.standard_normal((50_000, 32)).astype(np.float32))
    # Two clients per kind keep a request of each kind waiting while another computes.
    clients = [
        SamplerClient(running.grpc_target),
        SamplerClient(running.grpc_target),
        RestSamplerClient(running.http_url),
        RestSamplerClient(running.http_url),
        RestSamplerClient(running.http_url, binary=False),
    ]
    batches = [4096, 4096, 4096, 4096, 256]
    completed = [0] * len(clients)
    failures: list[BaseException] = []
    stop = threading.Event()

    def sample(position: int) -> None:
        queries = rng.standard_normal((batches[position], 32)).astype(np.float32)
        try:
            with clients[position] as client:
                while not stop.is_set():
                    client.sample("big", queries, 100)
                    completed[position] += 1
        except BaseException as error:
            failures.append(error)

    threads = [threading.Thread(target=sample, args=(position,)) for position in range(len(clients))]
    for thread in threads:
        thread.start()
    try:
        poll(lambda: all(completed) or failures, "every sampling client to finish one request")
        before = sum(completed)
        deadline = time.monotonic() + 60
        health_seconds, metrics_seconds = [], []
        with httpx.Client(base_url=running.http_url, timeout=30) as http:
            # At least ten checks, and on until sampling has finished a few more requests meanwhile.
            while len(health_seconds) < 10 or (sum(completed) - before < 4 and time.monotonic() < deadline):
                started = time.perf_counter()
                assert http.get("/healthz").status_code == 200
                health_seconds.append(time.perf_counter() - started)
                started = time.perf_counter()
                assert "midx_requests_total" in http.get("/metrics").text
                metrics_seconds.append(time.perf_counter() - started)
        during = sum(completed) - before
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)

    assert failures == []
    assert during >= 4, "sampling should have kept running while health was checked"
    # Each takes milliseconds when idle; a second would mean they queue behind sampling work.
    assert max(health_seconds) < 1.0, health_seconds
    assert max(metrics_seconds) < 1.0, metrics_seconds


def test_openapi_documents_routes_and_errors(http: httpx.Client) -> None:
    spec = http.get("/openapi.json").json()
    docs = http.get("/docs")

    sample = spec["paths"]["/v1/indexes/{name}/sample"]["post"]
    upload = spec["paths"]["/v1/indexes/{name}/embeddings"]["put"]
    assert docs.status_code == 200
    assert {"400", "401", "404", "409", "413", "422", "503"} <= set(sample["responses"])
    assert "application/x-npz" in upload["requestBody"]["content"]
    assert set(sample["requestBody"]["content"]) == {"application/json", "application/x-npz"}
    assert set(sample["responses"]["200"]["content"]) == {"application/json", "application/x-npz"}
    assert {"num_samples", "exclude_positives", "sampler", "seed", "min_version"} <= {
        parameter["name"] for parameter in sample["parameters"]
    }
    references = set(re.findall(r'"#/components/schemas/([^"]+)"', json.dumps(spec)))
    assert {"SampleBody", "LogProbBody", "UploadEmbeddingsBody", "UpdateEmbeddingsBody"} <= references
    assert references <= set(spec["components"]["schemas"]), "every schema reference must resolve"
    assert "/v1/indexes/{name}/log-prob" in spec["paths"]
    assert "/v1/indexes/{name}/rebuild" in spec["paths"]
    metrics_content = spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics_content) == [http.get("/metrics").headers["content-type"]]


# --------------------------------------------------------------------- learned refits, telemetry


def _learned_index(http: httpx.Client) -> None:
    """Create index 'learned' from the learnable table, at version 1."""
    config = {"dim": LEARNABLE_DIM, "num_codewords": LEARNABLE_CODEWORDS}
    assert http.put("/v1/indexes/learned", json=config).status_code == 201
    assert http.put("/v1/indexes/learned/embeddings", content=_npy(learnable_table()), headers=_NPY).status_code == 200


@pytest.mark.slow
def test_rebuild_kl_swaps_in_learned_codebooks(start_server: Any) -> None:
    running = start_server(kl_refit_time_budget_seconds=20)
    with httpx.Client(base_url=running.http_url, timeout=60) as http:
        _learned_index(http)
        queries = learnable_queries().tolist()
        assert http.post("/v1/indexes/learned/sample", json={"queries": queries, "num_samples": 2}).status_code == 200

        rebuilt = http.post("/v1/indexes/learned/rebuild", json={"mode": "kl"})
        info = http.get("/v1/indexes/learned").json()

    assert rebuilt.json() == {"version": 2}
    assert info["version"] == 2
    assert info["codebook_fit"] == "kl"
    report = info["last_refit"]
    assert report["mode"] == "kl"
    assert report["trigger"] == "request"
    assert report["accepted"] is True
    assert report["version"] == 2
    assert report["num_queries"] == 200
    assert report["heldout_kl_after"] < report["heldout_kl_before"]


def test_rebuild_kl_without_gain_keeps_index(http: httpx.Client, words: str) -> None:
    # Zero queries make P uniform, which the current Q already matches exactly.
    body = {"mode": "kl", "queries": np.zeros((16, DIM)).tolist()}

    rebuilt = http.post("/v1/indexes/words/rebuild", json=body)
    info = http.get("/v1/indexes/words").json()

    assert rebuilt.json() == {"version": 1}
    assert info["version"] == 1
    assert info["codebook_fit"] == "kmeans"
    assert info["last_refit"]["accepted"] is False
    assert info["last_refit"]["heldout_kl_after"] == info["last_refit"]["heldout_kl_before"]


def test_rebuild_without_body_refits_kmeans(http: httpx.Client, words: str) -> None:
    rebuilt = http.post("/v1/indexes/words/rebuild")
    report = http.get("/v1/indexes/words").json()["last_refit"]

    assert rebuilt.json() == {"version": 2}
    assert (report["mode"], report["accepted"], report["heldout_kl_before"]) == ("kmeans", True, None)


@pytest.mark.parametrize(
    ("body", "status", "named"),
    [
        ({"mode": "annealing"}, 400, "mode must be 'kmeans' or 'kl'"),
        ({"mode": "kmeans", "queries": np.zeros((16, DIM)).tolist()}, 400, "only by mode 'kl'"),
        ({"mode": "kl", "queries": np.zeros((16, DIM + 1)).tolist()}, 400, "columns"),
        ({"mode": "kl", "queries": [[0.0] * DIM] * 15 + [[0.0]]}, 400, "rectangular"),
        ({"mode": "kl", "queries": np.zeros((3, DIM)).tolist()}, 400, "at least 8"),
        ({"mode": "kl", "queries": np.zeros((5000, DIM)).tolist()}, 413, "MIDX_KL_REFIT_MAX_QUERIES"),
        ({"mode": "kl"}, 409, "has 0 recent queries"),
        ({"mode": "kl", "shuffle": True}, 422, "shuffle"),
    ],
)
def test_rebuild_rejects_bad_request(
    http: httpx.Client, words: str, body: dict[str, Any], status: int, named: str
) -> None:
    response = http.post("/v1/indexes/words/rebuild", json=body)

    assert response.status_code == status, response.text
    assert named in response.json()["error"]["message"]
    info = http.get("/v1/indexes/words").json()
    assert info["version"] == 1
    assert info["last_refit"] is None


def test_rebuild_rejects_non_finite_queries(http: httpx.Client, words: str) -> None:
    rows = ", ".join(["[" + ", ".join(["0"] * DIM) + "]"] * 15 + ["[NaN" + ", 0" * (DIM - 1) + "]"])
    content = '{"mode": "kl", "queries": [' + rows + "]}"

    response = http.post("/v1/indexes/words/rebuild", content=content, headers={"content-type": "application/json"})

    assert "NaN" in _error(response, 400, "invalid_argument")
    assert _version(http) == 1


def test_info_and_metrics_report_measured_quality(start_server: Any, table: np.ndarray) -> None:
    running = start_server(telemetry_sample_size=16, telemetry_interval_seconds=0)
    queries = np.random.default_rng(3).standard_normal((40, DIM)).astype(np.float32)
    with httpx.Client(base_url=running.http_url, timeout=30) as http:
        http.put("/v1/indexes/words", json={"dim": DIM, "num_codewords": 8})
        http.put("/v1/indexes/words/embeddings", content=_npy(table), headers=_NPY)
        for batch in np.split(queries, 4):
            http.post("/v1/indexes/words/sample", json={"queries": batch.tolist(), "num_samples": 3})
        running.call(running.server.monitor.measure("words"))

        info = http.get("/v1/indexes/words").json()
        metrics = _gauges(http.get("/metrics").text, "words")

    snapshot = running.call(running.server.registry.snapshot("words"))
    expected = measure_quality(snapshot.index, queries[-16:])
    quality = info["quality"]
    assert quality["version"] == 1
    assert quality["num_queries"] == 16
    assert quality["kl_at_fit"] == quality["kl"]
    for field, value in expected.to_dict().items():
        assert quality[field] == pytest.approx(value, rel=1e-12), field
    assert metrics["midx_index_kl_divergence"] == pytest.approx(expected.kl, rel=1e-12)
    assert metrics["midx_index_effective_sample_fraction"] == pytest.approx(expected.effective_sample_fraction)
    assert metrics["midx_index_empty_cell_fraction"] == pytest.approx(expected.empty_cell_fraction)
    assert metrics["midx_index_largest_cell_fraction"] == pytest.approx(expected.largest_cell_fraction)
    assert metrics["midx_index_quantization_error_ratio"] == pytest.approx(expected.quantization_error_ratio)
    assert metrics["midx_index_codeword_drift"] == pytest.approx(expected.codeword_drift)
    assert metrics["midx_index_kl_divergence_at_fit"] == pytest.approx(expected.kl)
    assert metrics["midx_index_quality_queries"] == 16
    assert metrics["midx_index_quality_version"] == 1


def test_info_has_no_quality_before_a_measurement(http: httpx.Client) -> None:
    http.put("/v1/indexes/fresh", json={"dim": DIM})

    info = http.get("/v1/indexes/fresh").json()
    text = http.get("/metrics").text

    assert info["quality"] is None
    assert info["last_refit"] is None
    assert info["codebook_fit"] == "kmeans"
    assert 'midx_index_kl_divergence{index="fresh"}' not in text


def _gauges(text: str, index: str) -> dict[str, float]:
    """Return the value of every sample labelled with `index` in a Prometheus text exposition."""
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.labels.get("index") == index
    }


# --------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "raw_query",
    ["[NaN, 0, 0, 0, 0, 0, 0, 0]", "[Infinity, 0, 0, 0, 0, 0, 0, 0]", '["NaN", 0, 0, 0, 0, 0, 0, 0]'],
)
def test_sample_rejects_non_finite_query(http: httpx.Client, words: str, raw_query: str) -> None:
    content = '{"queries": [' + raw_query + '], "num_samples": 3}'

    response = http.post("/v1/indexes/words/sample", content=content, headers={"content-type": "application/json"})

    assert response.status_code in (400, 422), response.text
    assert "NaN" in response.json()["error"]["message"] or "finite" in response.json()["error"]["message"]
    _sample_works(http)


def test_upload_rejects_non_finite_embeddings(http: httpx.Client, words: str, table: np.ndarray) -> None:
    bad = table.copy()
    bad[7, 2] = np.nan

    message = _error(http.put("/v1/indexes/words/embeddings", content=_npy(bad), headers=_NPY), 400, "invalid_argument")

    assert "row 7" in message
    assert _version(http) == 1
    _sample_works(http)


def test_sample_rejects_wrong_dim(http: httpx.Client, words: str) -> None:
    response = http.post("/v1/indexes/words/sample", json={"queries": [[0.0, 1.0, 2.0]], "num_samples": 3})

    assert "3 columns" in _error(response, 400, "invalid_argument")
    _sample_works(http)


def test_upload_rejects_wrong_dtype(http: httpx.Client, words: str) -> None:
    strings = np.array([["a"] * DIM], dtype="<U1")

    response = http.put("/v1/indexes/words/embeddings", content=_npy(strings), headers=_NPY)

    assert "dtype" in _error(response, 400, "invalid_argument")
    assert _version(http) == 1


def test_upload_rejects_truncated_npy(http: httpx.Client, words: str, table: np.ndarray) -> None:
    response = http.put("/v1/indexes/words/embeddings", content=_npy(table)[:-40], headers=_NPY)

    assert ".npy" in _error(response, 400, "invalid_argument")
    assert _version(http) == 1


def test_sample_rejects_ragged_queries(http: httpx.Client, words: str) -> None:
    response = http.post(
        "/v1/indexes/words/sample", json={"queries": [[0.0] * DIM, [0.0] * (DIM - 1)], "num_samples": 3}
    )

    assert "rectangular" in _error(response, 400, "invalid_argument")
    _sample_works(http)


def test_sample_answers_empty_batch(http: httpx.Client, words: str) -> None:
    response = http.post("/v1/indexes/words/sample", json={"queries": [], "num_samples": 3})

    assert response.status_code == 200, response.text
    assert response.json()["ids"] == []
    assert response.json()["version"] == 1


@pytest.mark.parametrize("num_samples", [0, -2])
def test_sample_rejects_num_samples_below_one(http: httpx.Client, words: str, num_samples: int) -> None:
    response = http.post("/v1/indexes/words/sample", json={"queries": _queries(), "num_samples": num_samples})

    assert "num_samples" in _error(response, 400, "invalid_argument")


def test_sample_rejects_num_samples_above_limit(start_server: Any, table: np.ndarray) -> None:
    running = start_server(max_num_samples=10)
    with httpx.Client(base_url=running.http_url) as http:
        http.put("/v1/indexes/words", json={"dim": DIM, "num_codewords": 8})
        http.put("/v1/indexes/words/embeddings", content=_npy(table), headers=_NPY)

        response = http.post("/v1/indexes/words/sample", json={"queries": _queries(), "num_samples": 11})
        binary = http.post(
            "/v1/indexes/words/sample",
            params={"num_samples": 11},
            content=_npz(queries=np.array(_queries(), dtype=np.float32)),
            headers=_NPZ,
        )

        message = _error(response, 413, "resource_exhausted")
        assert "limit of 10" in message
        assert "MIDX_MAX_NUM_SAMPLES" in message
        assert "MIDX_MAX_NUM_SAMPLES" in _error(binary, 413, "resource_exhausted")
        _sample_works(http)


def test_sample_rejects_batch_above_limit(start_server: Any, table: np.ndarray) -> None:
    running = start_server(max_batch=3)
    with httpx.Client(base_url=running.http_url) as http:
        http.put("/v1/indexes/words", json={"dim": DIM, "num_codewords": 8})
        http.put("/v1/indexes/words/embeddings", content=_npy(table), headers=_NPY)

        response = http.post("/v1/indexes/words/sample", json={"queries": _queries(4), "num_samples": 2})
        log_prob = http.post("/v1/indexes/words/log-prob", json={"queries": _queries(4), "ids": [[0]] * 4})

        message = _error(response, 413, "resource_exhausted")
        assert "limit of 3" in message
        assert "MIDX_MAX_BATCH" in message
        assert "MIDX_MAX_BATCH" in _error(log_prob, 413, "resource_exhausted")
        ok = http.post("/v1/indexes/words/sample", json={"queries": _queries(3), "num_samples": 2})
        assert ok.status_code == 200


def test_sample_rejects_positive_out_of_range(http: httpx.Client, words: str) -> None:
    response = http.post(
        "/v1/indexes/words/sample",
        json={"queries": _queries(2), "num_samples": 3, "positives": [[0], [NUM_CLASSES]]},
    )

    assert str(NUM_CLASSES) in _error(response, 400, "invalid_argument")
    _sample_works(http)


def test_update_rejects_id_out_of_range(http: httpx.Client, words: str) -> None:
    body = {"ids": [NUM_CLASSES + 5], "embeddings": [[0.5] * DIM]}

    response = http.patch("/v1/indexes/words/embeddings", json=body)

    _error(response, 400, "invalid_argument")
    assert _version(http) == 1
    assert http.get("/v1/indexes/words").json()["num_classes"] == NUM_CLASSES


def test_update_rejects_duplicate_ids(http: httpx.Client, words: str) -> None:
    body = {"ids": [4, 4], "embeddings": [[0.5] * DIM, [0.25] * DIM]}

    response = http.patch("/v1/indexes/words/embeddings", json=body)

    assert "more than once" in _error(response, 400, "invalid_argument")
    assert _version(http) == 1


def test_unknown_index_is_not_found(http: httpx.Client) -> None:
    _error(http.get("/v1/indexes/nothing"), 404, "not_found")
    _error(
        http.post("/v1/indexes/nothing/sample", json={"queries": _queries(), "num_samples": 2}),
        404,
        "not_found",
    )
    _error(http.delete("/v1/indexes/nothing"), 404, "not_found")


def test_create_existing_index_conflicts(http: httpx.Client, words: str) -> None:
    response = http.put("/v1/indexes/words", json={"dim": DIM})

    assert "exists" in _error(response, 409, "already_exists")
    assert _version(http) == 1


def test_create_rejects_bad_config(http: httpx.Client) -> None:
    _error(http.put("/v1/indexes/bad", json={"dim": 0}), 400, "invalid_argument")
    _error(http.put("/v1/indexes/bad", json={"dim": 4, "quantizer": "lsh"}), 422, "invalid_argument")
    _error(http.put("/v1/indexes/bad%20name", json={"dim": 4}), 400, "invalid_argument")
    assert http.get("/v1/indexes").json() == {"indexes": []}


def test_sample_without_table_fails_precondition(http: httpx.Client) -> None:
    http.put("/v1/indexes/empty", json={"dim": DIM})

    response = http.post("/v1/indexes/empty/sample", json={"queries": _queries(), "num_samples": 2})

    assert "upload" in _error(response, 409, "failed_precondition")


def test_body_above_limit_is_rejected(start_server: Any, table: np.ndarray) -> None:
    running = start_server(max_body_bytes=4096)
    with httpx.Client(base_url=running.http_url) as http:
        http.put("/v1/indexes/words", json={"dim": DIM, "num_codewords": 8})

        response = http.put("/v1/indexes/words/embeddings", content=_npy(table), headers=_NPY)

        assert "MIDX_MAX_BODY_BYTES" in _error(response, 413, "resource_exhausted")
        ok = http.put("/v1/indexes/words/embeddings", content=_npy(table[:50]), headers=_NPY)
        assert ok.json() == {"version": 1}


def _chunked(total_bytes: int) -> Iterator[bytes]:
    """Yield a body in 1 KiB pieces; httpx sends a generator with chunked encoding and no Content-Length."""
    for _ in range(total_bytes // 1024):
        yield b"\0" * 1024


@pytest.mark.parametrize(
    ("method", "route", "content_type"),
    [
        ("PUT", "embeddings", "application/x-npy"),
        ("POST", "sample?num_samples=2", "application/x-npz"),
        ("POST", "log-prob", "application/json"),
    ],
)
def test_chunked_body_above_limit_is_rejected(
    start_server: Any, table: np.ndarray, method: str, route: str, content_type: str
) -> None:
    running = start_server(max_body_bytes=4096)
    with httpx.Client(base_url=running.http_url, timeout=30) as http:
        http.put("/v1/indexes/words", json={"dim": DIM, "num_codewords": 8})
        http.put("/v1/indexes/words/embeddings", content=_npy(table[:100]), headers=_NPY)

        response = http.request(
            method, f"/v1/indexes/words/{route}", content=_chunked(64 * 1024), headers={"content-type": content_type}
        )

        assert "content-length" not in response.request.headers
        assert "MIDX_MAX_BODY_BYTES" in _error(response, 413, "resource_exhausted")
        assert _version(http) == 1
        _sample_works(http)


def test_upload_rejects_digest_mismatch(http: httpx.Client, words: str, table: np.ndarray) -> None:
    digest = "sha-256=:" + base64.b64encode(hashlib.sha256(b"other").digest()).decode() + ":"

    response = http.put("/v1/indexes/words/embeddings", content=_npy(table), headers={**_NPY, "content-digest": digest})

    assert "corrupted" in _error(response, 400, "invalid_argument")
    assert _version(http) == 1


def test_min_version_times_out_with_conflict(http: httpx.Client, words: str) -> None:
    response = http.post("/v1/indexes/words/sample", json={"queries": _queries(), "num_samples": 2, "min_version": 5})

    assert "min_version 5" in _error(response, 409, "failed_precondition")


def test_json_never_carries_non_finite_numbers(http: httpx.Client, table: np.ndarray) -> None:
    http.put("/v1/indexes/popular", json={"dim": DIM, "num_codewords": 4, "last_stage": "popularity"})
    weights = np.ones(NUM_CLASSES)
    weights[:10] = 0.0
    http.put("/v1/indexes/popular/embeddings", content=_npz(embeddings=table, weights=weights), headers=_NPZ)

    response = http.post(
        "/v1/indexes/popular/sample",
        json={"queries": _queries(3), "num_samples": 5, "positives": [[0], [1], [2]]},
    )

    json.loads(response.text, parse_constant=lambda token: pytest.fail(f"non-finite token {token}"))
    assert response.json()["positive_log_q"] == [[None], [None], [None]]


# ------------------------------------------------------------------------------------------- token


def test_token_is_required_except_on_health(start_server: Any) -> None:
    running = start_server(api_token="s3cret")
    with httpx.Client(base_url=running.http_url) as http:
        missing = http.get("/v1/indexes")
        wrong = http.get("/v1/indexes", headers={"authorization": "Bearer nope"})
        right = http.get("/v1/indexes", headers={"authorization": "Bearer s3cret"})
        metrics = http.get("/metrics")

        assert "Bearer" in _error(missing, 401, "unauthenticated")
        _error(wrong, 401, "unauthenticated")
        _error(metrics, 401, "unauthenticated")
        assert right.status_code == 200
        assert http.get("/healthz").status_code == 200
        assert http.get("/readyz").status_code == 200


def test_upload_of_non_numpy_body_names_the_format(server: Any) -> None:
    with httpx.Client(base_url=server.http_url, timeout=30) as http:
        http.put("/v1/indexes/plain", json={"dim": 4, "num_codewords": 2})
        response = http.put(
            "/v1/indexes/plain/embeddings", content=b"hello", headers={"Content-Type": "application/x-npy"}
        )

    assert response.status_code == 400
    assert "not a .npy file" in response.json()["error"]["message"]
    assert "pickle" not in response.json()["error"]["message"]
