"""Counters a task's pipeline updates and the task view reports."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

NOT_WRITTEN_LISTED = 100


@dataclass(kw_only=True)
class Progress:
    keys_total: int = 0
    keys_done: int = 0
    keys_skipped: int = 0
    snapshot_bytes: int = 0
    snapshot_done: bool = False
    source_offset: int = 0
    applied_offset: int = 0
    lag_ms: float | None = None
    ops_applied: int = 0
    bytes_written: int = 0
    retries: int = 0
    full_resyncs: int = 0
    target_resets: int = 0   # times the target was found not to hold what we had applied
    target_evicted_keys: int = 0   # keys the target evicted while the task ran
    target_policy: str = ""  # the target's maxmemory-policy, as last seen
    errors: int = 0          # errors recorded in last_error (counted by its setter, below)
    last_error: str = ""
    last_error_at: str = ""
    status: str = ""         # what the phase is doing now (e.g. waiting for the source's RDB)
    snapshot_started: float = 0.0   # monotonic time the current snapshot began (for the ETA)
    verify_runs: int = 0     # continuous_verify: rounds done, and what the last one found
    verify_sampled: int = 0
    verify_drift: int = 0
    verify_drift_total: int = 0
    verify_last_at: str = ""
    verify_last_error: str = ""
    last_checkpoint_at: str = ""
    reader: str = ""
    file_bytes_read: int = 0     # an rdb_file source: bytes read of the file's size
    file_bytes_total: int = 0
    # Keys left out on purpose (modules: skip): how many, and the first NOT_WRITTEN_LISTED.
    not_written: int = 0
    not_written_keys: list[str] = field(default_factory=list)
    _rate: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=64))

    def sample(self) -> None:
        """Record (time, work done) so ops_per_sec covers the last few seconds."""
        self._rate.append((time.monotonic(), self.keys_done + self.ops_applied))

    def ops_per_sec(self) -> float:
        """Work per second over the last few seconds; 0 at once for a stopped or idle task.

        The pipeline samples about once a second: a last sample older than ~2 s means it
        stopped (finished, paused, failed), and an unmoved counter across the last two
        samples means it is idle; either reads 0 rather than a rate decaying for 10 s.
        """
        now = time.monotonic()
        rate = self._rate
        if len(rate) < 2 or now - rate[-1][0] > 2.5 or rate[-1][1] == rate[-2][1]:
            return 0.0
        pts = [p for p in rate if now - p[0] <= 10]
        if len(pts) < 2 or pts[-1][0] - pts[0][0] <= 0:
            return 0.0
        return round((pts[-1][1] - pts[0][1]) / (pts[-1][0] - pts[0][0]), 1)

    def view(self, *, incremental: bool) -> dict[str, Any]:
        total = max(self.keys_total, self.keys_done)
        if self.snapshot_done:
            percent = 100.0
        elif self.file_bytes_total:     # a file: its keys are counted as they come
            percent = round(min(99.9, 100.0 * self.file_bytes_read / self.file_bytes_total), 1)
        elif total:
            percent = round(min(99.9, 100.0 * self.keys_done / total), 1)
        else:
            percent = 0.0
        eta: float | None = None
        if not self.snapshot_done and self.keys_total and self.snapshot_started:
            elapsed = time.monotonic() - self.snapshot_started
            if self.keys_done and elapsed > 0:
                rate = self.keys_done / elapsed
                eta = round(max(0.0, self.keys_total - self.keys_done) / rate, 1)
        out: dict[str, Any] = {
            "snapshot": {"keys_total": total, "keys_done": self.keys_done,
                         "keys_skipped": self.keys_skipped, "bytes": self.snapshot_bytes,
                         "percent": percent, "eta_s": eta,
                         **({"not_written": {"count": self.not_written,
                                             "keys": self.not_written_keys}}
                            if self.not_written else {}),
                         **({"file_bytes_read": self.file_bytes_read,
                             "file_bytes_total": self.file_bytes_total}
                            if self.file_bytes_total else {})},
            "status": self.status,
            "ops_per_sec": self.ops_per_sec(),
            "bytes_written": self.bytes_written,
            "retries": self.retries,
            "errors": self.errors,
            "full_resyncs": self.full_resyncs,
            "target_resets": self.target_resets,
            "target_eviction": {"evicted_keys": self.target_evicted_keys,
                                "maxmemory_policy": self.target_policy},
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
            "last_checkpoint_at": self.last_checkpoint_at,
            "reader": self.reader,
        }
        if incremental:
            lag = max(0, self.source_offset - self.applied_offset)
            out["incremental"] = {
                "source_offset": self.source_offset, "applied_offset": self.applied_offset,
                "lag_bytes": lag,
                "lag_ms": None if self.lag_ms is None else round(self.lag_ms, 1),
                "ops_applied": self.ops_applied,
            }
        return out

    def to_record(self) -> dict[str, Any]:
        return {"keys_total": self.keys_total, "keys_done": self.keys_done,
                "keys_skipped": self.keys_skipped, "snapshot_bytes": self.snapshot_bytes,
                "snapshot_done": self.snapshot_done, "ops_applied": self.ops_applied,
                "bytes_written": self.bytes_written, "retries": self.retries,
                "full_resyncs": self.full_resyncs, "errors": self.errors,
                "target_resets": self.target_resets,
                "target_evicted_keys": self.target_evicted_keys,
                "verify_runs": self.verify_runs, "verify_drift_total": self.verify_drift_total,
                "last_error": self.last_error, "last_error_at": self.last_error_at,
                "applied_offset": self.applied_offset,
                "last_checkpoint_at": self.last_checkpoint_at, "reader": self.reader,
                "file_bytes_read": self.file_bytes_read,
                "file_bytes_total": self.file_bytes_total,
                "not_written": self.not_written, "not_written_keys": self.not_written_keys}

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> Progress:
        known = {k: v for k, v in rec.items() if k in cls.__dataclass_fields__ and
                 not k.startswith("_")}
        return cls(**known)

    def verify_view(self) -> dict[str, Any]:
        """continuous_verify's figures: rounds, the last round's sample and drift."""
        return {"runs": self.verify_runs, "last_at": self.verify_last_at,
                "sampled": self.verify_sampled, "drift": self.verify_drift,
                "drift_total": self.verify_drift_total, "last_error": self.verify_last_error}

    def not_written_key(self, what: str) -> None:
        """A key left out on purpose (what and why): counted as skipped, and listed."""
        self.keys_skipped += 1
        self.not_written += 1
        if len(self.not_written_keys) < NOT_WRITTEN_LISTED:
            self.not_written_keys.append(what)

    def begin_snapshot(self, keys_total: int = 0) -> None:
        """Reset the snapshot counters for a new (or redone) snapshot."""
        self.not_written = 0
        self.not_written_keys = []
        self.keys_done = self.keys_skipped = self.snapshot_bytes = 0
        self.keys_total = keys_total
        self.snapshot_done = False
        self.snapshot_started = time.monotonic()


def _get_last_error(self: Progress) -> str:
    return str(self.__dict__.get("_last_error", ""))


def _set_last_error(self: Progress, value: str) -> None:
    # Count every error the pipeline records, so /metrics has a per-task error counter
    # without each place that sets last_error keeping a second field in step. The first
    # assignment (in __init__, restoring a record) is not an error seen now. A property
    # rather than __setattr__, so the hot counters (keys_done, ...) stay plain attributes.
    if value and "_last_error" in self.__dict__:
        self.errors += 1
    self.__dict__["_last_error"] = value


Progress.last_error = property(_get_last_error, _set_last_error)  # type: ignore[assignment]
