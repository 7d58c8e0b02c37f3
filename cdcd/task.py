"""One migration task: its state machine and its pipeline (reader -> queue -> writer)."""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import random
import time
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime
from typing import Any

from . import sentinel
from .compat import RESTORE_PLAN, WritePlan, choose_write_mode, server_version
from .entry import Batch
from .errors import (
    CdcdError,
    ConflictError,
    EndpointError,
    FatalTaskError,
    MigrationError,
    StoreError,
    TopologyChanged,
)
from .identity import find_conflict, same_server
from .markers import Markers, SlotMarkers, Verdict, choose_db, is_cdcd_key, slot_tags
from .precheck import PREFIX_SCAN_LIMIT, Check, run_prechecks
from .progress import Progress
from .ratelimit import TokenBucket
from .readers.notify import NotificationFeed
from .readers.psync import PsyncReader, PsyncRefused, StreamPos, key_hash
from .readers.rdbfile import RdbFileError, RdbFileReader
from .readers.rdbfile import inspect as inspect_rdb_file
from .readers.scan import ScanSnapshot
from .resp import Arg, Connection, ReplyError, ServerReplyError, keyspace, parse_info
from .router import ClusterRouter
from .scope import in_scope, writes_db
from .spec import TaskSpec
from .topology import HostMapping, Topology, check_reachable, discover, is_cluster
from .verify import Verification
from .writer import Writer

log = logging.getLogger("cdcd.task")

QUEUE_BATCHES = 8
CHECKPOINT_EVERY = 1.0
BACKOFF_START = 0.5
BACKOFF_MAX = 30.0
HEALTHY_RUN = 60.0         # an attempt that ran this long resets the backoff
TOPOLOGY_RETRY = 0.2       # seconds before going on after MOVED/ASK
WATCH_EVERY = 5.0          # seconds between looks at the target (eviction, liveness)
POLICY_EVERY = 12          # looks between reads of its maxmemory-policy (INFO memory)
MAX_TEXT = 2000            # reason / last_error are cut to this many characters


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
    State.SUCCEEDED: frozenset({State.RUNNING}),   # only by an operator's resync
}


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z"


PersistFn = Callable[["Task", bool], Awaitable[None]]
PeersFn = Callable[[], list["Task"]]


def _cut(text: str) -> str:
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT] + "..."


class Task:
    def __init__(self, spec: TaskSpec, persist: PersistFn, *, record: dict[str, Any] | None = None,
                 peers: PeersFn = lambda: []) -> None:
        rec = record or {}
        self.spec = spec
        self.persist_fn = persist
        self.peers = peers          # the daemon's other tasks (shared-target rules)
        # The target server's identity, learned at every connect (same server, two names).
        self.target_run_id: str | None = rec.get("target_run_id")
        self.state = State(rec.get("state", State.INITIAL.value))
        self.phase: str = rec.get("phase", "")
        self.reason: str = rec.get("reason", "")
        self.created_at: str = rec.get("created_at") or now_iso()
        self.updated_at: str = rec.get("updated_at") or self.created_at
        self.checkpoint: dict[str, Any] = rec.get("checkpoint") or {}
        self.markers = Markers(spec.task_id, int(self.checkpoint.get("marker_db", 0)))
        self.slot_markers = SlotMarkers(spec.task_id)     # a cluster target's
        self.progress = Progress.from_record(rec.get("progress") or {})
        self.runner: asyncio.Task[None] | None = None
        self.fallback: str = rec.get("fallback", "")   # why reader auto chose scan
        self.prechecks: list[dict[str, str]] = rec.get("prechecks", [])
        # How snapshot values are written (cdcd.compat), chosen at every start.
        self.plan: WritePlan = RESTORE_PLAN
        self.write_mode: dict[str, str] | None = rec.get("write_mode")
        # What Running shows in ``reason`` when healthy: the reader fallback, the cause of
        # the last resync or target loss. A retry shows "retrying after: ..." until healthy.
        self.note: str = rec.get("note", self.reason if self.state == State.RUNNING and
                                 not self.reason.startswith("retrying") else "")
        self._dirty = False
        self.topology: Topology | None = None    # a cluster target's shape, else None
        self.shard_states: dict[str, Any] = {}    # a cluster source's shards (shards.py)
        # A cluster source's streams are forwarded raw into a standalone target unless a
        # transaction had to wait for another shard (shards.py): then parsed from then on.
        self.parse_shards = False
        mb = spec.bandwidth_limit_mb
        # One bucket for every pipeline of the task, re-rated in place by ``update``.
        self.bandwidth = TokenBucket(mb * 1_000_000 if mb else None)
        self._closers: list[Callable[[], None]] = []

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
            "progress": self._progress_view(),
            "prechecks": self.prechecks,
            "write_mode": self.write_mode,
            "markers": ([] if not self.spec.incremental else self.slot_markers.keys
                        if self.topology is not None else self.markers.keys),
            "target_topology": self.topology.view() if self.topology is not None else None,
        }

    def _progress_view(self) -> dict[str, Any]:
        out = self.progress.view(incremental=self.spec.incremental)
        if self.shard_states:
            out["shards"] = [st.view() for st in self.shard_states.values()]
        if self.spec.continuous_verify is not None:
            out["continuous_verify"] = self.progress.verify_view()
        return out

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
            "write_mode": self.write_mode,
            "note": self.note,
            "target_run_id": self.target_run_id,
        }

    async def persist(self, *, lazy: bool = False) -> None:
        """Save the task's record; ``lazy`` (periodic checkpoints) may share a write.

        Raises StoreError when the store cannot be written: an outage of this task.
        """
        self._dirty = False
        try:
            await self.persist_fn(self, lazy)
        except StoreError:
            self._dirty = True
            raise

    async def persist_quietly(self) -> None:
        """Save the record where a failure must not mask what is being reported (an error
        path, a stop): the record stays in the store's memory and is written as soon as
        the disk takes it."""
        try:
            await self.persist()
        except StoreError as exc:
            log.error("task %s: %s", self.spec.task_id, exc.message)

    def record_error(self, message: str) -> None:
        self.progress.last_error = _cut(message)
        self.progress.last_error_at = now_iso()

    def set_note(self, note: str) -> None:
        """Say something the operator should know (a resync and why); shown in reason."""
        self.note = _cut(note)
        if self.state == State.RUNNING:
            self.reason = self.note
        log.warning("task %s: %s", self.spec.task_id, note)

    async def purge_markers(self) -> int:
        """Remove the task's marker keys from the target (the task must be stopped)."""
        target = await sentinel.resolve(self.spec.target, "target")
        conn = await Connection.open_endpoint(target, role="target",
                                              io_timeout=float(self.spec.link_timeout_s))
        try:
            if len(target.addrs) == 1 and not await is_cluster(conn):
                return await self.markers.purge(conn)
        finally:
            conn.close()
        topology = await discover(self.spec.target, HostMapping(self.spec.target.host_mapping),
                                  role="target")
        conns: list[Connection] = []
        try:
            for node in topology.masters:
                conns.append(await Connection.open(*node.dial, role="target",
                                                   ep=self.spec.target,
                                                   io_timeout=float(self.spec.link_timeout_s)))
            return await self.slot_markers.purge(conns)
        finally:
            for c in conns:
                c.close()

    def request_resync(self, why: str) -> None:
        """Make the next start redo the snapshot (kept in the checkpoint across crashes)."""
        self.checkpoint["resync"] = why
        self.progress.snapshot_done = False

    def healthy(self) -> None:
        """The pipeline works again after a retry: ``reason`` stops saying 'retrying'."""
        if self.reason != self.note and self.state == State.RUNNING:
            self.reason = self.note
            self.updated_at = now_iso()
            self._dirty = True

    def set_state(self, state: State, *, reason: str = "", phase: str | None = None) -> None:
        if state != self.state and state not in TRANSITIONS[self.state]:
            raise ConflictError(f"task '{self.spec.task_id}' is {self.state.value}; "
                                f"it cannot become {state.value}")
        if state != self.state:
            log.info("task %s: %s -> %s%s", self.spec.task_id, self.state.value, state.value,
                     f" ({reason})" if reason else "")
        self.state = state
        self.reason = _cut(reason)
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
        await self.persist_quietly()

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
                    await self.persist_quietly()
                    await asyncio.sleep(wait)
            if self.state != State.RUNNING:
                self.set_state(State.RUNNING, reason=self.note)
                await self.persist_quietly()
            await self._attempts()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug: fail this task, keep the daemon and the others
            log.exception("task %s: internal error", spec.task_id)
            self.set_state(State.FAILED, reason=f"internal error: {type(exc).__name__}: {exc}")
            await self.persist_quietly()

    async def _attempts(self) -> None:
        delay = BACKOFF_START
        while True:
            began = time.monotonic()
            try:
                await self._pipeline()
                return
            except MigrationError as exc:
                if time.monotonic() - began > HEALTHY_RUN:
                    delay = BACKOFF_START      # it ran well for a while: a new outage
                self.record_error(exc.message)
                log.warning("task %s: %s", self.spec.task_id, exc.message)
                if (not exc.retryable or self.spec.resume_mode == "manual"
                        or (self.fresh and self.phase == "precheck"
                            and not isinstance(exc, StoreError))):
                    self.set_state(State.FAILED, reason=exc.message)
                    await self.persist_quietly()
                    return
                self.progress.retries += 1
                self.reason = _cut(f"retrying after: {exc.message}")
                self.updated_at = now_iso()
                await self.persist_quietly()
                wait = delay * (0.5 + random.random() / 2)
                if isinstance(exc, TopologyChanged):
                    wait = TOPOLOGY_RETRY      # a resharding: go on with the new shape now
                else:
                    delay = min(delay * 2, BACKOFF_MAX)
                log.info("task %s: retry %d in %.1f s", self.spec.task_id,
                         self.progress.retries, wait)
                await asyncio.sleep(wait)

    @property
    def fresh(self) -> bool:
        """No data was written to the target yet (existing keys are the operator's)."""
        return not self.checkpoint

    async def _pipeline(self) -> None:
        self.set_phase("precheck")
        self.progress.status = ""
        await self.persist()    # the store must take our records before any data moves
        # A Sentinel-managed side: its master's address now (stored specs keep the sentinel)
        self.spec = spec = await sentinel.resolve_spec(self.spec)
        if spec.source.rdb_file:
            await self._run_rdb_file()
            return
        source = await Connection.open_endpoint(spec.source, role="source")
        try:
            target = await Connection.open_endpoint(spec.target, role="target",
                                                    io_timeout=float(spec.link_timeout_s))
        except BaseException:
            source.close()
            raise
        try:
            await self._precheck()
            await self._plan_writes(source, target)
            await self._learn_topology(target)
            restarted = await self._start_writing(source, target)
            reader = self.progress.reader or ("scan" if spec.reader == "scan" else "psync")
            self.progress.reader = reader
            source_topology = await self._source_topology(source)
            if source_topology is not None:
                await self._run_cluster_source(source_topology, target, restarted)
                reader = ""
            if reader == "psync":
                try:
                    await self._run_psync(source, target, restarted)
                except PsyncRefused as exc:
                    if spec.reader != "auto" or self.checkpoint.get("stream"):
                        raise
                    log.warning("task %s: falling back to the scan reader: %s",
                                spec.task_id, exc.message)
                    self.progress.reader = reader = "scan"
                    self.fallback = f"reader auto fell back to scan: {exc.message}"
                    self.note = self.fallback
            if reader == "scan" and spec.incremental:
                await self._scan_incremental(source, target)
            elif reader == "scan" and not self.progress.snapshot_done:
                self.set_phase("snapshot")
                self.reason = self.note
                await self.persist()
                await self._scan_snapshot(source, target)
            self.set_state(State.SUCCEEDED, phase="done", reason=self.note)
            self.progress.status = ""
            await self.persist()
        finally:
            source.close()
            target.close()
            while self._closers:
                self._closers.pop()()

    def parse_shards_from_now_on(self) -> None:
        self.parse_shards = True

    async def _run_cluster_source(self, topology: Topology, target: Connection,
                                  restarted: bool) -> None:
        """A Redis Cluster source: a psync link per master; a full copy with SCAN where
        asked (``reader: scan``) or where the masters refuse PSYNC (``reader: auto``)."""
        from .shards import run_sharded, run_sharded_scan
        spec = self.spec
        if self.progress.reader == "psync":
            try:
                await run_sharded(self, topology, target, restarted)
                return
            except PsyncRefused as exc:
                if spec.reader != "auto" or self.checkpoint.get("shards"):
                    raise
                log.warning("task %s: falling back to the scan reader: %s", spec.task_id,
                            exc.message)
                self.progress.reader = "scan"
                self.fallback = f"reader auto fell back to scan: {exc.message}"
                self.note = self.fallback
        await run_sharded_scan(self, topology, target)

    async def _plan_writes(self, source: Connection, target: Connection) -> None:
        """Choose how values are written (write_mode auto: RESTORE where the target
        accepts the source's DUMP payloads, else commands) and show it in the view."""
        src = server_version(parse_info(await source.call("INFO", "server")))
        dst = server_version(parse_info(await target.call("INFO", "server")))
        plan, error = choose_write_mode(self.spec.write_mode, f"source {src.label}", src.rdb,
                                        dst)
        if error:
            raise FatalTaskError(error)
        self.plan = dataclasses.replace(plan, source=src)
        self.write_mode = plan.to_json()

    async def _run_rdb_file(self) -> None:
        """Copy a backup file (source rdb_file) once: its RDB through the psync reader's
        path, from the start again after any interruption (it replaces what it wrote)."""
        spec = self.spec
        target = await Connection.open_endpoint(spec.target, role="target",
                                                io_timeout=float(spec.link_timeout_s))
        try:
            await self._precheck()
            try:
                info = await asyncio.to_thread(inspect_rdb_file, spec.source.rdb_file)
            except RdbFileError as exc:
                raise FatalTaskError(f"source: {exc}") from None
            dst = server_version(parse_info(await target.call("INFO", "server")))
            plan, error = choose_write_mode(spec.write_mode, info.label, info.version, dst)
            if error:
                raise FatalTaskError(error)
            self.plan, self.write_mode = plan, plan.to_json()
            await self._learn_topology(target)
            restarted = await self._start_writing(None, target)
            self.progress.reader = "rdb_file"
            self.set_phase("snapshot")
            self.progress.begin_snapshot()
            self.progress.status = f"reading {info.label}"
            await self.persist()
            queue: asyncio.Queue[Batch | None] = asyncio.Queue(maxsize=QUEUE_BATCHES)
            writer = await self._writer(target, replace=self._replace(restarted))
            reader = RdbFileReader(spec, self.progress, plan=plan)
            reader.replace = writer.replace

            async def ack(batch: Batch) -> None:
                pass

            await run_pipeline(reader.run(queue), writer.run(queue, ack), self._checkpointer(),
                               self._watch_target())
            self.progress.snapshot_done = True
            self.progress.status = ""
            self.set_state(State.SUCCEEDED, phase="done", reason=self.note)
            await self.persist()
        finally:
            target.close()

    async def _start_writing(self, source: Connection | None, target: Connection) -> bool:
        """Learn who the target is and record, before the first write, that the task
        writes it; return whether an earlier attempt may have written already.

        The first time, note whether the task's scope on the target held keys then
        (``preexisting``): a redone snapshot may replace and remove only what the task
        wrote, and only without such keys can it tell the two apart.
        """
        info = parse_info(await target.call("INFO", "server"))
        run_id = info.get("run_id") or None
        started = self.checkpoint.get("started")
        if run_id != self.target_run_id:
            if (self.target_run_id and run_id and self.checkpoint.get("snapshot")
                    and not self.progress.snapshot_done):
                # A scan snapshot resumes from its cursor: not onto a target that restarted
                # meanwhile (what it copied before may be gone).
                self.progress.target_resets += 1
                self.checkpoint["resync"] = (f"{target.name} restarted during the snapshot "
                                             f"(run_id {self.target_run_id[:8]} -> "
                                             f"{run_id[:8]})")
            self.target_run_id = run_id
        if started is None and not self.fresh:
            started = {"at": now_iso(), "preexisting": True}   # a record of an older cdcd
            self.checkpoint["started"] = started
        if started is None:
            self.checkpoint["started"] = {"at": now_iso(),
                                          "preexisting": await self._scope_holds_keys(target)}
            if self.spec.incremental and self.topology is None:
                assert source is not None
                db = await self._marker_db(source, target)
                self.checkpoint["marker_db"] = db
                self.markers = Markers(self.spec.task_id, db)
            await self.persist()
            return False
        return True

    async def _marker_db(self, source: Connection, target: Connection) -> int:
        """A db of the target the task does not write, for its marker (DBSIZE of the
        user's dbs then equals the source's)."""
        databases = 16
        try:
            reply = await target.call("CONFIG", "GET", "databases")
            if isinstance(reply, list) and len(reply) == 2:
                databases = max(1, int(reply[1]))
        except (ServerReplyError, ValueError):
            pass     # CONFIG refused (ACL, managed service): Redis's default
        held = keyspace(parse_info(await source.call("INFO", "keyspace")))
        used = [self.spec.target_db(d) for d, n in held.items()
                if n and self.spec.filter.db_ok(d)]
        return choose_db(databases, lambda db: writes_db(self.spec, db), used)

    async def _scope_holds_keys(self, target: Connection) -> bool:
        """Say whether the target holds keys the task could write (cdcd's own excluded)."""
        for host, port in self._cluster_nodes():
            conn = await Connection.open(host, port, role="target", ep=self.spec.target)
            try:
                if await self._node_holds_keys(conn):
                    return True
            finally:
                conn.close()
        return self.topology is None and await self._node_holds_keys(target)

    async def _node_holds_keys(self, target: Connection) -> bool:
        spec = self.spec
        held = keyspace(parse_info(await target.call("INFO", "keyspace")))
        try:
            for db, n in sorted(held.items()):
                if not n or not writes_db(spec, db):
                    continue
                if n > PREFIX_SCAN_LIMIT:
                    return True
                await target.select(db)
                cursor = b"0"
                while True:
                    cursor, keys = await target.call("SCAN", cursor, "COUNT", 1000)
                    if any(spec.filter.key_ok(k) and not is_cdcd_key(k) for k in keys):
                        return True
                    if cursor == b"0":
                        break
        finally:
            await target.select(0)
        return False

    @property
    def _scope_was_empty(self) -> bool:
        """The task's scope on the target held no keys before its first write (so every
        key there now is the task's own copy); unknown counts as not empty."""
        return not self.checkpoint.get("started", {}).get("preexisting", True)

    def _replace(self, resync: bool) -> bool:
        """Whether snapshot keys replace the target's: per existing_keys, except in a
        resync of a target whose scope held nothing before the task (every key there is
        the task's own copy, which must be brought up to date)."""
        return self.spec.existing_keys != "skip" or (resync and self._scope_was_empty)

    def _cleanup_allowed(self) -> bool:
        """A resync removes stale keys unless they cannot be told from the target's own."""
        return self.spec.existing_keys != "skip" or self._scope_was_empty

    async def _run_psync(self, source: Connection, target: Connection,
                         restarted: bool) -> None:
        spec = self.spec
        local = StreamPos.from_json(self.checkpoint.get("stream"))
        forced = self.checkpoint.get("resync")
        resume: StreamPos | None = None
        router: ClusterRouter | None = None
        skip: dict[int, int] = {}
        if self.topology is not None and spec.incremental:
            # A cluster target: the writer's connections read the slot markers too.
            router = await self._cluster_writer(replace=spec.existing_keys != "skip",
                                                marks=True)
        if spec.incremental and not forced:
            if router is not None:
                verdict = await self._judge_cluster(router, local)
            else:
                verdict = await self.markers.judge(target, local)
            if verdict.lost:
                self.progress.target_resets += 1
                self.set_note(verdict.lost)
                if verdict.full:
                    forced = self.checkpoint["resync"] = verdict.lost
                    self.checkpoint.pop("stream", None)
                elif verdict.resume is not None:
                    self.checkpoint["stream"] = verdict.resume.to_json()
            await self.persist()
            resume = verdict.resume
            skip = verdict.skip
        if resume is not None and router is None:
            resume = await self._after_source_failover(source, resume, local)
        if router is not None:
            if resume is not None:
                router.resume(skip)
            else:
                router.mark_all = True
        # A full sync after data was written (a crash during the first snapshot, a resync
        # asked for or forced by the target) must end exact: stale keys removed after it.
        resync = bool(forced) or restarted
        host, port = spec.source.addrs[0]
        queue: asyncio.Queue[Batch | None] = asyncio.Queue(maxsize=QUEUE_BATCHES)
        keys_total = await self._source_keys(source)

        def on_full_sync(replid: str, offset: int) -> None:
            redo = resync or resume is not None
            if redo:
                self.progress.full_resyncs += 1
                if forced:
                    why = str(forced)
                elif resume is not None:
                    why = (f"source answered a full resync (offset {resume.offset + 1} of "
                           f"{resume.replid} no longer in its backlog)")
                else:
                    why = "the first snapshot was interrupted"
                # Kept until the stale keys are removed: a crash before that redoes it all.
                self.checkpoint["resync"] = why
                note = f"{why}; snapshot redone"
                if not self._cleanup_allowed():
                    note += (": existing_keys is skip and the target held keys before the "
                             "task, so keys copied earlier are neither replaced nor removed "
                             "(run verify)")
                self.set_note(note)
            reader.replace = writer.replace = self._replace(redo)
            if router is not None:
                router.restart_snapshot()
            p = self.progress
            p.begin_snapshot(keys_total)
            p.source_offset = p.applied_offset = offset
            p.status = "waiting for the source's RDB"
            self.set_phase("snapshot")

        def on_stream() -> None:
            self.set_phase("incremental")
            self.progress.status = "streaming"

        rdb_applied = asyncio.Event()

        async def after_rdb(seen: set[int] | None) -> None:
            await rdb_applied.wait()
            if seen is not None and self._cleanup_allowed():
                self.progress.status = "removing target keys the source no longer has"
                removed = await remove_stale_keys(spec, rdb_lacks(spec, seen), self._foreign(),
                                                  self._cluster_nodes())
                log.info("task %s: resync removed %d target keys the source no longer has",
                         spec.task_id, removed)
            if self.checkpoint.pop("resync", None) is not None:
                await self.persist()
            self.progress.status = "streaming" if spec.incremental else ""

        reader = PsyncReader(spec, self.progress, resume=resume, host=host, port=port,
                             rdb_only=not spec.incremental, resync=resync,
                             on_full_sync=on_full_sync, on_stream=on_stream,
                             after_rdb=after_rdb, parse=self.topology is not None,
                             plan=self.plan)
        writer = router or await self._writer(
            target, replace=spec.existing_keys != "skip",
            marker=self._marker if spec.incremental else None)

        async def ack(batch: Batch) -> None:
            pos = batch.checkpoint
            if isinstance(pos, StreamPos):
                if not rdb_applied.is_set():
                    rdb_applied.set()
                    self.healthy()
                reader.acked(pos)
                self.progress.applied_offset = pos.offset
                self.progress.source_offset = max(self.progress.source_offset, pos.offset)
                self.progress.snapshot_done = True
                self.checkpoint["stream"] = pos.to_json()
                self._dirty = True

        if resume is None:
            self.set_phase("snapshot")     # a full sync: the source may take a while to start
        await run_pipeline(reader.run(queue), writer.run(queue, ack), self._checkpointer(),
                           self._poll_source(source, reader), self._watch_target(),
                           sentinel.watch(spec), *self._verifier())
        self.progress.snapshot_done = True
        await self.persist()

    async def _after_source_failover(self, source: Connection, resume: StreamPos,
                                     local: StreamPos | None) -> StreamPos:
        """A source that is a promoted replica continues its old master's stream up to
        where it took over (``master_replid2`` until ``second_repl_offset``). When cdcd had
        read past that point only PINGs and its own heartbeats (published on the old master
        while the failover was under way, so the new one never got them), nothing of that
        reached the target: continue from the switch point instead of a full resync."""
        info = parse_info(await source.call("INFO", "replication"))
        if resume.replid != info.get("master_replid2"):
            return resume
        switch = int(info.get("second_repl_offset", "-1") or -1)
        data = resume.data
        if data < 0 and local is not None and local.replid == resume.replid and \
                local.offset == resume.offset:
            data = local.data
        if switch <= 0 or resume.offset + 1 <= switch or not 0 <= data <= switch - 1:
            return resume
        log.info("task %s: the source took over at offset %d; the %d bytes read past it "
                 "held no data command: continuing from there", self.spec.task_id,
                 switch - 1, resume.offset - (switch - 1))
        return StreamPos(replid=resume.replid, offset=switch - 1, db=resume.db, data=data)

    def _marker(self, checkpoint: Any) -> list[bytes] | None:
        return self.markers.command(checkpoint) if isinstance(checkpoint, StreamPos) else None

    async def _source_keys(self, source: Connection) -> int:
        """How many keys the source's selected dbs hold now (a snapshot's keys_total)."""
        held = keyspace(parse_info(await source.call("INFO", "keyspace")))
        return sum(n for db, n in held.items() if self.spec.filter.db_ok(db))

    def _foreign(self) -> Callable[[int, bytes], bool]:
        """Say which target keys a stale-key cleanup must never touch: cdcd's own, and
        those another task writing the same target server may own (shared_target)."""
        sharing = [o.spec for o in self.peers()
                   if o is not self and o.state != State.SUCCEEDED and
                   same_server(self.spec.target, self.target_run_id, o.spec.target,
                               o.target_run_id)]

        def foreign(tdb: int, key: bytes) -> bool:
            return is_cdcd_key(key) or any(in_scope(o, tdb, key) for o in sharing)
        return foreign

    async def _poll_source(self, source: Connection, reader: PsyncReader) -> None:
        """Every second: sample the source's offset (so lag counts what we have not read
        yet) and publish a heartbeat that measures lag end to end."""
        beats = self.spec.incremental
        while True:
            info = parse_info(await source.call("INFO", "replication"))
            off = int(info.get("master_repl_offset", "0") or 0)
            # Only an offset of the history we follow: a restarted source starts a new one
            # (new replid, offsets from 0), which the reader meets with a full resync.
            if reader.replid and reader.replid in (info.get("master_replid"),
                                                   info.get("master_replid2")):
                self.progress.source_offset = max(off, self.progress.applied_offset)
            if beats and self.phase == "incremental":
                try:
                    await source.call(*reader.heartbeat())
                except ServerReplyError as exc:
                    beats = False
                    log.warning("task %s: heartbeat PUBLISH refused (%s); lag_ms is then the "
                                "time from reading a change to applying it", self.spec.task_id,
                                exc.reply)
            await asyncio.sleep(1.0)

    async def _watch_target(self) -> None:
        """Look at the target every few seconds on a connection of its own: a target that
        stops answering is a dead link (the writer may be waiting on a reply that never
        comes), and keys it evicts break the copy (reported; ``on_target_eviction: fail``
        stops the task)."""
        spec = self.spec
        conns: list[Connection] = []
        try:
            for host, port in self._cluster_nodes() or [spec.target.addrs[0]]:
                conns.append(await Connection.open(host, port, role="target", ep=spec.target))
            last: list[int | None] = [None] * len(conns)
            rounds = 0
            while True:
                for i, conn in enumerate(conns):
                    last[i] = await self._look_at_target(conn, last[i],
                                                         policy=rounds % POLICY_EVERY == 0)
                if self.topology is not None and rounds % POLICY_EVERY == POLICY_EVERY - 1:
                    # The view follows reshardings and failovers the writer followed.
                    try:
                        self.topology = await discover(
                            spec.target, HostMapping(spec.target.host_mapping), role="target")
                    except EndpointError as exc:
                        log.info("task %s: target topology not refreshed: %s",
                                 spec.task_id, exc.message)
                rounds += 1
                await asyncio.sleep(WATCH_EVERY)
        finally:
            for conn in conns:
                conn.close()

    async def _look_at_target(self, conn: Connection, last: int | None, *,
                              policy: bool) -> int:
        """One look at one target node (and at its maxmemory-policy when ``policy``);
        return its evicted_keys counter."""
        spec = self.spec
        try:
            info = parse_info(await conn.call("INFO", "stats",
                                              timeout=float(spec.link_timeout_s)))
            if policy:
                mem = parse_info(await conn.call("INFO", "memory",
                                                 timeout=float(spec.link_timeout_s)))
                self.progress.target_policy = mem.get("maxmemory_policy", "")
        except EndpointError as exc:
            raise EndpointError(f"{exc.message} (target probe)") from None
        evicted = int(info.get("evicted_keys", "0") or 0)
        if last is not None:
            new = evicted - last if evicted >= last else evicted   # restarted: reset
            if new > 0:
                self.progress.target_evicted_keys += new
                msg = (f"{conn.name} evicted {new} keys (maxmemory-policy "
                       f"{self.progress.target_policy}, "
                       f"{self.progress.target_evicted_keys} since the task started "
                       f"watching): the copy is no longer exact")
                if spec.on_target_eviction == "fail":
                    raise FatalTaskError(msg + "; raise the target's maxmemory or "
                                         "set maxmemory-policy noeviction, then resync")
                self.record_error(msg)
                self.set_note(msg)
        return evicted

    def _verifier(self) -> list[Coroutine[Any, Any, None]]:
        return [self._continuous_verify()] if self.spec.continuous_verify else []

    async def _continuous_verify(self) -> None:
        """Every ``every_s``, compare a sample of keys (rechecked once the target caught up,
        so lag is not drift); what differs goes to the view and /metrics."""
        from .verifications import caught_up, checkpoint_excluded
        cv = self.spec.continuous_verify
        assert cv is not None
        while True:
            await asyncio.sleep(cv.every_s)
            if self.phase != "incremental":
                continue
            v = Verification(checkpoint_excluded(self.spec), sample=cv.sample,
                             recheck=caught_up(self), keys_per_sec=max(cv.sample / 10, 100))
            result = await v.run()
            p = self.progress
            p.verify_runs += 1
            p.verify_last_at = now_iso()
            if result["state"] != "done":
                p.verify_last_error = _cut(result["error"])
                continue
            r = result["result"]
            p.verify_sampled, p.verify_drift = r["keys_checked"], r["differences"]
            p.verify_drift_total += r["differences"]
            p.verify_last_error = ""
            if r["differences"]:
                self.record_error(f"continuous_verify: {r['differences']} of {r['keys_checked']}"
                                  f" sampled keys differ on the target")
                log.warning("task %s: %s", self.spec.task_id, self.progress.last_error)

    async def _writer(self, target: Connection, *, replace: bool,
                      marker: Callable[[Any], list[bytes] | None] | None = None
                      ) -> Writer | ClusterRouter:
        """The target's writer: one connection, or a router over a cluster's masters."""
        if self.topology is None:
            return Writer(target, progress=self.progress, replace=replace,
                          db_map=self.spec.target_db, limiter=self.bandwidth, marker=marker,
                          marker_db=self.markers.db)
        return await self._cluster_writer(replace=replace)

    async def _cluster_writer(self, *, replace: bool, marks: bool = False) -> ClusterRouter:
        assert self.topology is not None
        if marks:
            await asyncio.to_thread(slot_tags)    # 0.2 s once: not on the event loop
        router = ClusterRouter(self.topology, self.spec.target, progress=self.progress,
                               replace=replace, limiter=self.bandwidth,
                               io_timeout=float(self.spec.link_timeout_s),
                               marks=self.slot_markers if marks else None,
                               task_id=self.spec.task_id, db_map=self.spec.target_db,
                               mapping=HostMapping(self.spec.target.host_mapping))
        await router.open()
        self._closers.append(router.close)
        return router

    async def _judge_cluster(self, router: ClusterRouter, local: StreamPos | None) -> Verdict:
        """Compare the checkpoint with the slot markers on every master. A master that is
        not the server the checkpoint was written to (restarted, or a promoted replica)
        may hold less: its slots' markers say how much. The masters of now are recorded
        with the position the task resumes from."""
        marks, changed = await self.cluster_marks(router)
        return SlotMarkers.judge(marks, local, changed)

    async def cluster_marks(self, router: ClusterRouter
                            ) -> tuple[dict[int, StreamPos], dict[str, list[int]]]:
        """The slot markers a cluster target holds, and its masters that are not the
        servers the checkpoint was written to, with their slots; the masters of now are
        recorded in the checkpoint."""
        assert self.topology is not None
        marks = await self.slot_markers.read(router.conns)
        ids = await router.identities()
        recorded = self.checkpoint.get("target_nodes") or {}
        changed = {s.master.name: [slot for a, b in s.ranges for slot in range(a, b + 1)]
                   for s in self.topology.shards
                   if recorded.get(s.master.node_id) != ids.get(s.master.node_id)}
        self.checkpoint["target_nodes"] = ids
        return marks, changed

    async def _source_topology(self, source: Connection) -> Topology | None:
        """A cluster source's masters and slots (None for a standalone source)."""
        spec = self.spec
        if len(spec.source.addrs) == 1 and not await is_cluster(source):
            return None
        topology = await discover(spec.source, HostMapping(spec.source.host_mapping),
                                  role="source")
        await check_reachable(topology, spec.source, role="source")
        return topology

    def _cluster_nodes(self) -> list[tuple[str, int]]:
        """A cluster target's masters (where cdcd dials them); [] for a standalone one."""
        return [] if self.topology is None else [m.dial for m in self.topology.masters]

    async def _learn_topology(self, target: Connection) -> None:
        """Find out whether the target is a cluster and, if so, its masters and slots."""
        spec = self.spec
        if len(spec.target.addrs) == 1 and not await is_cluster(target):
            self.topology = None
            return
        self.topology = await discover(spec.target, HostMapping(spec.target.host_mapping),
                                       role="target")
        await check_reachable(self.topology, spec.target, role="target")

    def update_spec(self, spec: TaskSpec) -> None:
        """Take a new spec (an operator's ``update``): the bandwidth limit applies at once;
        endpoints from the next connection on."""
        self.spec = spec
        mb = spec.bandwidth_limit_mb
        self.bandwidth.set_rate(mb * 1_000_000 if mb else None)

    async def _precheck(self) -> None:
        """Run every check; errors stop the task, warnings are only shown."""
        fresh = self.fresh
        ids: dict[str, str | None] = {}
        checks = await run_prechecks(self.spec, fresh=fresh, identity_out=ids)
        # (self.target_run_id is updated by _start_writing, which compares the two)
        run_id = ids.get("target_run_id") or self.target_run_id
        conflict = find_conflict(self.spec, run_id, self.peers())
        if conflict is not None:
            checks.append(Check(name="target.shared", status="error", message=conflict))
        self.prechecks = [c.to_json() for c in checks]
        bad = [c for c in checks if c.status == "error"]
        if not bad:
            return
        reason = "precheck failed: " + "; ".join(f"{c.name}: {c.message}" for c in bad)
        if fresh:
            raise FatalTaskError(reason)
        raise EndpointError(reason)   # data moved already: retry per resume_mode

    def _forced_scan_resync(self) -> str | None:
        """Start a scan snapshot over when a resync is due; return why (None: no resync)."""
        forced = self.checkpoint.get("resync")
        if forced:
            self.checkpoint.pop("snapshot", None)
            self.progress.full_resyncs += 1
            self.set_note(f"{forced}; snapshot redone")
        if not self.checkpoint.get("snapshot"):
            self.progress.begin_snapshot()
        return str(forced) if forced else None

    async def _scan_snapshot(self, source: Connection, target: Connection) -> None:
        spec = self.spec
        forced = self._forced_scan_resync()
        queue: asyncio.Queue[Batch | None] = asyncio.Queue(maxsize=QUEUE_BATCHES)
        writer = await self._writer(target, replace=self._replace(bool(forced)))
        reader = ScanSnapshot(source, spec, self.progress, self.checkpoint.get("snapshot"),
                              plan=self.plan)
        reader.replace = writer.replace
        await run_pipeline(reader.run(queue), writer.run(queue, self._ack_snapshot),
                           self._checkpointer(), self._watch_target(), sentinel.watch(spec))
        if forced:
            await self._scan_cleanup()
        self.progress.snapshot_done = True
        self.checkpoint["snapshot"] = {"done": True}
        self.checkpoint.pop("resync", None)
        await self.persist()

    async def _scan_cleanup(self) -> None:
        """After a redone scan snapshot, remove target keys the source no longer holds."""
        if not self._cleanup_allowed():
            return
        self.progress.status = "removing target keys the source no longer has"
        src = await Connection.open_endpoint(self.spec.source, role="source")
        try:
            removed = await remove_stale_keys(self.spec, source_lacks(self.spec, src),
                                              self._foreign(), self._cluster_nodes())
        finally:
            src.close()
        self.progress.status = ""
        log.info("task %s: resync removed %d target keys the source no longer has",
                 self.spec.task_id, removed)

    async def _scan_incremental(self, source: Connection, target: Connection) -> None:
        """SCAN snapshot, then follow keyspace notifications (best effort, never ends).

        Notifications sent while disconnected are lost, so every (re)start redoes the
        snapshot from the beginning.
        """
        spec = self.spec
        p = self.progress
        self.checkpoint.pop("snapshot", None)
        forced = self._forced_scan_resync()
        self.set_phase("snapshot")
        self.note = (self.fallback + "; " if self.fallback else "") + \
            "incremental changes come from keyspace notifications (best effort)"
        self.reason = self.note
        await self.persist()
        feed = NotificationFeed(spec, p, self.plan)
        await feed.subscribe()
        queue: asyncio.Queue[Batch | None] = asyncio.Queue(maxsize=QUEUE_BATCHES)
        # Every start redoes the snapshot: after the first, the scope holds our own copies.
        writer = await self._writer(target, replace=self._replace(True))
        scan = ScanSnapshot(source, spec, p, None, plan=self.plan)
        scan.replace = writer.replace

        async def produce() -> None:
            await scan.run(queue, end=False)
            if forced:
                await self._scan_cleanup()
                self.checkpoint.pop("resync", None)
            p.snapshot_done = True
            self.set_phase("incremental")
            self.healthy()
            feed.snapshot_done.set()
            await feed.run(queue)

        async def ack(batch: Batch) -> None:
            mark = batch.checkpoint
            if isinstance(mark, tuple) and mark[0] == "notify":
                p.lag_ms = (time.monotonic() - mark[1]) * 1000

        try:
            await run_pipeline(produce(), writer.run(queue, ack), feed.listen(),
                               self._checkpointer(), self._watch_target(),
                               sentinel.watch(self.spec))
        finally:
            if feed.sub is not None:
                feed.sub.close()

    async def _ack_snapshot(self, batch: Batch) -> None:
        self.checkpoint["snapshot"] = batch.checkpoint
        self._dirty = True
        self.healthy()

    async def _checkpointer(self) -> None:
        """Persist the latest acknowledged checkpoint about once a second."""
        while True:
            await asyncio.sleep(CHECKPOINT_EVERY)
            self.progress.sample()
            if self._dirty:
                self.progress.last_checkpoint_at = now_iso()
                await self.persist(lazy=True)


StaleFn = Callable[[int, list[bytes]], Awaitable[list[bytes]]]


def source_dbs(spec: TaskSpec, tdb: int) -> list[int]:
    """The source dbs whose keys land in target db ``tdb``."""
    if spec.filter.dbs is not None:
        return [d for d in spec.filter.dbs if spec.target_db(d) == tdb]
    mapped = [d for d, t in spec.db_mapping.items() if t == tdb]
    return mapped + ([tdb] if tdb not in spec.db_mapping else [])


def rdb_lacks(spec: TaskSpec, seen: set[int]) -> StaleFn:
    """Stale keys after a psync resync: those the new RDB did not hold."""
    async def stale(tdb: int, keys: list[bytes]) -> list[bytes]:
        dbs = source_dbs(spec, tdb)
        return [k for k in keys if not any(key_hash(d, k) in seen for d in dbs)]
    return stale


def source_lacks(spec: TaskSpec, src: Connection) -> StaleFn:
    """Stale keys after a scan resync: those no source db mapped there holds now."""
    async def stale(tdb: int, keys: list[bytes]) -> list[bytes]:
        held = [False] * len(keys)
        for d in source_dbs(spec, tdb):
            cmds: list[list[Arg]] = [["SELECT", d]]
            cmds += [["EXISTS", k] for k in keys]
            replies = await src.pipeline(cmds)
            for i, r in enumerate(replies):
                if isinstance(r, ReplyError):
                    raise EndpointError(f"{src.name}: {'SELECT' if i == 0 else 'EXISTS'} "
                                        f"failed: {r}")
            for i, r in enumerate(replies[1:]):
                held[i] = held[i] or bool(r)
        src.db = -1     # the pipeline moved the connection
        return [k for k, h in zip(keys, held) if not h]
    return stale


async def remove_stale_keys(spec: TaskSpec, stale: StaleFn,
                            foreign: Callable[[int, bytes], bool],
                            nodes: list[tuple[str, int]] | None = None) -> int:
    """Delete target keys in the task's scope (its target dbs and filter) that ``stale``
    says the source no longer holds; never cdcd's own keys nor ``foreign`` ones (another
    task's on a shared target). ``nodes``: a cluster's masters (each SCANned, keys
    unlinked one by one since they span slots), else the target's first address.

    A full resync re-copies every key but cannot see deletions that happened while the
    link was down (or before a crash); without this the target would keep them.
    """
    flt = spec.filter
    removed = 0
    for host, port in nodes or [spec.target.addrs[0]]:
        conn = await Connection.open(host, port, role="target", ep=spec.target,
                                     io_timeout=float(spec.link_timeout_s))
        try:
            held = keyspace(parse_info(await conn.call("INFO", "keyspace")))
            for tdb in sorted(held):
                if not source_dbs(spec, tdb):
                    continue
                await conn.select(tdb)
                cursor = b"0"
                while True:
                    cursor, keys = await conn.call("SCAN", cursor, "COUNT", 1000)
                    mine = [k for k in keys if flt.key_ok(k) and not foreign(tdb, k)]
                    gone = await stale(tdb, mine) if mine else []
                    if gone and nodes:
                        replies = await conn.pipeline([["UNLINK", k] for k in gone])
                        removed += sum(r for r in replies if isinstance(r, int))
                    elif gone:
                        removed += await conn.call("UNLINK", *gone)
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
