"""Prometheus metrics: API requests, and per-task gauges read from the live tasks."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .manager import Manager

STATES = ("Initial", "Running", "Paused", "Failed", "Succeeded")


class TaskCollector(Collector):
    def __init__(self, manager: "Manager") -> None:
        self.manager = manager

    def collect(self) -> Iterator[Metric]:
        state = GaugeMetricFamily("cdcd_task_state", "1 for the state the task is in",
                                  labels=["task_id", "state"])
        keys = CounterMetricFamily("cdcd_snapshot_keys", "Keys copied by the snapshot",
                                   labels=["task_id"])
        total = GaugeMetricFamily("cdcd_snapshot_keys_total", "Keys the snapshot expects",
                                  labels=["task_id"])
        sbytes = CounterMetricFamily("cdcd_snapshot_bytes", "Payload bytes copied by the "
                                     "snapshot", labels=["task_id"])
        written = CounterMetricFamily("cdcd_target_written_bytes", "Bytes written to the "
                                      "target", labels=["task_id"])
        ops = CounterMetricFamily("cdcd_commands_applied", "Replicated commands applied",
                                  labels=["task_id"])
        lag_b = GaugeMetricFamily("cdcd_lag_bytes", "Source offset minus applied offset",
                                  labels=["task_id"])
        lag_ms = GaugeMetricFamily("cdcd_lag_milliseconds", "Measured replication lag",
                                   labels=["task_id"])
        retries = CounterMetricFamily("cdcd_retries", "Reconnects after errors",
                                      labels=["task_id"])
        errors = CounterMetricFamily("cdcd_full_resyncs", "Snapshots redone after the "
                                     "source refused a partial resync", labels=["task_id"])
        for task in list(self.manager.tasks.values()):
            tid = task.spec.task_id
            p = task.progress
            for s in STATES:
                state.add_metric([tid, s], 1.0 if task.state.value == s else 0.0)
            keys.add_metric([tid], p.keys_done)
            total.add_metric([tid], max(p.keys_total, p.keys_done))
            sbytes.add_metric([tid], p.snapshot_bytes)
            written.add_metric([tid], p.bytes_written)
            ops.add_metric([tid], p.ops_applied)
            retries.add_metric([tid], p.retries)
            errors.add_metric([tid], p.full_resyncs)
            if task.spec.incremental:
                lag_b.add_metric([tid], max(0, p.source_offset - p.applied_offset))
                if p.lag_ms is not None:
                    lag_ms.add_metric([tid], p.lag_ms)
        yield from (state, keys, total, sbytes, written, ops, lag_b, lag_ms, retries, errors)


class Metrics:
    """One registry per daemon (no process-global metric state)."""

    def __init__(self, manager: "Manager") -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("cdcd_api_requests", "API requests by request_type and code",
                                ["request_type", "code"], registry=self.registry)
        self.latency = Histogram("cdcd_api_request_seconds", "API request latency",
                                 ["request_type"], registry=self.registry,
                                 buckets=(0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1, 5))
        self.registry.register(TaskCollector(manager))

    def observe_request(self, request_type: str, code: int, seconds: float) -> None:
        self.requests.labels(request_type, str(code)).inc()
        self.latency.labels(request_type).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
