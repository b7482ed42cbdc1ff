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


# (metric name, kind, help, EngineMetrics attribute): read from the engine at each scrape.
_ENGINE_METRICS: tuple[tuple[str, str, str, str], ...] = (
    ("slots", "gauge", "Generation slots (--parallel)", "n_slots"),
    ("busy_slots", "gauge", "Slots generating now", "busy_slots"),
    ("queue_depth", "gauge", "Requests waiting for a slot", "queue_depth"),
    (
        "compute_threads",
        "gauge",
        "Threads decoding now (fewer than --threads while a neighbour process takes cores)",
        "n_threads_active",
    ),
    ("engine_decode_steps", "gauge", "Batched decode steps run by the engine", "decode_steps_total"),
    ("paused_slots", "gauge", "Slots paused because their reader is behind (backpressure)", "paused_slots"),
    ("slow_reader_pauses", "counter", "Times a slot was paused for a slow reader", "pauses_total"),
    (
        "slow_reader_cancels",
        "counter",
        "Streams cancelled after staying paused past --slow-reader-timeout",
        "slow_reader_cancels_total",
    ),
    ("cache_hit_tokens", "counter", "Prompt tokens reused from the prefix cache", "cache_hit_tokens_total"),
    ("cache_miss_tokens", "counter", "Prompt tokens computed (not cached)", "cache_miss_tokens_total"),
    ("ram_cache_bytes", "gauge", "Bytes held by the host-RAM prompt cache", "ram_cache_bytes"),
    ("ram_cache_entries", "gauge", "Prompt prefixes held by the host-RAM cache", "ram_cache_entries"),
    ("ram_cache_restores", "counter", "Prefixes restored from the host-RAM cache into a slot", "ram_cache_restores_total"),
    ("draft_tokens", "counter", "Speculative decoding: draft tokens put into batches", "draft_tokens_total"),
    (
        "draft_accepted_tokens",
        "counter",
        "Speculative decoding: draft tokens the model accepted (each saved a decode step)",
        "draft_accepted_tokens_total",
    ),
    ("embed_inputs", "counter", "Embed: inputs embedded", "embed_inputs_total"),
    ("embed_tokens", "counter", "Embed: tokens of the inputs embedded", "embed_tokens_total"),
    (
        "guarded_failures",
        "counter",
        "Streams ended because their request left no token allowed or cost over --max-sample-ms per step",
        "guarded_failures_total",
    ),
)


class _EngineCollector(Collector):
    """Engine gauges and counters read on each scrape; nothing while no model is loaded."""

    def __init__(self, read: Callable[[], Optional[EngineMetrics]]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        snapshot = self._read()
        if snapshot is None:
            return
        for name, kind, doc, attribute in _ENGINE_METRICS:
            family = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
            yield family(f"{_NS}_{name}", doc, value=getattr(snapshot, attribute))


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
