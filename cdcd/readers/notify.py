"""Best-effort incremental feed for sources that refuse PSYNC: keyspace notifications.

Pub/sub is fire and forget: events sent while we are disconnected are lost, FLUSHDB and
FLUSHALL emit none, and a slow subscriber is cut off by the source. So this feed is
explicitly best effort: each notified key is re-read (DUMP + PTTL) and written whole
(RESTORE REPLACE, or DEL when it is gone). After any reconnect the task re-runs the SCAN
snapshot, since notifications sent meanwhile are lost.

While the snapshot runs, notified keys are only remembered (a bounded set); they are
copied again once the snapshot is done, so a snapshot batch can never overwrite a newer
value written by the feed.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Any

from ..compat import RESTORE_PLAN, WritePlan
from ..entry import COMMAND, RESTORE, Batch, Entry
from ..errors import EndpointError, FatalTaskError
from ..progress import Progress
from ..resp import Connection, ReplyError, ServerReplyError
from ..spec import TaskSpec
from .rewrite import Rewriter

log = logging.getLogger("cdcd.reader.notify")

PATTERN = b"__keyspace@*__:*"
MAX_DIRTY = 1_000_000
BATCH_KEYS = 512


def events_enabled(flags: str) -> bool:
    """Whether notify-keyspace-events publishes keyspace events for every command class."""
    f = set(flags)
    return "K" in f and ("A" in f or {"g", "$", "l", "s", "h", "z", "x", "e", "t"} <= f)


class NotificationFeed:
    def __init__(self, spec: TaskSpec, progress: Progress,
                 plan: WritePlan = RESTORE_PLAN, node: tuple[str, int] | None = None) -> None:
        self.spec = spec
        self.progress = progress
        # A master of a cluster source (its own notifications, its own keys), else None:
        # the source endpoint.
        self.node = node
        # write_mode rewrite: a changed key is written with commands, not RESTORE.
        self.rewriter = (Rewriter(plan, spec, progress, source="source")
                         if plan.rewrite else None)
        self.dirty: dict[tuple[int, bytes], float] = {}   # (db, key) -> first seen at
        self.overflowed = False
        self.snapshot_done = asyncio.Event()
        self.changed = asyncio.Event()
        self.sub: Connection | None = None

    async def subscribe(self) -> None:
        """Subscribe before the snapshot starts, so no change in between is missed."""
        conn = await self._open()
        try:
            try:
                flags = await conn.call("CONFIG", "GET", "notify-keyspace-events")
                value = flags[1].decode() if flags and len(flags) > 1 else ""
                if not events_enabled(value):
                    raise FatalTaskError(
                        f"{conn.name}: keyspace notifications are off (notify-keyspace-events "
                        f"is {value!r}); the scan reader's incremental feed needs them: set it "
                        f"to 'KA' on the source, or use the psync reader")
            except ServerReplyError:
                log.warning("%s: CONFIG GET refused; assuming keyspace notifications are on",
                            conn.name)
            await conn.call("PSUBSCRIBE", PATTERN)
        except BaseException:
            conn.close()
            raise
        self.sub = conn

    async def listen(self) -> None:
        """Record every notified key until cancelled."""
        assert self.sub is not None
        conn = self.sub
        flt = self.spec.filter
        while True:
            msg = await conn.read_reply()
            if not isinstance(msg, list) or len(msg) != 4 or msg[0] != b"pmessage":
                continue
            channel: bytes = msg[2]
            head, sep, key = channel.partition(b"__:")
            if not sep:
                continue
            try:
                db = int(head.rsplit(b"@", 1)[1])
            except (IndexError, ValueError):
                continue
            if not flt.db_ok(db) or not flt.key_ok(key):
                continue
            if (db, key) not in self.dirty:
                if len(self.dirty) >= MAX_DIRTY:
                    self.overflowed = True
                    continue
                self.dirty[(db, key)] = time.monotonic()
                self.changed.set()

    async def run(self, out: asyncio.Queue[Batch | None]) -> None:
        """After the snapshot, copy notified keys again, batch by batch, forever."""
        await self.snapshot_done.wait()
        if self.overflowed:
            raise EndpointError(f"more than {MAX_DIRTY} keys changed during the snapshot; "
                                f"redoing it")
        conn = await self._open()
        try:
            while True:
                if not self.dirty:
                    self.changed.clear()
                    await self.changed.wait()   # set by listen() when a key is notified
                    continue
                batch = list(itertools.islice(self.dirty.items(), BATCH_KEYS))
                for k, _ in batch:
                    del self.dirty[k]
                await out.put(await self._read(conn, batch))
        finally:
            conn.close()

    async def _open(self) -> Connection:
        if self.node is None:
            return await Connection.open_endpoint(self.spec.source, role="source")
        return await Connection.open(*self.node, role="source", ep=self.spec.source)

    async def _read(self, conn: Connection, items: list[tuple[tuple[int, bytes], float]]
                    ) -> Batch:
        entries: list[Entry] = []
        nbytes = 0
        by_db: dict[int, list[tuple[bytes, float]]] = {}
        for (db, key), seen in items:
            by_db.setdefault(db, []).append((key, seen))
        oldest = min(seen for _, seen in items)
        for db, keys in by_db.items():
            await conn.select(db)
            cmds: list[list[Any]] = []
            for key, _ in keys:
                if self.node is not None:
                    # a cluster master reads a key it is importing only after ASKING
                    cmds += [[b"ASKING"], [b"DUMP", key], [b"ASKING"], [b"PTTL", key]]
                else:
                    cmds += [[b"DUMP", key], [b"PTTL", key]]
            now_ms = int(time.time() * 1000)
            replies = await conn.pipeline(cmds)
            if self.node is not None:
                replies = replies[1::2]
            for i, (key, _) in enumerate(keys):
                payload, ttl = replies[2 * i], replies[2 * i + 1]
                if self.node is not None and ReplyError in (payload.__class__, ttl.__class__) \
                        and str(payload if payload.__class__ is ReplyError else ttl
                                ).startswith(("MOVED", "ASK")):
                    continue    # moved to another master, whose own notification copies it
                if payload.__class__ is ReplyError:
                    raise EndpointError(f"{conn.name}: DUMP failed: {payload}")
                if payload is None or ttl == -2:
                    entries.append((COMMAND, db, [b"DEL", key]))
                elif self.rewriter is not None:
                    nbytes += self.rewriter.key(db, key, payload, now_ms + ttl if ttl >= 0
                                                else 0, True, entries)
                else:
                    entries.append((RESTORE, db, key, now_ms + ttl if ttl >= 0 else 0,
                                    payload))
                    nbytes += len(payload)
        return Batch(entries, ("notify", oldest), nbytes, 0)
