"""Background measurement of each index's proposal quality, and the refit policy that reads its KL.

Every `interval_seconds`, and after every table build and refit, the monitor measures each ready
index on its most recent served queries (at most `sample_size` of them) with
`core.telemetry.measure_quality`, on the registry's compute pool. The registry caches the result with
the version it was measured on, and the index info and the Prometheus gauges report it. The measured
KL is exact, so one measurement costs O(R N D) for R queries and N classes: keep `sample_size` small.

KL refit policy: the first KL measured on a full sample after a fit is the reference (`kl_at_fit`).
When a later measurement on a full sample exceeds `refit_kl_ratio` times that reference, the monitor
starts a background refit in the registry's auto_refit_mode. After every refit the next measurement
becomes the new reference, so a refit that could not lower the KL is not repeated at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from midx_service.core.telemetry import measure_quality
from midx_service.errors import MidxError
from midx_service.registry import IndexRegistry
from midx_service.reports import QualityMeasurement

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Measured:
    """Version and recorded-query count at an index's last measurement; unchanged, they skip the next one."""

    version: int
    queries_recorded: int


class TelemetryMonitor:
    """Measures every index's proposal quality in the background and applies the KL refit policy.

    interval_seconds: time between periodic measurements of all indexes (0: only after fits).
    sample_size: most recent served queries each measurement uses (0: no KL or effective sample size,
    only the figures that need no queries). refit_kl_ratio: the KL policy's threshold (0 disables).
    """

    def __init__(
        self,
        registry: IndexRegistry,
        *,
        interval_seconds: float = 60.0,
        sample_size: int = 64,
        refit_kl_ratio: float = 0.0,
    ) -> None:
        self.registry = registry
        self.interval_seconds = interval_seconds
        self.sample_size = sample_size
        self.refit_kl_ratio = refit_kl_ratio
        self._periodic: asyncio.Task[None] | None = None
        self._running: dict[str, asyncio.Task[None]] = {}
        self._pending: set[str] = set()
        self._last: dict[str, _Measured] = {}
        self._closed = False

    @property
    def full_sample_size(self) -> int:
        """Queries a measurement needs to set or test the KL policy's reference."""
        return max(1, min(self.sample_size, self.registry.reservoir_size))

    def start(self) -> None:
        """Listen for fits and start the periodic measurements; call once, on the event loop."""
        self.registry.add_fit_listener(self.schedule)
        for state in self.registry.states():
            if state.status.value == "ready":  # restored from persistence before the monitor started
                self.schedule(state.name)
        if self.interval_seconds > 0:
            self._periodic = asyncio.create_task(self._measure_periodically(), name="telemetry")

    async def close(self) -> None:
        """Stop measuring; a measurement running on the compute pool is abandoned, not awaited."""
        self._closed = True
        tasks = [task for task in (self._periodic, *self._running.values()) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def schedule(self, name: str) -> None:
        """Measure `name` soon in the background; a request during a running measurement queues one more."""
        if self._closed:
            return
        running = self._running.get(name)
        if running is not None and not running.done():
            self._pending.add(name)
            return
        task = asyncio.create_task(self._measure_in_background(name), name=f"telemetry-{name}")
        self._running[name] = task

    async def measure(self, name: str) -> QualityMeasurement | None:
        """Measure `name` now and apply the KL policy; return the measurement it cached.

        Returns None when the index has no table (or was deleted), or when a measurement that
        started later finished first.
        """
        try:
            measured_at = time.time()
            snapshot = await self.registry.snapshot(name)
            recorded = self.registry.queries_recorded(name)
            queries = self.registry.recent_queries(name, self.sample_size)
        except MidxError:
            return None
        assert snapshot.index is not None

        quality = await self.registry.compute(
            measure_quality, snapshot.index, queries if queries.shape[0] > 0 else None
        )

        full = quality.num_queries >= self.full_sample_size
        measurement = self.registry.record_quality(name, snapshot, quality, measured_at, sets_baseline=full)
        self._last[name] = _Measured(snapshot.version, recorded)
        if measurement is not None and full:
            self._apply_kl_policy(name, measurement)
        return measurement

    def _apply_kl_policy(self, name: str, measurement: QualityMeasurement) -> None:
        kl, reference = measurement.quality.kl, measurement.kl_at_fit
        if self.refit_kl_ratio <= 0 or kl is None or reference is None or reference <= 0:
            return
        if kl > self.refit_kl_ratio * reference and self.registry.start_automatic_refit(name, "kl"):
            logger.info(
                "index %r: KL(P || Q) %.4f exceeds %g x %.4f measured after the last fit; refitting",
                name,
                kl,
                self.refit_kl_ratio,
                reference,
            )

    async def _measure_in_background(self, name: str) -> None:
        try:
            while True:
                self._pending.discard(name)
                await self._measure_logged(name)
                if name not in self._pending or self._closed:
                    return
        finally:
            if self._running.get(name) is asyncio.current_task():
                del self._running[name]

    async def _measure_logged(self, name: str) -> None:
        try:
            await self.measure(name)
        except Exception:
            # No caller waits for a background measurement, so its failure is logged here and the
            # next interval or fit tries again.
            logger.exception("measuring the proposal quality of index %r failed", name)

    async def _measure_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.interval_seconds)
            names = {state.name for state in self.registry.states() if state.status.value == "ready"}
            for deleted in set(self._last) - names:
                del self._last[deleted]
            for name in sorted(names):
                if self._unchanged(name):
                    continue
                await self._measure_logged(name)

    def _unchanged(self, name: str) -> bool:
        last = self._last.get(name)
        if last is None:
            return False
        try:
            state = self.registry.state(name)
            recorded = self.registry.queries_recorded(name)
        except MidxError:
            return True
        return last.version == state.version and last.queries_recorded == recorded
