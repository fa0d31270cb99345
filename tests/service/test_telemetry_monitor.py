"""Background proposal-quality measurements and the KL refit policy, over a real registry."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import pytest

from midx_service.core import IndexConfig
from midx_service.core.telemetry import measure_quality
from midx_service.registry import IndexRegistry
from midx_service.telemetry_monitor import TelemetryMonitor

DIM = 8
NUM_CLASSES = 300
CONFIG = IndexConfig(DIM, num_codewords=8)


def _array(seed: int, rows: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, DIM)).astype(np.float32)


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


async def _ready_registry(**options: Any) -> IndexRegistry:
    registry = IndexRegistry(**{"refit_error_ratio": 0.0, **options})
    await registry.create("words", CONFIG)
    await registry.upload("words", _array(0, NUM_CLASSES))
    return registry


async def _wait_for(condition: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.01)


def test_measurement_matches_core_on_recent_queries() -> None:
    async def scenario() -> tuple[Any, Any, Any]:
        registry = await _ready_registry()
        monitor = TelemetryMonitor(registry, interval_seconds=0, sample_size=16)
        registry.record_queries("words", _array(1, 40))
        measurement = await monitor.measure("words")
        snapshot = await registry.snapshot("words")
        state = registry.state("words")
        await monitor.close()
        await registry.close()
        return measurement, measure_quality(snapshot.index, _array(1, 40)[-16:]), state

    measurement, expected, state = run(scenario())

    assert measurement.version == 1
    assert measurement.quality == expected
    assert measurement.quality.num_queries == 16
    assert measurement.kl_at_fit == expected.kl
    assert state.quality == measurement


def test_measurement_without_queries_has_no_kl() -> None:
    async def scenario() -> Any:
        registry = await _ready_registry()
        monitor = TelemetryMonitor(registry, interval_seconds=0)
        measurement = await monitor.measure("words")
        await monitor.close()
        await registry.close()
        return measurement

    measurement = run(scenario())

    assert measurement.quality.num_queries == 0
    assert measurement.quality.kl is None
    assert measurement.quality.effective_sample_fraction is None
    assert measurement.kl_at_fit is None
    assert 0 <= measurement.quality.empty_cell_fraction < 1


def test_measurement_of_unknown_or_empty_index_is_none() -> None:
    async def scenario() -> tuple[Any, Any]:
        registry = IndexRegistry()
        await registry.create("empty", CONFIG)
        monitor = TelemetryMonitor(registry, interval_seconds=0)
        results = await monitor.measure("empty"), await monitor.measure("missing")
        await monitor.close()
        await registry.close()
        return results

    assert run(scenario()) == (None, None)


def test_small_sample_sets_no_reference() -> None:
    async def scenario() -> tuple[Any, Any]:
        registry = await _ready_registry()
        monitor = TelemetryMonitor(registry, interval_seconds=0, sample_size=32)
        registry.record_queries("words", _array(1, 10))
        partial = await monitor.measure("words")
        registry.record_queries("words", _array(2, 30))
        full = await monitor.measure("words")
        await monitor.close()
        await registry.close()
        return partial, full

    partial, full = run(scenario())

    assert partial.quality.num_queries == 10
    assert partial.kl_at_fit is None
    assert full.quality.num_queries == 32
    assert full.kl_at_fit == full.quality.kl


@pytest.mark.parametrize("auto_refit_mode", ["kmeans", "kl"])
def test_kl_growth_triggers_refit(auto_refit_mode: str) -> None:
    async def scenario() -> tuple[Any, Any, Any, Any]:
        registry = await _ready_registry(auto_refit_mode=auto_refit_mode, kl_refit_time_budget_seconds=5)
        monitor = TelemetryMonitor(registry, interval_seconds=0, sample_size=64, refit_kl_ratio=1.5)
        refitted = asyncio.Event()
        registry.add_fit_listener(lambda name: refitted.set())
        registry.record_queries("words", _array(1, 64))
        reference = await monitor.measure("words")
        # Started only now, so its first background measurement cannot supersede the one above.
        monitor.start()
        # Tripling every row sharpens P while the old codebooks keep Q where it was: the KL grows.
        await registry.update("words", np.arange(NUM_CLASSES), _array(0, NUM_CLASSES) * 3)
        grown = await monitor.measure("words")
        await asyncio.wait_for(refitted.wait(), 60)
        state = registry.state("words")
        await monitor.close()
        await registry.close()
        return reference, grown, state.last_refit, state

    reference, grown, report, state = run(scenario())

    assert reference.kl_at_fit == reference.quality.kl
    assert grown.kl_at_fit == reference.quality.kl
    assert grown.quality.kl > 1.5 * reference.quality.kl
    assert report.trigger == "kl"
    assert report.mode == auto_refit_mode
    assert state.version == (3 if report.accepted else 2)


def test_kl_below_ratio_starts_no_refit() -> None:
    async def scenario() -> tuple[Any, Any]:
        registry = await _ready_registry()
        monitor = TelemetryMonitor(registry, interval_seconds=0, sample_size=64, refit_kl_ratio=1.5)
        registry.record_queries("words", _array(1, 64))
        await monitor.measure("words")
        await registry.update("words", [0], _array(3, 1))
        measurement = await monitor.measure("words")
        state = registry.state("words")
        await monitor.close()
        await registry.close()
        return measurement, state

    measurement, state = run(scenario())

    assert measurement.version == 2
    assert measurement.quality.kl < 1.5 * measurement.kl_at_fit
    assert state.last_refit is None
    assert state.version == 2


def test_refit_restarts_reference_and_is_measured() -> None:
    async def scenario() -> tuple[Any, Any]:
        registry = await _ready_registry()
        monitor = TelemetryMonitor(registry, interval_seconds=0, sample_size=64)
        registry.record_queries("words", _array(1, 64))
        before = await monitor.measure("words")
        monitor.start()
        await registry.refit("words")
        # The monitor measures after every refit; the new measurement is the new reference.
        await _wait_for(lambda: registry.state("words").quality.version == 2)
        after = registry.state("words").quality
        await monitor.close()
        await registry.close()
        return before, after

    before, after = run(scenario())

    assert before.version == 1
    assert after.version == 2
    assert after.kl_at_fit == after.quality.kl


def test_auto_kl_mode_falls_back_to_kmeans_without_queries() -> None:
    async def scenario() -> Any:
        registry = await _ready_registry(auto_refit_mode="kl")
        started = registry.start_automatic_refit("words", "quantization_error")
        await registry.snapshot("words", min_version=2)
        state = registry.state("words")
        await registry.close()
        return started, state

    started, state = run(scenario())

    assert started
    assert state.last_refit.mode == "kmeans"
    assert state.last_refit.trigger == "quantization_error"


def test_periodic_measurement_runs_without_fits() -> None:
    def measured_with_queries(registry: IndexRegistry) -> bool:
        measurement = registry.state("words").quality
        return measurement is not None and measurement.quality.num_queries > 0

    async def scenario() -> tuple[Any, Any]:
        registry = await _ready_registry()
        monitor = TelemetryMonitor(registry, interval_seconds=0.02, sample_size=8)
        monitor.start()
        registry.record_queries("words", _array(1, 8))
        await _wait_for(lambda: measured_with_queries(registry))
        measurement = registry.state("words").quality
        snapshot = await registry.snapshot("words")
        await monitor.close()
        await registry.close()
        return measurement, measure_quality(snapshot.index, _array(1, 8))

    measurement, expected = run(scenario())

    assert measurement.quality.num_queries == 8
    assert measurement.quality.kl == pytest.approx(expected.kl)
