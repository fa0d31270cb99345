"""The ring buffer of recent queries: order, bounds, copies and concurrent writers."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from midx_service.reservoir import QueryReservoir


def _rows(start: int, count: int, dim: int = 3) -> np.ndarray:
    """Rows whose every value is the row's number, so order and torn rows are visible."""
    return np.repeat(np.arange(start, start + count, dtype=np.float32)[:, None], dim, axis=1)


def test_recent_returns_rows_oldest_first() -> None:
    reservoir = QueryReservoir(5, 3)

    reservoir.add(_rows(0, 2))
    reservoir.add(_rows(2, 2))

    np.testing.assert_array_equal(reservoir.recent(), _rows(0, 4))
    assert reservoir.size == 4
    assert reservoir.total_rows == 4


def test_wraps_around_keeping_latest_rows() -> None:
    reservoir = QueryReservoir(5, 3)

    for start in range(0, 12, 3):
        reservoir.add(_rows(start, 3))

    np.testing.assert_array_equal(reservoir.recent(), _rows(7, 5))
    np.testing.assert_array_equal(reservoir.recent(2), _rows(10, 2))
    assert reservoir.size == 5
    assert reservoir.total_rows == 12


def test_batch_larger_than_capacity_keeps_its_tail() -> None:
    reservoir = QueryReservoir(4, 3)
    reservoir.add(_rows(0, 1))

    reservoir.add(_rows(1, 10))

    np.testing.assert_array_equal(reservoir.recent(), _rows(7, 4))
    assert reservoir.total_rows == 11


def test_recent_is_a_float32_copy() -> None:
    reservoir = QueryReservoir(4, 3)
    reservoir.add(_rows(0, 2).astype(np.float64))

    copy = reservoir.recent()
    copy[:] = -1.0

    assert copy.dtype == np.float32
    np.testing.assert_array_equal(reservoir.recent(), _rows(0, 2))


def test_zero_capacity_keeps_nothing() -> None:
    reservoir = QueryReservoir(0, 3)

    reservoir.add(_rows(0, 4))

    assert reservoir.recent().shape == (0, 3)
    assert reservoir.total_rows == 4


def test_empty_reservoir_returns_empty_matrix() -> None:
    assert QueryReservoir(4, 3).recent(10).shape == (0, 3)


def test_add_rejects_wrong_width() -> None:
    with pytest.raises(ValueError, match=r"shape \(rows, 3\)"):
        QueryReservoir(4, 3).add(np.zeros((2, 4), np.float32))


def test_concurrent_writers_never_tear_rows() -> None:
    reservoir = QueryReservoir(64, 16)
    start = threading.Barrier(4)

    def write(offset: int) -> None:
        start.wait()
        for batch in range(200):
            reservoir.add(_rows(offset + batch * 7, 7, dim=16))

    threads = [threading.Thread(target=write, args=(10_000 * worker,)) for worker in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    rows = reservoir.recent()
    assert reservoir.total_rows == 4 * 200 * 7
    assert rows.shape == (64, 16)
    # Every row is one whole written row: all its values are equal.
    assert (rows == rows[:, :1]).all()
