"""Prometheus metrics of one router app.

Each app owns its `CollectorRegistry` (several apps in one process, as in tests, must not
share counters or collide on registration). Per-worker gauges are not stored: a collector
reads the live cluster view at scrape time, so a worker that dies disappears from /metrics
instead of freezing at its last value.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from router.policy import WorkerState

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5)


class _WorkerCollector(Collector):
    def __init__(self, workers: Callable[[], Sequence[WorkerState]]) -> None:
        self._workers = workers

    def collect(self) -> Iterator[GaugeMetricFamily]:
        labels = ["worker", "pool"]
        queue = GaugeMetricFamily(
            "splitserve_worker_queued_requests", "Requests waiting on a worker", labels=labels
        )
        queued_tokens = GaugeMetricFamily(
            "splitserve_worker_queued_prefill_tokens", "Prompt tokens waiting on a worker", labels=labels
        )
        running = GaugeMetricFamily(
            "splitserve_worker_running_requests", "Sequences running on a worker", labels=labels
        )
        kv = GaugeMetricFamily(
            "splitserve_worker_kv_usage_ratio", "Fraction of a worker's KV blocks in use", labels=labels
        )
        integrity = GaugeMetricFamily(
            "splitserve_worker_kv_pool_integrity_ok",
            "1 while a worker's last idle KV pool integrity check passed (every block accounted for), else 0",
            labels=labels,
        )
        for w in self._workers():
            lv = [w.worker_id, w.info.pool]
            queue.add_metric(lv, w.load.queued_requests)
            queued_tokens.add_metric(lv, w.load.queued_prefill_tokens)
            running.add_metric(lv, w.load.running_requests)
            kv.add_metric(lv, w.load.kv_usage)
            integrity.add_metric(lv, 1.0 if w.load.integrity_ok else 0.0)
        yield from (queue, queued_tokens, running, kv, integrity)


class RouterMetrics:
    """The router's series: latency histograms, token counters, request outcomes, routing."""

    def __init__(self, workers: Callable[[], Sequence[WorkerState]] = lambda: ()) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.ttft = Histogram(
            "splitserve_time_to_first_token_seconds",
            "Arrival to first token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "splitserve_time_per_output_token_seconds", "Mean gap between output tokens of a sequence",
            buckets=_TPOT_BUCKETS, registry=r,
        )  # fmt: skip
        self.e2e = Histogram(
            "splitserve_e2e_request_latency_seconds",
            "Arrival to last token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("splitserve_prompt_tokens", "Prompt tokens received", registry=r)
        self.generation_tokens = Counter("splitserve_generation_tokens", "Tokens generated", registry=r)
        self.requests = Counter(
            "splitserve_requests",
            "Finished HTTP requests by endpoint and status",
            ["endpoint", "status"],
            registry=r,
        )
        self.running = Gauge("splitserve_requests_running", "Requests being served", registry=r)
        self.routes = Counter(
            "splitserve_route_decisions", "Routing decisions by reason", ["reason"], registry=r
        )
        self.retries = Counter(
            "splitserve_route_retries", "Re-routes after a worker failed", ["failed_pool"], registry=r
        )
        self.migrations = Counter(
            "splitserve_migrations", "Streams moved to another decode worker after theirs was lost mid-stream",
            ["outcome"], registry=r,
        )  # outcome: attempted | succeeded | failed
        for outcome in ("attempted", "succeeded", "failed"):
            self.migrations.labels(outcome)
        self.worker_restarts = Counter(
            "splitserve_worker_restarts", "Processes the supervisor restarted", ["process"], registry=r
        )  # process: a worker id, or "redis"
        self.cached_prompt_tokens = Counter(
            "splitserve_prefix_cache_hit_tokens",
            "Prompt tokens the chosen decode worker had cached",
            registry=r,
        )
        r.register(_WorkerCollector(workers))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
