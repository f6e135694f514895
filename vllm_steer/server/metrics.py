"""Steering metrics on vLLM's ``/metrics``.

Front-end counters are counted where requests pass. What happens per engine step (how many
distinct steering configs share it) is counted by each worker in a fixed-bucket histogram,
and polled from the workers every few seconds.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge
from prometheus_client.core import HistogramMetricFamily

from vllm_steer.slots import STEP_BUCKETS


class _WorkerStepCollector:
    def __init__(self) -> None:
        self.snapshot: dict | None = None

    def collect(self):
        family = HistogramMetricFamily(
            "vllm_steer_step_distinct_configs",
            "Distinct steering configs among the requests of an engine step (worker 0)",
        )
        if self.snapshot is not None:
            counts, running = self.snapshot["counts"], 0
            buckets = []
            for bound, count in zip([*map(str, STEP_BUCKETS), "+Inf"], counts):
                running += count
                buckets.append((bound, running))
            family.add_metric([], buckets, self.snapshot["sum"])
        yield family


class SteeringMetrics:
    _instance: SteeringMetrics | None = None

    def __init__(self) -> None:
        from vllm.v1.metrics.prometheus import get_prometheus_registry

        registry = get_prometheus_registry()
        self.requests_total = Counter(
            "vllm_steer_requests", "Generation requests by steering", ["steering"], registry=registry
        )
        self.rejected_total = Counter("vllm_steer_rejected_specs", "Requests refused for a bad steering spec", registry=registry)
        self.registry_vectors = Gauge(
            "vllm_steer_registry_vectors", "Named vectors in the steering registry", registry=registry, multiprocess_mode="max"
        )
        self.slots_in_use = Gauge(
            "vllm_steer_slots_in_use", "Steering slots held by running requests (worker 0)", registry=registry, multiprocess_mode="max"
        )
        self.steps = _WorkerStepCollector()
        registry.register(self.steps)

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
        self.steps.snapshot = stats["step_distinct_configs"]
