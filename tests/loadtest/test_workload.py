"""Tests of the load test's workload: settings, request bodies and the response checks."""

from __future__ import annotations

import numpy as np
import pytest
from workload import (
    RequestFactory,
    ResponseCheckError,
    VersionTracker,
    WorkloadSettings,
    check_log_prob,
    check_sample,
    load_table,
)

B, M, P, N = 4, 6, 1, 50


def valid_sample() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ids = np.arange(B * M, dtype=np.int64).reshape(B, M) % N
    log_q = np.full((B, M), -np.log(N), dtype=np.float32)
    positive_log_q = np.full((B, P), -np.log(N), dtype=np.float32)
    return ids, log_q, positive_log_q


def check(ids, log_q, positive_log_q) -> None:
    check_sample(ids, log_q, positive_log_q, batch_size=B, num_samples=M, num_positives=P, num_classes=N)


def test_check_sample_accepts_valid_answer():
    check(*valid_sample())


def test_check_sample_accepts_json_lists():
    ids, log_q, positive_log_q = valid_sample()
    check(ids.tolist(), log_q.tolist(), positive_log_q.tolist())


@pytest.mark.parametrize(
    ("field", "bad", "message"),
    [
        ("ids", np.zeros((B, M - 1), dtype=np.int64), "ids has shape"),
        ("ids", np.full((B, M), N, dtype=np.int64), "expected ids in [0, 50)"),
        ("ids", np.full((B, M), -1, dtype=np.int64), "expected ids in [0, 50)"),
        ("log_q", np.zeros((M, B), dtype=np.float32), "log_q has shape"),
        ("log_q", np.full((B, M), np.nan, dtype=np.float32), "non-finite"),
        ("log_q", np.full((B, M), -np.inf, dtype=np.float32), "non-finite"),
        ("log_q", np.full((B, M), 0.5, dtype=np.float32), "at most 0"),
        ("positive_log_q", None, "positive_log_q is missing"),
        ("positive_log_q", np.zeros((B, P + 1), dtype=np.float32), "positive_log_q has shape"),
    ],
)
def test_check_sample_rejects_bad_answer(field, bad, message):
    answer = dict(zip(("ids", "log_q", "positive_log_q"), valid_sample(), strict=True))
    answer[field] = bad

    with pytest.raises(ResponseCheckError) as raised:
        check(**answer)

    assert message in str(raised.value)


def test_check_sample_treats_json_null_as_not_finite():
    ids, log_q, positive_log_q = valid_sample()
    rows = log_q.tolist()
    rows[2][3] = None

    with pytest.raises(ResponseCheckError, match="1 non-finite"):
        check(ids, rows, positive_log_q)


def test_check_log_prob_rejects_wrong_shape_and_nan():
    check_log_prob(np.full((B, 3), -2.0), batch_size=B, num_ids=3)
    with pytest.raises(ResponseCheckError, match="shape"):
        check_log_prob(np.full((B, 2), -2.0), batch_size=B, num_ids=3)
    with pytest.raises(ResponseCheckError, match="non-finite"):
        check_log_prob(np.full((B, 3), np.nan), batch_size=B, num_ids=3)


def test_version_tracker_rejects_older_version():
    tracker = VersionTracker()
    tracker.observe(3, "sample")
    tracker.observe(3, "sample")
    tracker.observe(5, "update")

    with pytest.raises(ResponseCheckError, match="from 5 to 4"):
        tracker.observe(4, "sample")


@pytest.mark.parametrize("version", [None, "7", 2.0, True])
def test_version_tracker_rejects_non_integer_version(version):
    with pytest.raises(ResponseCheckError, match="expected an integer"):
        VersionTracker().observe(version, "sample")


def test_settings_read_from_environment():
    settings = WorkloadSettings.from_environ(
        {
            "MIDX_LOADTEST_TABLE": "random",
            "MIDX_LOADTEST_ROWS": "1000",
            "MIDX_LOADTEST_DIM": "8",
            "MIDX_LOADTEST_BATCH_SIZE": "32",
            "MIDX_GRPC_ADDRESS": "127.0.0.1:6000",
            "MIDX_API_TOKEN": "secret",
        }
    )

    assert (settings.table, settings.rows, settings.dim, settings.batch_size) == ("random", 1000, 8, 32)
    assert settings.grpc_address == "127.0.0.1:6000"
    assert settings.api_token == "secret"
    assert settings.num_samples == 100


def test_settings_round_trip_through_environment():
    settings = WorkloadSettings(table="random", rows=500, dim=4, update_rows=10, api_token="t", seed=3)

    assert WorkloadSettings.from_environ(settings.to_environ()) == settings


def test_settings_glove_table_ignores_row_count():
    settings = WorkloadSettings.from_environ({"MIDX_LOADTEST_ROWS": "10"})

    assert (settings.table, settings.rows, settings.dim) == ("glove", 400_000, 50)


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"MIDX_LOADTEST_TABLE": "imagenet"}, "expected one of glove, random"),
        ({"MIDX_LOADTEST_TABLE": "random", "MIDX_LOADTEST_ROWS": "many"}, "expected an integer"),
        ({"MIDX_LOADTEST_BATCH_SIZE": "0"}, "batch_size is 0"),
        ({"MIDX_LOADTEST_TABLE": "random", "MIDX_LOADTEST_ROWS": "5"}, "update_rows is 1000"),
    ],
)
def test_settings_reject_invalid_value(environ, message):
    with pytest.raises(ValueError, match=message):
        WorkloadSettings.from_environ(environ)


def test_random_table_is_seeded_and_read_only():
    settings = WorkloadSettings(table="random", rows=200, dim=5, update_rows=10)

    first, second = load_table(settings), load_table(settings)

    assert first.shape == (200, 5)
    assert first.dtype == np.float32
    np.testing.assert_array_equal(first, second)
    assert not first.flags.writeable


def test_request_factory_shapes_and_ranges():
    settings = WorkloadSettings(table="random", rows=300, dim=5, batch_size=8, log_prob_ids=4, update_rows=20)
    table = load_table(settings)
    requests = RequestFactory(settings, table, seed=1)

    queries, positives = requests.sample_batch()
    assert queries.shape == (8, 5)
    assert queries.dtype == np.float32
    assert positives.shape == (8, 1)
    assert positives.dtype == np.int64
    # Each query lies near the row of its positive, much nearer than to a random row.
    distance = np.linalg.norm(queries - table[positives[:, 0]], axis=1)
    assert distance.max() < 0.5 * np.linalg.norm(table, axis=1).mean()

    queries, ids = requests.log_prob_batch()
    assert queries.shape == (8, 5)
    assert ids.shape == (8, 4)
    assert ids.min() >= 0
    assert ids.max() < 300

    ids, embeddings = requests.row_update()
    assert ids.shape == (20,)
    assert embeddings.shape == (20, 5)
    assert np.unique(ids).size == 20
    np.testing.assert_allclose(embeddings, table[ids], atol=0.1)


def test_request_factories_with_different_seeds_differ():
    settings = WorkloadSettings(table="random", rows=300, dim=5, batch_size=8, update_rows=20)
    table = load_table(settings)

    first = RequestFactory(settings, table, seed=1).sample_batch()[1]
    second = RequestFactory(settings, table, seed=2).sample_batch()[1]

    assert not np.array_equal(first, second)
