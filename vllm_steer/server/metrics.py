"""Steering metrics on vLLM's ``/metrics``.

Front-end counters are counted where requests pass. What the workers see (how many distinct
steering configs the admitted requests of each step hold, in a fixed-bucket histogram; how
many requests ran without the steering they asked for) is counted by each worker and polled
from worker 0 every few seconds.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

from vllm_steer.core.runtime import STEP_BUCKETS
from vllm_steer.engine.seam import prometheus_registry


class _WorkerCollector:
    """Metrics counted by worker 0, from its latest stats."""

    def __init__(self) -> None:
        self.stats: dict | None = None

    def collect(self):
        steps = HistogramMetricFamily(
            "vllm_steer_step_distinct_configs",
            "Distinct steering configs among the admitted steered requests, per engine step (worker 0)",
        )
        unapplied = CounterMetricFamily(
            "vllm_steer_unapplied_requests",
            "Requests that asked for steering or capture and ran without it (worker 0; see the README)",
        )
        if self.stats is not None:
            snapshot, running, buckets = self.stats["step_distinct_configs"], 0, []
            for bound, count in zip([*map(str, STEP_BUCKETS), "+Inf"], snapshot["counts"]):
                running += count
                buckets.append((bound, running))
            steps.add_metric([], buckets, snapshot["sum"])
            unapplied.add_metric([], self.stats["unapplied_requests"])
        yield steps
        yield unapplied


class SteeringMetrics:
    _instance: SteeringMetrics | None = None

    def __init__(self) -> None:
        registry = prometheus_registry()
        self.requests_total = Counter(
            "vllm_steer_requests", "Generation requests by steering", ["steering"], registry=registry
        )
        self.rejected_total = Counter("vllm_steer_rejected_specs", "Requests refused for a bad steering spec", registry=registry)
        self.registry_vectors = Gauge(
            "vllm_steer_registry_vectors", "Named vectors in the steering registry", registry=registry, multiprocess_mode="max"
        )
        self.worker_vectors = Gauge(
            "vllm_steer_worker_vectors",
            "Named vectors the workers hold (worker 0): behind vllm_steer_registry_vectors until the next poll "
            "pushes another replica's changes",
            registry=registry,
            multiprocess_mode="max",
        )
        self.slots_in_use = Gauge(
            "vllm_steer_slots_in_use", "Steering slots held by running requests (worker 0)", registry=registry, multiprocess_mode="max"
        )
        self.workers = _WorkerCollector()
        registry.register(self.workers)

    @classmethod
    def get(cls) -> SteeringMetrics:
        """One set per process (prometheus refuses a metric name registered twice)."""
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def request(self, steered: bool) -> None:
        self.requests_total.labels(steering="steered" if steered else "unsteered").inc()

    def rejected(self) -> None:
        self.rejected_total.inc()

    def worker_stats(self, stats: dict) -> None:
        self.slots_in_use.set(stats["slots_in_use"])
        self.worker_vectors.set(stats["vectors"])
        self.workers.stats = stats
