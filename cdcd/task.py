"""One migration task: its state machine and its pipeline (reader -> queue -> writer)."""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import time
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime
from typing import Any

from .entry import Batch
from .errors import CdcdError, ConflictError, EndpointError, FatalTaskError, MigrationError
from .precheck import run_prechecks
from .progress import Progress
from .ratelimit import TokenBucket
from .readers.notify import NotificationFeed
from .readers.psync import PsyncReader, PsyncRefused, StreamPos, key_hash
from .readers.scan import ScanSnapshot
from .resp import Connection, ServerReplyError, keyspace, parse_info
from .spec import TaskSpec
from .writer import Writer

log = logging.getLogger("cdcd.task")

QUEUE_BATCHES = 8
CHECKPOINT_EVERY = 1.0
BACKOFF_START = 0.5
BACKOFF_MAX = 30.0


class State(enum.StrEnum):
    INITIAL = "Initial"
    RUNNING = "Running"
    PAUSED = "Paused"
    FAILED = "Failed"
    SUCCEEDED = "Succeeded"


# The allowed transitions, in one place.
TRANSITIONS: dict[State, frozenset[State]] = {
    State.INITIAL: frozenset({State.RUNNING, State.PAUSED, State.FAILED}),
    State.RUNNING: frozenset({State.PAUSED, State.FAILED, State.SUCCEEDED}),
    State.PAUSED: frozenset({State.RUNNING, State.INITIAL}),
    State.FAILED: frozenset({State.RUNNING, State.INITIAL, State.PAUSED}),
    State.SUCCEEDED: frozenset(),
}


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z"


PersistFn = Callable[["Task", bool], Awaitable[None]]


class Task:
    def __init__(self, spec: TaskSpec, persist: PersistFn, *, record: dict[str, Any] | None = None
                 ) -> None:
        rec = record or {}
        self.spec = spec
        self.persist_fn = persist
        self.state = State(rec.get("state", State.INITIAL.value))
        self.phase: str = rec.get("phase", "")
        self.reason: str = rec.get("reason", "")
        self.created_at: str = rec.get("created_at") or now_iso()
        self.updated_at: str = rec.get("updated_at") or self.created_at
        self.checkpoint: dict[str, Any] = rec.get("checkpoint") or {}
        self.progress = Progress.from_record(rec.get("progress") or {})
        self.runner: asyncio.Task[None] | None = None
        self.fallback: str = rec.get("fallback", "")   # why reader auto chose scan
        self.prechecks: list[dict[str, str]] = rec.get("prechecks", [])
        self._dirty = False

    # --- view and persistence ---------------------------------------------------------------

    def view(self) -> dict[str, Any]:
        return {
            "task_id": self.spec.task_id,
            "name": self.spec.name,
            "state": self.state.value,
            "phase": self.phase,
            "reason": self.reason,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "spec": self.spec.to_json(mask=True),
            "progress": self.progress.view(incremental=self.spec.incremental),
            "prechecks": self.prechecks,
        }

    def to_record(self) -> dict[str, Any]:
        return {
            "spec": self.spec.to_json(mask=False),
            "state": self.state.value,
            "phase": self.phase,
            "reason": self.reason,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "checkpoint": self.checkpoint,
            "progress": self.progress.to_record(),
            "fallback": self.fallback,
            "prechecks": self.prechecks,
        }

    async def persist(self, *, lazy: bool = False) -> None:
        """Save the task's record; ``lazy`` (periodic checkpoints) may share a write."""
        self._dirty = False
        await self.persist_fn(self, lazy)

    def set_state(self, state: State, *, reason: str = "", phase: str | None = None) -> None:
        if state != self.state and state not in TRANSITIONS[self.state]:
            raise ConflictError(f"task '{self.spec.task_id}' is {self.state.value}; "
                                f"it cannot become {state.value}")
        if state != self.state:
            log.info("task %s: %s -> %s%s", self.spec.task_id, self.state.value, state.value,
                     f" ({reason})" if reason else "")
        self.state = state
        self.reason = reason
        if phase is not None:
            self.phase = phase
        self.updated_at = now_iso()

    def set_phase(self, phase: str) -> None:
        if phase != self.phase:
            log.info("task %s: phase %s", self.spec.task_id, phase)
            self.phase = phase
            self.updated_at = now_iso()

    # --- lifecycle (called by the manager) ------------------------------------------------

    @property
    def running(self) -> bool:
        return self.runner is not None and not self.runner.done()

    def start(self) -> None:
        """Start (or restart) the pipeline; the manager owns and awaits the runner."""
        assert not self.running
        self.runner = asyncio.create_task(self._run(), name=f"cdcd-task-{self.spec.task_id}")

    async def stop(self) -> None:
        """Cancel the pipeline and wait for it; the checkpoint written last stays."""
        runner, self.runner = self.runner, None
        if runner is not None and not runner.done():
            runner.cancel()
            try:
                await runner
            except asyncio.CancelledError:
                if asyncio.current_task() and asyncio.current_task().cancelling():  # type: ignore[union-attr]
                    raise
        await self.persist()

    # --- the pipeline ---------------------------------------------------------------------

    async def _run(self) -> None:
        spec = self.spec
        try:
            if spec.start_at is not None:
                wait = (spec.start_at - datetime.now(UTC)).total_seconds()
                if wait > 0:
                    self.set_phase("scheduled")
                    log.info("task %s: waiting until %s (start_at)", spec.task_id,
                             spec.to_json(mask=True)["start_at"])
                    await self.persist()
                    await asyncio.sleep(wait)
            if self.state != State.RUNNING:
                self.set_state(State.RUNNING)
                await self.persist()
            await self._attempts()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug: fail this task, keep the daemon and the others
            log.exception("task %s: internal error", spec.task_id)
            self.set_state(State.FAILED, reason=f"internal error: {type(exc).__name__}: {exc}")
            await self.persist()

    async def _attempts(self) -> None:
        delay = BACKOFF_START
        while True:
            try:
                await self._pipeline()
                return
            except MigrationError as exc:
                self.progress.last_error = exc.message
                log.warning("task %s: %s", self.spec.task_id, exc.message)
                never_started = not self.checkpoint
                if (not exc.retryable or self.spec.resume_mode == "manual"
                        or (never_started and self.phase == "precheck")):
                    self.set_state(State.FAILED, reason=exc.message)
                    await self.persist()
                    return
                self.progress.retries += 1
                self.reason = f"retrying after: {exc.message}"
                await self.persist()
                wait = delay * (0.5 + random.random() / 2)
                log.info("task %s: retry %d in %.1f s", self.spec.task_id,
                         self.progress.retries, wait)
                await asyncio.sleep(wait)
                delay = min(delay * 2, BACKOFF_MAX)

    async def _pipeline(self) -> None:
        spec = self.spec
        self.set_phase("precheck")
        source = await Connection.open_endpoint(spec.source, role="source")
        try:
            target = await Connection.open_endpoint(spec.target, role="target")
        except BaseException:
            source.close()
            raise
        try:
            await self._precheck()
            reader = self.progress.reader or ("scan" if spec.reader == "scan" else "psync")
            self.progress.reader = reader
            if reader == "psync":
                try:
                    await self._run_psync(source, target)
                except PsyncRefused as exc:
                    if spec.reader != "auto" or self.checkpoint.get("stream"):
                        raise
                    log.warning("task %s: falling back to the scan reader: %s",
                                spec.task_id, exc.message)
                    self.progress.reader = reader = "scan"
                    self.fallback = f"reader auto fell back to scan: {exc.message}"
            if reader == "scan" and spec.incremental:
                await self._scan_incremental(source, target)
            elif reader == "scan" and not self.progress.snapshot_done:
                self.set_phase("snapshot")
                self.reason = self.fallback
                await self.persist()
                await self._scan_snapshot(source, target)
            self.set_state(State.SUCCEEDED, phase="done", reason=self.fallback)
            await self.persist()
        finally:
            source.close()
            target.close()

    async def _target_marker(self, target: Connection) -> StreamPos | None:
        """Read the checkpoint the target itself holds (written with every stream batch)."""
        await target.select(0)
        raw = await target.call("GET", self.marker_key)
        if not raw:
            return None
        try:
            replid, offset, db = raw.decode().split()
            return StreamPos(replid=replid, offset=int(offset), db=int(db))
        except ValueError:
            raise FatalTaskError(f"{target.name}: checkpoint key {self.marker_key.decode()} "
                                 f"holds {raw[:60]!r}, not a cdcd checkpoint") from None

    @property
    def marker_key(self) -> bytes:
        return f"cdcd:checkpoint:{self.spec.task_id}".encode()

    def _marker(self, checkpoint: Any) -> list[bytes] | None:
        if not isinstance(checkpoint, StreamPos):
            return None
        value = f"{checkpoint.replid} {checkpoint.offset} {checkpoint.db}".encode()
        return [b"SET", self.marker_key, value]

    async def _run_psync(self, source: Connection, target: Connection) -> None:
        spec = self.spec
        local = StreamPos.from_json(self.checkpoint.get("stream"))
        remote = await self._target_marker(target) if spec.incremental else None
        resume = local
        if remote is not None and (local is None or (remote.replid == local.replid and
                                                     remote.offset > local.offset)):
            # The target applied batches whose checkpoint the store did not get to keep.
            resume = remote
        if not spec.incremental:
            resume = None
        host, port = spec.source.addrs[0]
        queue: asyncio.Queue[Batch | None] = asyncio.Queue(maxsize=QUEUE_BATCHES)

        def on_full_sync(replid: str, offset: int) -> None:
            if resume is not None:
                self.progress.full_resyncs += 1
                self.reason = (f"source answered a full resync (offset {resume.offset + 1} of "
                               f"{resume.replid} no longer in its backlog); snapshot redone")
                log.warning("task %s: %s", spec.task_id, self.reason)
            p = self.progress
            p.keys_done = p.keys_total = p.snapshot_bytes = p.keys_skipped = 0
            p.snapshot_done = False
            self.set_phase("snapshot")

        def on_stream() -> None:
            self.set_phase("incremental")

        rdb_applied = asyncio.Event()

        async def after_rdb(seen: set[int] | None) -> None:
            await rdb_applied.wait()
            if seen is not None:
                removed = await remove_stale_keys(spec, seen, self.marker_key)
                log.info("task %s: resync removed %d target keys the source no longer has",
                         spec.task_id, removed)

        reader = PsyncReader(spec, self.progress, resume=resume, host=host, port=port,
                             rdb_only=not spec.incremental, on_full_sync=on_full_sync,
                             on_stream=on_stream, after_rdb=after_rdb)
        writer = Writer(target, progress=self.progress, replace=spec.existing_keys != "skip",
                        db_map=spec.target_db, limiter=self._limiter(),
                        marker=self._marker if spec.incremental else None)

        async def ack(batch: Batch) -> None:
            pos = batch.checkpoint
            if isinstance(pos, StreamPos):
                rdb_applied.set()
                reader.acked(pos)
                self.progress.applied_offset = pos.offset
                self.progress.source_offset = max(self.progress.source_offset, pos.offset)
                self.progress.snapshot_done = True
                self.checkpoint["stream"] = pos.to_json()
                self._dirty = True

        await run_pipeline(reader.run(queue), writer.run(queue, ack), self._checkpointer(),
                           self._poll_source(source, reader))
        self.progress.snapshot_done = True
        await self.persist()

    async def _poll_source(self, source: Connection, reader: PsyncReader) -> None:
        """Every second: sample the source's offset (so lag counts what we have not read
        yet) and publish a heartbeat that measures lag end to end."""
        beats = self.spec.incremental
        while True:
            info = parse_info(await source.call("INFO", "replication"))
            off = int(info.get("master_repl_offset", "0") or 0)
            self.progress.source_offset = max(self.progress.source_offset, off)
            if beats and self.phase == "incremental":
                try:
                    await source.call(*reader.heartbeat())
                except ServerReplyError as exc:
                    beats = False
                    log.warning("task %s: heartbeat PUBLISH refused (%s); lag_ms is then the "
                                "time from reading a change to applying it", self.spec.task_id,
                                exc.reply)
            await asyncio.sleep(1.0)

    def _limiter(self) -> TokenBucket | None:
        mb = self.spec.bandwidth_limit_mb
        return TokenBucket(mb * 1_000_000) if mb else None

    async def _precheck(self) -> None:
        """Run every check; errors stop the task, warnings are only shown."""
        fresh = not self.checkpoint
        checks = await run_prechecks(self.spec, fresh=fresh)
        self.prechecks = [c.to_json() for c in checks]
        bad = [c for c in checks if c.status == "error"]
        if not bad:
            return
        reason = "precheck failed: " + "; ".join(f"{c.name}: {c.message}" for c in bad)
        if fresh:
            raise FatalTaskError(reason)
        raise EndpointError(reason)   # data moved already: retry per resume_mode

    async def _scan_snapshot(self, source: Connection, target: Connection) -> None:
        spec = self.spec
        queue: asyncio.Queue[Batch | None] = asyncio.Queue(maxsize=QUEUE_BATCHES)
        writer = Writer(target, progress=self.progress, replace=spec.existing_keys != "skip",
                        db_map=spec.target_db, limiter=self._limiter())
        reader = ScanSnapshot(source, spec, self.progress, self.checkpoint.get("snapshot"))
        await run_pipeline(reader.run(queue), writer.run(queue, self._ack_snapshot),
                           self._checkpointer())
        self.progress.snapshot_done = True
        self.checkpoint["snapshot"] = {"done": True}
        await self.persist()

    async def _scan_incremental(self, source: Connection, target: Connection) -> None:
        """SCAN snapshot, then follow keyspace notifications (best effort, never ends).

        Notifications sent while disconnected are lost, so every (re)start redoes the
        snapshot from the beginning.
        """
        spec = self.spec
        p = self.progress
        p.keys_done = p.keys_total = p.snapshot_bytes = p.keys_skipped = 0
        p.snapshot_done = False
        self.checkpoint.pop("snapshot", None)
        self.set_phase("snapshot")
        self.reason = (self.fallback + "; " if self.fallback else "") + \
            "incremental changes come from keyspace notifications (best effort)"
        await self.persist()
        feed = NotificationFeed(spec, p)
        await feed.subscribe()
        queue: asyncio.Queue[Batch | None] = asyncio.Queue(maxsize=QUEUE_BATCHES)
        writer = Writer(target, progress=p, replace=spec.existing_keys != "skip",
                        db_map=spec.target_db, limiter=self._limiter())
        scan = ScanSnapshot(source, spec, p, None)

        async def produce() -> None:
            await scan.run(queue, end=False)
            p.snapshot_done = True
            self.set_phase("incremental")
            feed.snapshot_done.set()
            await feed.run(queue)

        async def ack(batch: Batch) -> None:
            mark = batch.checkpoint
            if isinstance(mark, tuple) and mark[0] == "notify":
                p.lag_ms = (time.monotonic() - mark[1]) * 1000

        try:
            await run_pipeline(produce(), writer.run(queue, ack), feed.listen(),
                               self._checkpointer())
        finally:
            if feed.sub is not None:
                feed.sub.close()

    async def _ack_snapshot(self, batch: Batch) -> None:
        self.checkpoint["snapshot"] = batch.checkpoint
        self._dirty = True

    async def _checkpointer(self) -> None:
        """Persist the latest acknowledged checkpoint about once a second."""
        while True:
            await asyncio.sleep(CHECKPOINT_EVERY)
            self.progress.sample()
            if self._dirty:
                self.progress.last_checkpoint_at = now_iso()
                await self.persist(lazy=True)


async def remove_stale_keys(spec: TaskSpec, seen: set[int], marker: bytes) -> int:
    """Delete target keys of the task's dbs and filter that a resync RDB no longer holds.

    A full resync re-copies every key but cannot see deletions that happened while the
    link was down; without this the target would keep them.
    """
    flt = spec.filter
    candidates = set(flt.dbs) if flt.dbs is not None else set(range(16)) | set(spec.db_mapping)
    conn = await Connection.open_endpoint(spec.target, role="target")
    removed = 0
    try:
        held = keyspace(parse_info(await conn.call("INFO", "keyspace")))
        for tdb in sorted(held):
            sources = [d for d in candidates if spec.target_db(d) == tdb]
            if not sources:
                continue
            await conn.select(tdb)
            cursor = b"0"
            while True:
                cursor, keys = await conn.call("SCAN", cursor, "COUNT", 1000)
                stale = [k for k in keys if flt.key_ok(k) and k != marker and
                         not any(key_hash(d, k) in seen for d in sources)]
                if stale:
                    removed += await conn.call("UNLINK", *stale)
                if cursor == b"0":
                    break
    finally:
        conn.close()
    return removed


async def run_pipeline(*parts: Coroutine[Any, Any, None]) -> None:
    """Run the parts together until the first two (reader, writer) finish; re-raise the
    first failure as itself, not as an ExceptionGroup."""
    main = list(parts[:2])
    background = list(parts[2:])
    try:
        async with asyncio.TaskGroup() as tg:
            mains = [tg.create_task(p) for p in main]
            extra = [tg.create_task(p) for p in background]
            await asyncio.wait(mains, return_when=asyncio.ALL_COMPLETED)
            for t in extra:
                t.cancel()
    except BaseExceptionGroup as eg:
        raise first_error(eg) from None


def first_error(eg: BaseExceptionGroup[BaseException]) -> BaseException:
    """Pick the error that explains a pipeline failure: ours first, then anything else."""
    flat: list[BaseException] = []
    stack: list[BaseException] = [eg]
    while stack:
        e = stack.pop()
        if isinstance(e, BaseExceptionGroup):
            stack.extend(reversed(e.exceptions))
        else:
            flat.append(e)
    for e in flat:
        if isinstance(e, CdcdError):
            return e
    for e in flat:
        if isinstance(e, (ConnectionError, OSError)):
            return EndpointError(f"connection error: {e}")
    return flat[0]
