"""Prometheus metrics of one service instance (its own registry, so tests can run several).

Counters and histograms are fed by the servicer; slot and queue gauges are read from
`Llama.metrics()` at scrape time, so they are never stale.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Callable, Optional

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from ..llama import EngineMetrics

__all__ = ["MetricsServer", "ServiceMetrics"]

_NS = "llama_crab"
# Seconds. TTFT includes queueing, so it reaches further out than the per-token latency.
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0)


class _EngineCollector(Collector):
    """Gauges read from the engine on each scrape; nothing while no model is loaded."""

    def __init__(self, read: Callable[[], Optional[EngineMetrics]]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        snapshot = self._read()
        if snapshot is None:
            return
        yield GaugeMetricFamily(f"{_NS}_slots", "Generation slots (--parallel)", value=snapshot.n_slots)
        yield GaugeMetricFamily(f"{_NS}_busy_slots", "Slots generating now", value=snapshot.busy_slots)
        yield GaugeMetricFamily(f"{_NS}_queue_depth", "Requests waiting for a slot", value=snapshot.queue_depth)
        yield GaugeMetricFamily(
            f"{_NS}_engine_decode_steps", "Batched decode steps run by the engine", value=snapshot.decode_steps_total
        )
        yield GaugeMetricFamily(
            f"{_NS}_paused_slots", "Slots paused because their reader is behind (backpressure)", value=snapshot.paused_slots
        )
        yield CounterMetricFamily(
            f"{_NS}_slow_reader_pauses", "Times a slot was paused for a slow reader", value=snapshot.pauses_total
        )
        yield CounterMetricFamily(
            f"{_NS}_slow_reader_cancels",
            "Streams cancelled after staying paused past --slow-reader-timeout",
            value=snapshot.slow_reader_cancels_total,
        )
        yield CounterMetricFamily(
            f"{_NS}_cache_hit_tokens", "Prompt tokens reused from the prefix cache", value=snapshot.cache_hit_tokens_total
        )
        yield CounterMetricFamily(
            f"{_NS}_cache_miss_tokens", "Prompt tokens computed (not cached)", value=snapshot.cache_miss_tokens_total
        )
        yield GaugeMetricFamily(
            f"{_NS}_ram_cache_bytes", "Bytes held by the host-RAM prompt cache", value=snapshot.ram_cache_bytes
        )
        yield GaugeMetricFamily(
            f"{_NS}_ram_cache_entries", "Prompt prefixes held by the host-RAM cache", value=snapshot.ram_cache_entries
        )
        yield CounterMetricFamily(
            f"{_NS}_ram_cache_restores",
            "Prefixes restored from the host-RAM cache into a slot",
            value=snapshot.ram_cache_restores_total,
        )
        yield CounterMetricFamily(
            f"{_NS}_guarded_failures",
            "Streams ended because their request left no token allowed or cost over --max-sample-ms per step",
            value=snapshot.guarded_failures_total,
        )


class ServiceMetrics:
    """The service's instruments, registered in a registry of their own."""

    def __init__(self, read_engine: Callable[[], Optional[EngineMetrics]]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            f"{_NS}_requests", "Finished RPCs by method and gRPC status code", ["method", "code"], registry=r
        )
        self.completions = Counter(
            f"{_NS}_completions", "Finished completions by stop reason", ["stop_reason"], registry=r
        )
        self.prompt_tokens = Counter(f"{_NS}_prompt_tokens", "Prompt tokens of finished completions", registry=r)
        self.completion_tokens = Counter(
            f"{_NS}_completion_tokens", "Generated tokens delivered to clients", registry=r
        )
        self.ttft = Histogram(
            f"{_NS}_time_to_first_token_seconds",
            "From request arrival to the first streamed chunk",
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.token_latency = Histogram(
            f"{_NS}_token_latency_seconds",
            "Time per generated token after the first (inter-chunk gap / tokens in the chunk)",
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        r.register(_EngineCollector(read_engine))

    def count_request(self, method: str, code: str) -> None:
        self.requests.labels(method=method, code=code).inc()

    def value(self, name: str, labels: Optional[dict[str, str]] = None) -> float:
        """A sample's current value (0 if absent); for tests and diagnostics."""
        got = self.registry.get_sample_value(name, labels or {})
        return 0.0 if got is None else got


class MetricsServer:
    """The /metrics HTTP endpoint on its own port (prometheus_client's threaded server)."""

    def __init__(self, metrics: ServiceMetrics, host: str, port: int) -> None:
        self._server, self._thread = start_http_server(port, addr=host, registry=metrics.registry)
        self.port: int = int(self._server.server_address[1])

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
