"""Verifications started over the API: parse a ``verify`` request, run each comparison in
the background, and keep a bounded number of finished ones for ``get``.

They live in memory only: a daemon restart forgets them (a running one is cancelled at
shutdown and awaited, like every other asyncio task the daemon starts).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import ConflictError, NotFoundError, RequestError
from .markers import CDCD_PREFIXES
from .spec import Filter, TaskSpec, parse_spec
from .verify import Recheck, Verification

if TYPE_CHECKING:
    from .task import Task

log = logging.getLogger("cdcd.verifications")

KEEP_FINISHED = 100        # finished verifications kept for ``get``; the oldest go first
MAX_RUNNING = 10           # verifications running at once (each holds a source connection
                           # and one per target master)
RECHECK_DELAY = 2.0        # seconds before keys found different on a live task are rechecked
RECHECK_MAX_WAIT = 30.0    # the longest wait for a live task to catch up before the recheck
STOP_TIMEOUT = 10.0        # how long shutdown waits for a cancelled verification

ENDPOINT_FIELDS = ("source", "target", "filter", "db_mapping")
OPTION_FIELDS = ("sample", "examples", "ttl_tolerance_ms", "keys_per_sec")
FINISHED = ("done", "failed", "cancelled")


class VerificationNotFound(NotFoundError):
    error = "verification_not_found"


def _int(data: dict[str, Any], key: str, default: int | None, low: int, high: int
         ) -> int | None:
    value = data.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RequestError(f"request_data.{key}: must be an integer {low}..{high}")
    return value


def _rate(data: dict[str, Any], key: str, default: float) -> float:
    value = data.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not 0 < value <= 10_000_000:
        raise RequestError(f"request_data.{key}: must be a number above 0, at most 10000000")
    return float(value)


def checkpoint_excluded(spec: TaskSpec) -> TaskSpec:
    """Leave cdcd's own keys on the target (markers, big keys being rebuilt) out of the
    comparison."""
    flt = spec.filter
    return dataclasses.replace(spec, filter=Filter(
        dbs=flt.dbs, include_prefixes=flt.include_prefixes,
        exclude_prefixes=(*flt.exclude_prefixes, *CDCD_PREFIXES)))


def caught_up(task: Task) -> Recheck:
    """Wait until a live task has applied what the source had written a moment ago.

    Keys found different on a Running incremental task are compared once more after this,
    so changes still in flight are not reported as differences.
    """
    async def wait() -> None:
        p = task.progress
        delay = RECHECK_DELAY
        if p.lag_ms is not None:
            delay = max(delay, min(RECHECK_MAX_WAIT, 2 * p.lag_ms / 1000))
        await asyncio.sleep(delay)
        want = p.source_offset
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RECHECK_MAX_WAIT
        while p.applied_offset < want and task.running and loop.time() < deadline:
            await asyncio.sleep(0.1)
    return wait


def parse_verify(data: dict[str, Any], get_task: Callable[[Any], Task]) -> Verification:
    """Turn a ``verify`` request's data into a Verification (not started yet)."""
    for key in data:
        if key not in ("task_id", *ENDPOINT_FIELDS, *OPTION_FIELDS):
            raise RequestError(f"request_data.{key}: unknown field")
    options: dict[str, Any] = {
        "sample": _int(data, "sample", None, 1, 100_000_000),
        "examples": _int(data, "examples", 10, 0, 1000),
        "ttl_tolerance_ms": _int(data, "ttl_tolerance_ms", 2000, 0, 86_400_000),
        "keys_per_sec": _rate(data, "keys_per_sec", 20_000),
    }
    recheck: Recheck | None = None
    if "task_id" in data:
        for key in ENDPOINT_FIELDS:
            if key in data:
                raise RequestError(f"request_data.{key}: not allowed with task_id (the task's "
                                   f"own endpoints, filter and db_mapping are used)")
        task = get_task(data["task_id"])
        spec = checkpoint_excluded(task.spec)
        if task.spec.incremental and task.state.value == "Running":
            recheck = caught_up(task)
    elif "source" in data or "target" in data:
        spec = parse_spec({k: data[k] for k in ENDPOINT_FIELDS if k in data})
        spec = dataclasses.replace(spec, task_id="")
    else:
        raise RequestError("request_data.task_id: required, or request_data.source and "
                           "request_data.target")
    if spec.source.rdb_file:
        raise RequestError(f"request_data.{'task_id' if 'task_id' in data else 'source'}: "
                           f"the source is an RDB file, not a server: there is nothing to "
                           f"compare the target with")
    v = Verification(spec, recheck=recheck, recheck_delay=RECHECK_DELAY if recheck else 0.0,
                     **options)
    if not spec.task_id:
        v.progress["task_id"] = None
    return v


@dataclass(kw_only=True)
class _Run:
    verification: Verification
    runner: asyncio.Task[dict[str, Any]]

    def view(self) -> dict[str, Any]:
        out = self.verification.to_json()
        spec = self.verification.spec
        out["source"] = spec.source.display
        out["target"] = spec.target.display
        return out


class Verifications:
    """Own every verification's asyncio task: start it, answer ``get``, cancel and await it."""

    def __init__(self, *, keep: int = KEEP_FINISHED, max_running: int = MAX_RUNNING) -> None:
        self.keep = keep
        self.max_running = max_running
        self._runs: dict[str, _Run] = {}   # in start order
        self._stopping = False

    def running(self) -> int:
        return sum(not r.runner.done() for r in self._runs.values())

    def states(self) -> dict[str, int]:
        """Count verifications by state (for /metrics)."""
        out: dict[str, int] = {}
        for r in self._runs.values():
            state = r.verification.progress["state"]
            out[state] = out.get(state, 0) + 1
        return out

    def start(self, v: Verification) -> Verification:
        if self._stopping:
            raise ConflictError("the daemon is shutting down")
        if self.running() >= self.max_running:
            raise ConflictError(f"{self.max_running} verifications are running already; "
                                f"wait for one to finish or delete one")
        runner = asyncio.create_task(v.run(), name=f"cdcd-verify-{v.id}")
        self._runs[v.id] = _Run(verification=v, runner=runner)
        runner.add_done_callback(self._finished)
        self._prune()
        task = v.progress["task_id"]
        log.info("verification %s: started (%s, %s -> %s%s)", v.id,
                 "full" if v.sample is None else f"sample of {v.sample}",
                 v.spec.source.display, v.spec.target.display,
                 f", task {task}" if task else "")
        return v

    def _finished(self, runner: asyncio.Task[dict[str, Any]]) -> None:
        vid = runner.get_name().removeprefix("cdcd-verify-")
        run = self._runs.get(vid)
        task = run.verification.progress["task_id"] if run is not None else None
        of = f" (task {task})" if task else ""
        if runner.cancelled():
            log.info("verification %s%s: cancelled", vid, of)
        elif (exc := runner.exception()) is not None:   # run() records errors; a bug
            log.error("verification %s%s: ended with %s: %s", vid, of, type(exc).__name__, exc)
        else:
            p = runner.result()
            result = p.get("result") or {}
            if p["state"] == "done":
                log.info("verification %s%s: done, %d differences in %d keys", vid, of,
                         result.get("differences", 0), result.get("keys_checked", 0))
            else:
                log.info("verification %s%s: %s%s", vid, of, p["state"],
                         f" ({p['error']})" if p.get("error") else "")
        self._prune()

    def _prune(self) -> None:
        finished = [vid for vid, r in self._runs.items() if r.runner.done()]
        for vid in finished[:max(0, len(finished) - self.keep)]:
            del self._runs[vid]

    def get(self, verification_id: Any) -> _Run:
        if not isinstance(verification_id, str) or not verification_id:
            raise RequestError("request_data.verification_id: required (a string)")
        run = self._runs.get(verification_id)
        if run is None:
            raise VerificationNotFound(f"verification '{verification_id}' does not exist "
                                       f"(finished ones are kept until {self.keep} newer "
                                       f"ones finish, and not across daemon restarts)")
        return run

    async def delete(self, verification_id: Any, ignore_not_found: bool = False) -> str:
        """Cancel a verification (when still running), wait for it, and forget it."""
        try:
            run = self.get(verification_id)
        except VerificationNotFound:
            if ignore_not_found:
                return str(verification_id)
            raise
        run.verification.cancel()
        await asyncio.wait([run.runner])
        self._runs.pop(run.verification.id, None)
        log.info("verification %s: deleted", run.verification.id)
        return run.verification.id

    async def stop(self) -> None:
        """Cancel every running verification and wait for each (bounded)."""
        self._stopping = True
        runners = [r.runner for r in self._runs.values() if not r.runner.done()]
        for r in self._runs.values():
            r.verification.cancel()
        if not runners:
            return
        _, pending = await asyncio.wait(runners, timeout=STOP_TIMEOUT)
        for runner in pending:
            log.error("%s: did not stop within %g s", runner.get_name(), STOP_TIMEOUT)
