"""Keep task metadata and checkpoints in one JSON file under the data dir.

Writes are atomic (temp file, fsync, rename, fsync of the dir): a crash at any instant
leaves the previous or the next version. The file is 0600 because specs hold passwords.
Writes run in a thread and are coalesced: many ``flush()`` calls at once cost one write,
and each caller returns only once a write that includes its change is on disk.

A write the disk refuses (full, read-only, I/O error) raises StoreError and leaves the
previous file whole. The records in memory are always complete, so the next write that
succeeds saves every change made meanwhile; ``healthy`` says whether the last write did.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import errno
import fcntl
import logging
import os
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from .errors import StoreError as StoreError  # re-exported: `from cdcd.store import StoreError`

log = logging.getLogger("cdcd.store")

STORE_VERSION = 1
FILE_NAME = "cdcd.json"


class Store:
    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.dir = Path(data_dir)
        self.path = self.dir / FILE_NAME
        self._tasks: dict[str, dict[str, Any]] = {}
        self._gen = 0            # bumped by every change
        self._written = 0        # generation last on disk
        self._lock = asyncio.Lock()
        # A flush cancelled while its thread writes releases ``_lock`` but not the thread:
        # ``_io`` keeps two writes from racing on the temp file, ``_on_disk`` keeps an
        # older generation from overwriting a newer one.
        self._io = threading.Lock()
        self._on_disk = 0
        self._lock_fd: int | None = None
        # Health: whether the last write attempt succeeded, and the last failure with its
        # time ("cannot write ...: No space left on device (at 2026-...Z)"). Set by the
        # writing thread; read by the manager and the metrics.
        self.healthy = True
        self.last_error = ""
        self.write_errors = 0
        self._failed = asyncio.Event()

    def open(self) -> dict[str, dict[str, Any]]:
        """Take the data dir's lock and load every task record."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.dir / "cdcd.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreError(f"data dir {self.dir} is in use by another cdcd process") from None
        self._lock_fd = fd
        for stale in self.dir.glob(f".{FILE_NAME}.*.tmp"):
            stale.unlink(missing_ok=True)
        if not self.path.exists():
            return {}
        try:
            doc = orjson.loads(self.path.read_bytes())
        except (OSError, orjson.JSONDecodeError) as exc:
            raise StoreError(f"cannot read {self.path}: {exc}") from exc
        if not isinstance(doc, dict):
            raise StoreError(f"{self.path} is not a cdcd store (not a JSON object)")
        version = doc.get("version")
        if version != STORE_VERSION:
            raise StoreError(f"{self.path} has store version {version}, this cdcd reads "
                             f"{STORE_VERSION}")
        tasks = doc.get("tasks", {})
        if not isinstance(tasks, dict):
            raise StoreError(f"{self.path}: 'tasks' is not a JSON object")
        self._tasks = tasks
        return copy.deepcopy(self._tasks)

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def put(self, task_id: str, record: dict[str, Any]) -> None:
        self._tasks[task_id] = record
        self._gen += 1

    def remove(self, task_id: str) -> None:
        if self._tasks.pop(task_id, None) is not None:
            self._gen += 1

    async def flush(self, *, delay: float = 0.0) -> None:
        """Return once everything put so far is on disk; raise StoreError if it cannot be.

        ``delay`` lets changes of other tasks made meanwhile ride along in the same write:
        periodic checkpoints of many tasks then cost a few writes a second, not one each.
        While the store is unhealthy every flush tries a write, so any caller can find out
        that the disk accepts writes again.
        """
        wanted = self._gen
        if delay:
            await asyncio.sleep(delay)
        async with self._lock:
            if self._written >= wanted and self.healthy:
                return
            gen = self._gen
            data = orjson.dumps({"version": STORE_VERSION, "tasks": self._tasks},
                                option=orjson.OPT_INDENT_2)
            try:
                await asyncio.to_thread(self._write, data, gen)
            except StoreError:
                self._failed.set()
                raise
            self._written = gen

    async def wait_failed(self) -> None:
        """Return once a write has failed (at once when the last one did).

        A write whose flush was cancelled while it ran is noticed by the next flush, which
        tries again since the store is then unhealthy.
        """
        if not self.healthy:
            return
        self._failed.clear()
        await self._failed.wait()

    def flush_sync(self) -> None:
        data = orjson.dumps({"version": STORE_VERSION, "tasks": self._tasks},
                            option=orjson.OPT_INDENT_2)
        gen = self._gen
        self._write(data, gen)
        self._written = gen

    def _write(self, data: bytes, gen: int) -> None:
        with self._io:
            # An older generation never overwrites a newer one; the same one is written
            # again only to find out whether the disk is back.
            if gen < self._on_disk or (gen == self._on_disk and self.healthy):
                return
            try:
                self._write_file(data)
            except OSError as exc:
                message = f"cannot write {self.path}: {exc.strerror or exc}"
                self.healthy = False
                at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
                self.last_error = f"{message} (at {at})"
                self.write_errors += 1
                raise StoreError(message) from exc
            self._on_disk = gen
            self.healthy = True

    def _write_file(self, data: bytes) -> None:
        """Write ``data`` as the new file, whole or not at all: on an error up to the rename
        the temp file is removed and the previous file is left as it was; after it (the
        dir's fsync) the new file is whole but maybe not durable, so the write fails too."""
        tmp = self.dir / f".{FILE_NAME}.{os.getpid()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    n = os.write(fd, view)
                    if n <= 0:   # a regular file never does this; do not loop forever
                        raise OSError(errno.EIO, "write made no progress")
                    view = view[n:]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise
        dfd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
