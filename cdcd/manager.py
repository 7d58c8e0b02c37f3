"""The task registry: create/list/get/pause/resume/delete, restart recovery, the
verifications started over the API, and the store doctor that saves what a full or
read-only disk refused as soon as it accepts writes again."""

from __future__ import annotations

import asyncio
import builtins
import logging
from datetime import UTC, datetime
from typing import Any

from .errors import (
    ConflictError,
    EndpointError,
    NotFoundError,
    RequestError,
    StoreError,
    TargetUnavailable,
)
from .identity import find_conflict, target_run_id
from .readers.rdbfile import RdbFileError
from .readers.rdbfile import inspect as inspect_rdb_file
from .spec import parse_spec, same_spec, spec_from_store
from .store import Store
from .task import State, Task
from .verifications import Verifications, parse_verify
from .verify import Verification

log = logging.getLogger("cdcd.manager")

# What ``update`` may change on a live task.
UPDATABLE = frozenset({"task_id", "bandwidth_limit_mb", "source", "target"})
ENDPOINT_UPDATABLE = ("addrs", "host_mapping")

# Periodic checkpoints wait this long so that the checkpoints of other tasks share a write.
LAZY_FLUSH = 0.25
# While the store cannot be written, the doctor tries again this often.
DOCTOR_EVERY = 2.0


def not_saved(exc: StoreError) -> StoreError:
    """The 503 of a lifecycle change refused because the store cannot be written."""
    return StoreError(f"metadata store cannot be written ({exc.message}): the change was not "
                      f"saved; retry when the disk has room")


def saved_later(exc: StoreError) -> StoreError:
    """The 503 of a lifecycle change made in memory that the store could not save yet."""
    return StoreError(f"metadata store cannot be written ({exc.message}): the change is "
                      f"applied but not yet saved; it will be written when the disk "
                      f"accepts it")


class Manager:
    def __init__(self, store: Store, *, max_tasks: int = 100) -> None:
        self.store = store
        self.max_tasks = max_tasks
        self.tasks: dict[str, Task] = {}
        self._ops = asyncio.Lock()   # one lifecycle operation at a time
        self.verifications = Verifications()
        self._doctor: asyncio.Task[None] | None = None

    async def _persist(self, task: Task, lazy: bool = False) -> None:
        if self.tasks.get(task.spec.task_id) is task:
            self.store.put(task.spec.task_id, task.to_record())
            await self.store.flush(delay=LAZY_FLUSH if lazy else 0.0)

    async def start(self) -> None:
        """Load every stored task and restart the ones that were Running or Initial."""
        for task_id, rec in self.store.open().items():
            try:
                if not isinstance(rec, dict):
                    raise ValueError("the record is not a JSON object")
                spec = spec_from_store(rec["spec"])
                task = Task(spec, self._persist, record=rec, peers=self._peers)
            except (RequestError, KeyError, TypeError, ValueError) as exc:
                # Keep it in the file (nothing is lost) but do not run what we cannot read.
                log.error("task %s: stored record is unreadable, skipping it: %s", task_id,
                          getattr(exc, "message", exc))
                continue
            self.tasks[task_id] = task
            if task.state in (State.RUNNING, State.INITIAL):
                log.info("task %s: resuming after daemon restart (%s)", task_id,
                         task.state.value)
                task.start()
        self._doctor = asyncio.create_task(self._store_doctor(), name="cdcd-store-doctor")

    async def _store_doctor(self) -> None:
        """While the store cannot be written, write it again every DOCTOR_EVERY seconds.

        The records in memory are complete, so the first write the disk accepts saves
        every checkpoint and every change made meanwhile.
        """
        store = self.store
        while True:
            await store.wait_failed()
            log.error("metadata store cannot be written: %s; lifecycle requests answer 503 "
                      "and changes are kept in memory until it can (retrying every %g s)",
                      store.last_error, DOCTOR_EVERY)
            while not store.healthy:
                await asyncio.sleep(DOCTOR_EVERY)
                try:
                    await store.flush()
                except StoreError:
                    continue
            log.warning("metadata store writable again: every change kept in memory is "
                        "saved in %s", store.path)

    async def _stop_doctor(self) -> None:
        doctor, self._doctor = self._doctor, None
        if doctor is None:
            return
        doctor.cancel()
        # gather: our own cancellation still propagates, the doctor's is its result
        (result,) = await asyncio.gather(doctor, return_exceptions=True)
        if not isinstance(result, (asyncio.CancelledError, type(None))):
            log.error("store doctor failed: %r", result)

    async def _store_writable(self) -> None:
        """Refuse a lifecycle change (503) before making it while the store cannot be
        written: try one write first, which saves everything if the disk is back."""
        if self.store.healthy:
            return
        try:
            await self.store.flush()
        except StoreError as exc:
            raise not_saved(exc) from exc

    async def stop(self) -> None:
        """Stop every pipeline, each with its checkpoint saved; states stay as they are.

        Verifications are cancelled and awaited first (they are not kept across restarts).
        Raises StoreError, once every task is stopped, when the final write fails: the
        file then holds the last version that could be written.
        """
        await self.verifications.stop()
        async with self._ops:
            tasks = list(self.tasks.values())
            running = [t for t in tasks if t.running]
            results = await asyncio.gather(*(t.stop() for t in tasks), return_exceptions=True)
            unsaved = set()
            for t, r in zip(tasks, results):
                if isinstance(r, StoreError):
                    # its record is in the store's memory: the final write below saves it
                    log.error("task %s: %s", t.spec.task_id, r.message)
                elif isinstance(r, BaseException):
                    unsaved.add(t.spec.task_id)
                    log.error("task %s: stopping failed: %s", t.spec.task_id, r)
            saved = sum(t.spec.task_id not in unsaved for t in running)
            await self._stop_doctor()
            try:
                await self.store.flush()
            except StoreError as exc:
                log.error("stopped %d running task(s), but the metadata store could not be "
                          "written (%s): %s keeps the last version written", len(running),
                          exc.message, self.store.path)
                raise
            finally:
                self.store.close()
            log.info("stopped %d running task(s), %d with their checkpoint saved "
                     "(%d task(s) in the store)", len(running), saved, len(tasks))

    def get(self, task_id: Any) -> Task:
        if not isinstance(task_id, str) or not task_id:
            raise RequestError("request_data.task_id: required (a string)")
        task = self.tasks.get(task_id)
        if task is None:
            raise NotFoundError(f"task '{task_id}' does not exist")
        return task

    def list(self, state: str | None = None) -> list[Task]:
        if state is not None and state not in {s.value for s in State}:
            raise RequestError("request_data.state: must be one of "
                               + ", ".join(s.value for s in State))
        return [t for t in self.tasks.values() if state is None or t.state.value == state]

    def _peers(self) -> builtins.list[Task]:
        return builtins.list(self.tasks.values())

    async def create(self, data: Any) -> Task:
        spec = parse_spec(data)
        if spec.source.rdb_file:
            try:
                await asyncio.to_thread(inspect_rdb_file, spec.source.rdb_file)
            except RdbFileError as exc:
                raise RequestError(f"request_data.source.rdb_file: {exc}") from None
        # Who the target is (None when unreachable now: addresses are compared instead);
        # asked before taking the lock, so a slow target never holds up other requests.
        run_id = await target_run_id(spec.target)
        async with self._ops:
            await self._store_writable()
            existing = self.tasks.get(spec.task_id)
            if existing is not None:
                if same_spec(existing.spec, spec):
                    return existing
                raise ConflictError(f"task '{spec.task_id}' exists with a different spec")
            if len(self.tasks) >= self.max_tasks:
                raise ConflictError(f"max_tasks ({self.max_tasks}) reached; delete a task first")
            conflict = find_conflict(spec, run_id, self.tasks.values())
            if conflict is not None:
                raise ConflictError(conflict)
            task = Task(spec, self._persist, peers=self._peers)
            task.target_run_id = run_id
            self.tasks[spec.task_id] = task
            try:
                await task.persist()
            except BaseException as exc:
                # Not on disk, so not created: a retry of the request starts afresh.
                del self.tasks[spec.task_id]
                self.store.remove(spec.task_id)
                if isinstance(exc, StoreError):
                    raise not_saved(exc) from exc
                raise
            task.start()
            log.info("task %s: created (%s, source %s, target %s)", spec.task_id,
                     spec.migration_method, spec.source.display, spec.target.display)
            return task

    async def pause(self, task_id: Any) -> Task:
        async with self._ops:
            task = self.get(task_id)
            await self._store_writable()
            if task.state == State.PAUSED:
                return task
            if task.state == State.SUCCEEDED:
                raise ConflictError(f"task '{task_id}' has Succeeded; there is nothing to pause")
            # Paused before the writes that may fail: whatever happens next, the task is
            # never left Running without its runner. stop() cancels the runner before it
            # can run again, so the runner cannot change the state meanwhile.
            task.set_state(State.PAUSED)
            try:
                await task.stop()
                await task.persist()
            except StoreError as exc:
                raise saved_later(exc) from exc
            return task

    async def resume(self, task_id: Any) -> Task:
        async with self._ops:
            task = self.get(task_id)
            await self._store_writable()
            if task.state in (State.RUNNING, State.INITIAL) and task.running:
                return task
            if task.state == State.SUCCEEDED:
                raise ConflictError(f"task '{task_id}' has Succeeded; send resync (or create "
                                    f"a new task) to copy again")
            await task.stop()
            start_at = task.spec.start_at
            if start_at is not None and start_at > datetime.now(UTC):
                # Still scheduled: back to waiting; the runner makes it Running at start_at.
                task.set_state(State.INITIAL)
            else:
                task.set_state(State.RUNNING, reason=task.note)
            return await self._run_again(task)

    async def _run_again(self, task: Task) -> Task:
        """Start a stopped task's runner, then save its record."""
        task.start()   # before the write that may fail: Running always has its runner
        return await self._save(task)

    async def _save(self, task: Task) -> Task:
        """Save a change already made in memory (503 saying so when the disk refuses)."""
        try:
            await task.persist()
        except StoreError as exc:
            raise saved_later(exc) from exc
        return task

    async def update(self, data: dict[str, Any]) -> Task:
        """Change a task's ``bandwidth_limit_mb`` (at once, even mid-snapshot) and its
        endpoints' ``addrs`` / ``host_mapping`` (from the next connection: a running task
        reconnects and resumes from its checkpoint, a partial resync when the new address
        can continue the replication stream)."""
        for key in data:
            if key not in UPDATABLE:
                raise RequestError(f"request_data.{key}: unknown field (update takes "
                                   f"task_id, {', '.join(sorted(UPDATABLE - {'task_id'}))})")
        task = self.get(data.get("task_id"))
        raw = task.spec.to_json(mask=False)
        if "bandwidth_limit_mb" in data:
            raw["bandwidth_limit_mb"] = data["bandwidth_limit_mb"]
        for side in ("source", "target"):
            if side not in data:
                continue
            given = data[side]
            if not isinstance(given, dict):
                raise RequestError(f"request_data.{side}: must be an object")
            for key in given:
                if key not in ENDPOINT_UPDATABLE:
                    raise RequestError(f"request_data.{side}.{key}: cannot be updated (only "
                                       f"{', '.join(ENDPOINT_UPDATABLE)}); create a new "
                                       f"task to change it")
            raw[side] = {**raw[side], **given}
        spec = parse_spec(raw)
        moved = spec.source != task.spec.source or spec.target != task.spec.target
        run_id = await target_run_id(spec.target) if moved else task.target_run_id
        async with self._ops:
            await self._store_writable()
            if moved:
                others = [t for t in self.tasks.values() if t is not task]
                conflict = find_conflict(spec, run_id, others)
                if conflict is not None:
                    raise ConflictError(conflict)
            task.update_spec(spec)
            log.info("task %s: updated (%s)", task.spec.task_id, ", ".join(
                sorted(k for k in data if k != "task_id")))
            if moved and task.running:
                await task.stop()   # reconnects to the new addresses from its checkpoint
                return await self._run_again(task)
            return await self._save(task)

    async def resync(self, task_id: Any) -> Task:
        """Redo the task's snapshot now (stale target keys removed), then go on."""
        async with self._ops:
            task = self.get(task_id)
            await self._store_writable()
            await task.stop()
            task.request_resync("resync requested by the operator")
            task.set_state(State.RUNNING, reason=task.note)
            log.info("task %s: resync requested", task_id)
            return await self._run_again(task)

    async def delete(self, task_id: Any, ignore_not_found: bool = False, *,
                     purge_markers: bool = False) -> str:
        """Stop the task and remove its metadata; with ``purge_markers`` also remove the
        marker keys it keeps on the target (refused with 502, nothing deleted, when the
        target cannot be reached)."""
        async with self._ops:
            try:
                task = self.get(task_id)
            except NotFoundError:
                if ignore_not_found:
                    return str(task_id)
                raise
            await self._store_writable()
            if purge_markers:
                await task.stop()   # no batch may write a marker after the purge
                try:
                    removed = await task.purge_markers()
                except EndpointError as exc:
                    if task.state in (State.RUNNING, State.INITIAL):
                        task.start()    # not deleted: it goes on as before
                    raise TargetUnavailable(f"{exc.message}: the markers were not removed "
                                            f"and the task was not deleted; retry, or "
                                            f"delete without purge_markers") from exc
                log.info("task %s: %d marker key(s) removed from the target", task_id,
                         removed)
            del self.tasks[task.spec.task_id]
            await task.stop()   # writes nothing: the task is no longer registered
            self.store.remove(task.spec.task_id)
            log.info("task %s: deleted", task_id)
            try:
                await self.store.flush()
            except StoreError as exc:
                raise saved_later(exc) from exc
            return task.spec.task_id

    def verify(self, data: dict[str, Any]) -> Verification:
        """Start comparing a task's (or two endpoints') source and target in the background."""
        return self.verifications.start(parse_verify(data, self.get))
