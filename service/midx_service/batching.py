"""Dynamic batching: concurrent sample requests for one index are coalesced into one core call."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from midx_service.core import MidxIndex, SampleResult
from midx_service.errors import InvalidArgumentError
from midx_service.registry import IndexRegistry, Snapshot

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SampleCall:
    """One caller's sample request, already converted to arrays."""

    queries: np.ndarray  # (B, D) float32
    num_samples: int
    positives: np.ndarray | None  # (B, P) int64
    exclude_positives: bool
    sampler: str
    seed: int | None


@dataclass
class _Group:
    snapshot_name: str
    key: tuple[Any, ...]
    calls: list[tuple[SampleCall, asyncio.Future[tuple[SampleResult, int]]]] = field(default_factory=list)
    rows: int = 0
    timer: asyncio.TimerHandle | None = None


class SampleBatcher:
    """Coalesce sample requests that share index, num_samples, sampler and positives width.

    A request waits at most `window_ms` for others to join; a group is also flushed once it contains
    `max_batch_rows` query rows. The coalesced call runs on one snapshot, so every caller in a group
    gets the same version and exactly its own rows. Seeded requests run alone, because joining a batch
    would change their random stream. `on_batch(rows, requests)` observes each coalesced call.
    """

    def __init__(
        self,
        registry: IndexRegistry,
        *,
        window_ms: float,
        max_batch_rows: int,
        on_batch: Callable[[int, int], None] | None = None,
    ) -> None:
        self._registry = registry
        self._window_seconds = window_ms / 1000.0
        self._max_batch_rows = max_batch_rows
        self._on_batch = on_batch
        self._groups: dict[tuple[Any, ...], _Group] = {}

    async def sample(self, name: str, snapshot: Snapshot, call: SampleCall) -> tuple[SampleResult, int]:
        """Return the draws for `call` and the version that made them (at least `snapshot.version`)."""
        if not self._batchable(snapshot, call):
            return await self._run_alone(snapshot, call)

        key = self._key(name, call)
        group = self._groups.get(key)
        if group is None:
            group = _Group(name, key)
            self._groups[key] = group
            loop = asyncio.get_running_loop()
            group.timer = loop.call_later(self._window_seconds, self._flush, key)
        future: asyncio.Future[tuple[SampleResult, int]] = asyncio.get_running_loop().create_future()
        group.calls.append((call, future))
        group.rows += call.queries.shape[0]
        if group.rows >= self._max_batch_rows:
            self._flush(key)
        return await future

    def _batchable(self, snapshot: Snapshot, call: SampleCall) -> bool:
        index = snapshot.index
        if self._window_seconds <= 0 or call.seed is not None or index is None:
            return False
        # Only well-formed requests are coalesced; anything else runs alone, so the core's error
        # message names that request's own values.
        queries, positives = call.queries, call.positives
        if queries.ndim != 2 or queries.shape[1] != index.config.dim or queries.shape[0] == 0:
            return False
        return positives is None or (positives.ndim == 2 and positives.shape[0] == queries.shape[0])

    @staticmethod
    def _key(name: str, call: SampleCall) -> tuple[Any, ...]:
        width = None if call.positives is None else call.positives.shape[1]
        return (name, call.num_samples, call.sampler, call.exclude_positives, width)

    async def _run_alone(self, snapshot: Snapshot, call: SampleCall) -> tuple[SampleResult, int]:
        assert snapshot.index is not None
        if self._on_batch is not None:
            self._on_batch(int(call.queries.shape[0]) if call.queries.ndim else 0, 1)
        result = await self._registry.compute(_sample, snapshot.index, call)
        return result, snapshot.version

    def _flush(self, key: tuple[Any, ...]) -> None:
        group = self._groups.pop(key, None)
        if group is None:
            return
        if group.timer is not None:
            group.timer.cancel()
        task = asyncio.get_running_loop().create_task(self._run_group(group))
        task.add_done_callback(_log_unexpected)

    async def _run_group(self, group: _Group) -> None:
        live = [(call, future) for call, future in group.calls if not future.done()]
        if not live:
            return
        try:
            snapshot = await self._registry.snapshot(group.snapshot_name)
        except Exception as error:
            _fail_all(live, error)
            return
        index = snapshot.index
        assert index is not None

        if len(live) == 1:
            await self._settle(live[0][1], self._registry.compute(_sample, index, live[0][0]), snapshot.version)
            return

        rows = sum(call.queries.shape[0] for call, _ in live)
        if self._on_batch is not None:
            self._on_batch(rows, len(live))
        try:
            results = await self._registry.compute(_sample_group, index, [call for call, _ in live])
        except InvalidArgumentError:
            # One request is bad (say, a positive id beyond the table): run each alone so only that
            # caller gets the error.
            for call, future in live:
                await self._settle(future, self._registry.compute(_sample, index, call), snapshot.version)
            return
        except Exception as error:
            _fail_all(live, error)
            return
        for (_, future), result in zip(live, results, strict=True):
            if not future.done():
                future.set_result((result, snapshot.version))

    @staticmethod
    async def _settle(future: asyncio.Future[tuple[SampleResult, int]], work: Any, version: int) -> None:
        try:
            result = await work
        except Exception as error:
            if not future.done():
                future.set_exception(error)
            return
        if not future.done():
            future.set_result((result, version))


def _sample(index: MidxIndex, call: SampleCall) -> SampleResult:
    return index.sample(
        call.queries,
        call.num_samples,
        positives=call.positives,
        exclude_positives=call.exclude_positives,
        sampler=call.sampler,
        seed=call.seed,
    )


def _sample_group(index: MidxIndex, calls: list[SampleCall]) -> list[SampleResult]:
    """Sample all calls' queries in one core call and split the result back by rows."""
    first = calls[0]
    queries = np.concatenate([call.queries for call in calls])
    positives = None if first.positives is None else np.concatenate([call.positives for call in calls])
    merged = index.sample(
        queries,
        first.num_samples,
        positives=positives,
        exclude_positives=first.exclude_positives,
        sampler=first.sampler,
    )
    sizes = [call.queries.shape[0] for call in calls]
    ids = torch.split(merged.ids, sizes)
    log_q = torch.split(merged.log_q, sizes)
    positive_log_q: tuple[torch.Tensor | None, ...] = (
        (None,) * len(calls) if merged.positive_log_q is None else torch.split(merged.positive_log_q, sizes)
    )
    return [SampleResult(ids[i], log_q[i], positive_log_q[i]) for i in range(len(calls))]


def _fail_all(calls: list[tuple[SampleCall, asyncio.Future[Any]]], error: BaseException) -> None:
    for _, future in calls:
        if not future.done():
            future.set_exception(error)


def _log_unexpected(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("a batched sampling call failed unexpectedly", exc_info=task.exception())
