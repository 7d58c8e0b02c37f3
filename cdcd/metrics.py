"""Prometheus metrics: API requests, HTTP connections, per-task values read from the live
tasks, verifications by state, the store's health, the build, and the process.

Conventions (https://prometheus.io/docs/practices/naming/): base units (seconds, bytes),
``_total`` counters for everything that counts (take ``rate()`` for per-second values: no
precomputed rate gauge), no ``_created`` series, and labels of bounded cardinality only
(``task_id`` and ``state`` are bounded by ``max_tasks``; never a key name). Every cdcd
series starts with ``cdcd_``; the process and platform collectors add ``process_*`` and
``python_*``.
"""

from __future__ import annotations

import platform
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from . import __version__
from .verify import STATES as VERIFICATION_STATES

if TYPE_CHECKING:
    from .manager import Manager

STATES = ("Initial", "Running", "Paused", "Failed", "Succeeded")


class TaskCollector(Collector):
    """Read every live task's progress at scrape time (deleted tasks simply disappear).

    Counters restart from 0 when a full resync redoes a snapshot (keys/bytes) or after a
    daemon restart for values the store does not keep; Prometheus' rate() handles resets.
    """

    def __init__(self, manager: Manager) -> None:
        self.manager = manager

    def collect(self) -> Iterator[Metric]:
        def counter(name: str, doc: str) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, labels=["task_id"])

        def gauge(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=["task_id"])

        state = GaugeMetricFamily("cdcd_task_state", "1 for the state the task is in, 0 for "
                                  "the others", labels=["task_id", "state"])
        keys = counter("cdcd_snapshot_keys", "Keys copied by the snapshot")
        expected = gauge("cdcd_snapshot_keys_expected", "Keys the snapshot expects to copy")
        skipped = counter("cdcd_snapshot_keys_skipped", "Keys the snapshot left alone "
                          "(existing_keys skip)")
        sbytes = counter("cdcd_snapshot_bytes", "Payload bytes copied by the snapshot")
        written = counter("cdcd_target_written_bytes", "Bytes written to the target")
        ops = counter("cdcd_commands_applied", "Replicated commands applied to the target")
        lag_b = gauge("cdcd_lag_bytes", "Source replication offset minus applied offset "
                      "(incremental tasks)")
        lag_s = gauge("cdcd_lag_seconds", "Measured time from reading a change to the "
                      "target acknowledging it (incremental tasks, once measured)")
        retries = counter("cdcd_retries", "Reconnects after errors")
        errors = counter("cdcd_errors", "Errors the task's pipeline stopped on (each retry "
                         "and each failure counts)")
        resyncs = counter("cdcd_full_resyncs", "Snapshots redone (the source refused a "
                          "partial resync, the target lost data, an interrupted first "
                          "snapshot, or an operator's resync)")
        resets = counter("cdcd_target_resets", "Times the target was found not to hold what "
                         "the task had applied (restarted empty, flushed, rolled back)")
        evicted = counter("cdcd_target_evicted_keys", "Keys the target evicted while the "
                          "task watched it")
        drift = gauge("cdcd_verify_drift_keys", "Keys found different by the last "
                      "continuous_verify round")
        drift_total = counter("cdcd_verify_drift_keys_found", "Keys found different by "
                              "every continuous_verify round")
        shard_labels = ["task_id", "shard", "node"]
        shard_lag = GaugeMetricFamily("cdcd_shard_lag_bytes", "A cluster source's shard: "
                                      "its source offset minus its applied offset",
                                      labels=shard_labels)
        shard_applied = GaugeMetricFamily("cdcd_shard_applied_offset", "A cluster source's "
                                          "shard: the replication offset the target holds",
                                          labels=shard_labels)
        shard_resyncs = CounterMetricFamily("cdcd_shard_full_resyncs", "A cluster source's "
                                            "shard: its snapshots redone",
                                            labels=shard_labels)
        for task in list(self.manager.tasks.values()):
            tid = task.spec.task_id
            p = task.progress
            for s in STATES:
                state.add_metric([tid, s], 1.0 if task.state.value == s else 0.0)
            keys.add_metric([tid], p.keys_done)
            expected.add_metric([tid], max(p.keys_total, p.keys_done))
            skipped.add_metric([tid], p.keys_skipped)
            sbytes.add_metric([tid], p.snapshot_bytes)
            written.add_metric([tid], p.bytes_written)
            ops.add_metric([tid], p.ops_applied)
            retries.add_metric([tid], p.retries)
            errors.add_metric([tid], p.errors)
            resyncs.add_metric([tid], p.full_resyncs)
            resets.add_metric([tid], p.target_resets)
            evicted.add_metric([tid], p.target_evicted_keys)
            if task.spec.continuous_verify is not None:
                drift.add_metric([tid], p.verify_drift)
                drift_total.add_metric([tid], p.verify_drift_total)
            if task.spec.incremental:
                lag_b.add_metric([tid], max(0, p.source_offset - p.applied_offset))
                if p.lag_ms is not None:
                    lag_s.add_metric([tid], p.lag_ms / 1000.0)
            for st in list(task.shard_states.values()):
                v = st.view()
                labels = [tid, v["shard"], v["node"]]
                shard_lag.add_metric(labels, v["lag_bytes"])
                shard_applied.add_metric(labels, v["applied_offset"])
                shard_resyncs.add_metric(labels, v["full_resyncs"])
        yield from (state, keys, expected, skipped, sbytes, written, ops, lag_b, lag_s,
                    retries, errors, resyncs, resets, evicted, drift, drift_total,
                    shard_lag, shard_applied, shard_resyncs)
        verifications = GaugeMetricFamily("cdcd_verifications", "Verifications kept in "
                                          "memory, by state", labels=["state"])
        counts = self.manager.verifications.states()
        for s in VERIFICATION_STATES:
            verifications.add_metric([s], counts.get(s, 0))
        yield verifications


class StoreCollector(Collector):
    """Whether the metadata store can be written, and how many writes it refused."""

    def __init__(self, manager: Manager) -> None:
        self.manager = manager

    def collect(self) -> Iterator[Metric]:
        store = self.manager.store
        yield GaugeMetricFamily("cdcd_store_healthy", "1 when the last write of the "
                                "metadata store succeeded, 0 while it cannot be written "
                                "(disk full, read-only, I/O error)",
                                value=1.0 if store.healthy else 0.0)
        yield CounterMetricFamily("cdcd_store_write_errors", "Writes of the metadata store "
                                  "that failed (each retry counts)", value=store.write_errors)


class HttpCollector(Collector):
    """The build, and the API's connections against ``max_connections`` (the server
    reports them before each scrape with ``Metrics.observe_connections``)."""

    def __init__(self) -> None:
        self.connections = 0
        self.rejected = 0

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("cdcd_build_info", "Always 1; the labels say which cdcd "
                                 "and which Python run", labels=["version", "python"])
        info.add_metric([__version__, platform.python_version()], 1.0)
        yield info
        yield GaugeMetricFamily("cdcd_http_connections", "Open API connections counted "
                                "against max_connections", value=self.connections)
        yield CounterMetricFamily("cdcd_http_connections_rejected", "Connections answered "
                                  "503 and closed because max_connections were open",
                                  value=self.rejected)


class WithoutCreated(Collector):
    """Serve prometheus_client's own metric objects without their ``_created`` samples.

    prometheus_client adds a ``<name>_created`` gauge per counter and histogram child
    unless the process-global ``disable_created_metrics()`` (or its environment
    variable) says otherwise; filtering here keeps the choice on this daemon's registry.
    """

    def __init__(self, *collectors: Collector) -> None:
        self.collectors = collectors

    def collect(self) -> Iterable[Metric]:
        for collector in self.collectors:
            for family in collector.collect():
                family.samples = [s for s in family.samples
                                  if s.name != family.name + "_created"]
                yield family


class Metrics:
    """One registry per daemon (no process-global metric state)."""

    def __init__(self, manager: Manager) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("cdcd_api_requests", "API requests (POST /cdc and other "
                                "methods on /cdc) by request_type and HTTP status",
                                ["request_type", "code"], registry=None)
        self.latency = Histogram("cdcd_api_request_duration_seconds", "Time to answer an "
                                 "API request, body read included", ["request_type"],
                                 registry=None,
                                 buckets=(0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1, 5))
        self.http = HttpCollector()
        self.registry.register(WithoutCreated(self.requests, self.latency))
        self.registry.register(self.http)
        self.registry.register(TaskCollector(manager))
        self.registry.register(StoreCollector(manager))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)

    def observe_request(self, request_type: str, code: int, seconds: float) -> None:
        self.requests.labels(request_type, str(code)).inc()
        self.latency.labels(request_type).observe(seconds)

    def observe_connections(self, open_connections: int, rejected: int) -> None:
        self.http.connections = open_connections
        self.http.rejected = rejected

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
