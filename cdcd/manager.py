"""The task registry: create/list/get/pause/resume/delete, restart recovery, and the
verifications started over the API."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from .errors import ConflictError, NotFoundError, RequestError
from .spec import parse_spec, same_spec, spec_from_store
from .store import Store
from .task import State, Task
from .verifications import Verifications, parse_verify
from .verify import Verification

log = logging.getLogger("cdcd.manager")

# Periodic checkpoints wait this long so that the checkpoints of other tasks share a write.
LAZY_FLUSH = 0.25


class Manager:
    def __init__(self, store: Store, *, max_tasks: int = 100) -> None:
        self.store = store
        self.max_tasks = max_tasks
        self.tasks: dict[str, Task] = {}
        self._ops = asyncio.Lock()   # one lifecycle operation at a time
        self.verifications = Verifications()

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
                task = Task(spec, self._persist, record=rec)
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

    async def stop(self) -> None:
        """Stop every pipeline, each with its checkpoint saved; states stay as they are.

        Verifications are cancelled and awaited first (they are not kept across restarts).
        """
        await self.verifications.stop()
        async with self._ops:
            tasks = list(self.tasks.values())
            results = await asyncio.gather(*(t.stop() for t in tasks), return_exceptions=True)
            for t, r in zip(tasks, results):
                if isinstance(r, BaseException):
                    log.error("task %s: stopping failed: %s", t.spec.task_id, r)
            await self.store.flush()
            self.store.close()

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

    async def create(self, data: Any) -> Task:
        spec = parse_spec(data)
        async with self._ops:
            existing = self.tasks.get(spec.task_id)
            if existing is not None:
                if same_spec(existing.spec, spec):
                    return existing
                raise ConflictError(f"task '{spec.task_id}' exists with a different spec")
            if len(self.tasks) >= self.max_tasks:
                raise ConflictError(f"max_tasks ({self.max_tasks}) reached; delete a task first")
            task = Task(spec, self._persist)
            self.tasks[spec.task_id] = task
            try:
                await task.persist()
            except BaseException:
                # Not on disk, so not created: a retry of the request starts afresh.
                del self.tasks[spec.task_id]
                self.store.remove(spec.task_id)
                raise
            task.start()
            log.info("task %s: created (%s, source %s, target %s)", spec.task_id,
                     spec.migration_method, spec.source.display, spec.target.display)
            return task

    async def pause(self, task_id: Any) -> Task:
        async with self._ops:
            task = self.get(task_id)
            if task.state == State.PAUSED:
                return task
            if task.state == State.SUCCEEDED:
                raise ConflictError(f"task '{task_id}' has Succeeded; there is nothing to pause")
            await task.stop()
            task.set_state(State.PAUSED)
            await task.persist()
            return task

    async def resume(self, task_id: Any) -> Task:
        async with self._ops:
            task = self.get(task_id)
            if task.state in (State.RUNNING, State.INITIAL) and task.running:
                return task
            if task.state == State.SUCCEEDED:
                raise ConflictError(f"task '{task_id}' has Succeeded; create a new task to "
                                    f"copy again")
            await task.stop()
            task.set_state(State.RUNNING, phase=task.phase)
            await task.persist()
            task.start()
            return task

    async def delete(self, task_id: Any, ignore_not_found: bool = False) -> str:
        async with self._ops:
            try:
                task = self.get(task_id)
            except NotFoundError:
                if ignore_not_found:
                    return str(task_id)
                raise
            del self.tasks[task.spec.task_id]
            await task.stop()
            self.store.remove(task.spec.task_id)
            await self.store.flush()
            log.info("task %s: deleted", task_id)
            return task.spec.task_id

    def verify(self, data: dict[str, Any]) -> Verification:
        """Start comparing a task's (or two endpoints') source and target in the background."""
        return self.verifications.start(parse_verify(data, self.get))
