"""Prometheus metrics of one server process, in their own registry so several servers can share a process."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from midx_service.registry import IndexRegistry, IndexState

_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 65536)


class Metrics:
    """Request counters and latencies per transport, method and status, plus per-index gauges."""

    def __init__(self, registry: IndexRegistry) -> None:
        self.prometheus = CollectorRegistry()
        self.requests = Counter(
            "midx_requests",
            "Requests answered, by transport, method and status code.",
            ["transport", "method", "status"],
            registry=self.prometheus,
        )
        self.latency = Histogram(
            "midx_request_duration_seconds",
            "Time from receiving a request to answering it, by transport and method.",
            ["transport", "method"],
            buckets=_LATENCY_BUCKETS,
            registry=self.prometheus,
        )
        self.queries = Counter(
            "midx_queries",
            "Query rows served by sample and log-prob.",
            ["index", "sampler"],
            registry=self.prometheus,
        )
        self.samples = Counter(
            "midx_samples",
            "Classes drawn by sample requests.",
            ["index", "sampler"],
            registry=self.prometheus,
        )
        self.batch_queries = Histogram(
            "midx_batch_queries",
            "Query rows per sampling call after coalescing concurrent requests.",
            buckets=_BATCH_BUCKETS,
            registry=self.prometheus,
        )
        self.batch_requests = Histogram(
            "midx_batch_requests",
            "Requests coalesced into one sampling call.",
            buckets=_BATCH_BUCKETS,
            registry=self.prometheus,
        )
        self.prometheus.register(_IndexCollector(registry))

    def observe(self, transport: str, method: str, status: str, seconds: float) -> None:
        self.requests.labels(transport, method, status).inc()
        self.latency.labels(transport, method).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.prometheus)


class _IndexCollector(Collector):
    """Per-index gauges read from the registry at scrape time, so deleted indexes disappear."""

    def __init__(self, registry: IndexRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[GaugeMetricFamily]:
        version = GaugeMetricFamily("midx_index_version", "Current version of the index.", labels=["index"])
        classes = GaugeMetricFamily("midx_index_classes", "Classes in the index's table.", labels=["index"])
        build = GaugeMetricFamily(
            "midx_index_build_seconds", "Duration of the index's last table build.", labels=["index"]
        )
        error = GaugeMetricFamily(
            "midx_index_quantization_error",
            "Mean relative residual norm of the index's codes.",
            labels=["index"],
        )
        ready = GaugeMetricFamily(
            "midx_index_ready",
            "1 when the index can serve samples, also while it builds a new table or refits; else 0.",
            labels=["index"],
        )
        # The same rule as /readyz, so the gauge and the probe never disagree.
        unready = {state.name for state in self._registry.unready()}
        for state in self._registry.states():
            version.add_metric([state.name], state.version)
            classes.add_metric([state.name], state.num_classes)
            build.add_metric([state.name], state.build_seconds)
            error.add_metric([state.name], state.quantization_error)
            ready.add_metric([state.name], 0.0 if state.name in unready else 1.0)
        yield from (version, classes, build, error, ready)
        yield from _quality_gauges(self._registry.states())


# Gauges of the last proposal-quality measurement: (name, help, field of QualityMeasurement.quality).
_QUALITY_GAUGES = (
    ("midx_index_kl_divergence", "Mean KL(P || Q) in nats over recent queries, exact.", "kl"),
    (
        "midx_index_effective_sample_fraction",
        "Mean effective sample size of importance-weighted draws from Q over the number of draws (1 when Q = P).",
        "effective_sample_fraction",
    ),
    ("midx_index_empty_cell_fraction", "Share of the K x K cells that hold no class.", "empty_cell_fraction"),
    ("midx_index_largest_cell_fraction", "Share of all classes in the most populated cell.", "largest_cell_fraction"),
    (
        "midx_index_quantization_error_ratio",
        "Quantisation error over the error at the last codebook fit (above 1: stale codebooks).",
        "quantization_error_ratio",
    ),
    (
        "midx_index_codeword_drift",
        "Mean distance from each codeword to the mean of its assigned vectors, over the mean codeword norm.",
        "codeword_drift",
    ),
    ("midx_index_quality_queries", "Recent queries the KL and effective sample size were measured on.", "num_queries"),
)


def _quality_gauges(states: list[IndexState]) -> Iterator[GaugeMetricFamily]:
    """Yield the last quality measurement of every measured index; an unmeasured figure is left out."""
    families = {field: GaugeMetricFamily(name, text, labels=["index"]) for name, text, field in _QUALITY_GAUGES}
    kl_at_fit = GaugeMetricFamily(
        "midx_index_kl_divergence_at_fit",
        "KL(P || Q) measured first after the last codebook fit, the KL refit policy's reference.",
        labels=["index"],
    )
    measured_version = GaugeMetricFamily(
        "midx_index_quality_version", "Index version the quality gauges were measured on.", labels=["index"]
    )
    measured_at = GaugeMetricFamily(
        "midx_index_quality_timestamp_seconds", "Unix time of the last quality measurement.", labels=["index"]
    )
    for state in states:
        measurement = state.quality
        if measurement is None:
            continue
        for field, family in families.items():
            value = getattr(measurement.quality, field)
            if value is not None:
                family.add_metric([state.name], float(value))
        if measurement.kl_at_fit is not None:
            kl_at_fit.add_metric([state.name], measurement.kl_at_fit)
        measured_version.add_metric([state.name], measurement.version)
        measured_at.add_metric([state.name], measurement.measured_at)
    yield from (*families.values(), kl_at_fit, measured_version, measured_at)
