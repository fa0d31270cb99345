"""A bounded ring buffer of the most recent queries an index served, for telemetry and learned refits."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np


class QueryReservoir:
    """The last `capacity` query rows (D floats each) recorded, oldest overwritten first.

    `add` copies at most `capacity` rows into a preallocated float32 buffer, so recording a batch
    costs O(min(B, capacity) * D) and never allocates. A lock makes `add` and `recent` safe to call
    from the event loop and from worker threads at once.
    """

    def __init__(self, capacity: int, dim: int) -> None:
        if capacity < 0 or dim < 1:
            raise ValueError(f"capacity must be >= 0 and dim >= 1, got capacity {capacity}, dim {dim}")
        self.capacity = capacity
        self.dim = dim
        self._rows = np.zeros((capacity, dim), dtype=np.float32)
        self._next = 0
        self._size = 0
        self._total = 0
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        """Rows the reservoir contains now, at most `capacity`."""
        return self._size

    @property
    def total_rows(self) -> int:
        """Rows recorded since the reservoir was created, including those overwritten since."""
        return self._total

    def add(self, queries: Any) -> None:
        """Record the rows of a (B, dim) array; only the last `capacity` of them are kept."""
        batch = np.asarray(queries)
        if batch.ndim != 2 or batch.shape[1] != self.dim:
            raise ValueError(f"queries must have shape (rows, {self.dim}), got {batch.shape}")
        tail = batch[max(0, batch.shape[0] - self.capacity) :]
        count = tail.shape[0]

        with self._lock:
            self._total += batch.shape[0]
            if count == 0:
                return
            start = self._next
            first = min(count, self.capacity - start)
            # Assigning into the float32 buffer converts the dtype in the same pass as the copy.
            self._rows[start : start + first] = tail[:first]
            self._rows[: count - first] = tail[first:]
            self._next = (start + count) % self.capacity
            self._size = min(self.capacity, self._size + count)

    def recent(self, max_rows: int | None = None) -> np.ndarray:
        """Return a copy of the most recent `max_rows` rows (all of them when None), oldest first.

        The result is a (R, dim) float32 array with R = min(max_rows, size); R may be 0.
        """
        with self._lock:
            count = self._size if max_rows is None else max(0, min(max_rows, self._size))
            start = (self._next - count) % self.capacity if self.capacity else 0
            if start + count <= self.capacity:
                return self._rows[start : start + count].copy()
            return np.concatenate([self._rows[start:], self._rows[: start + count - self.capacity]])
