"""Snapshot a source with SCAN + pipelined DUMP/PTTL (works wherever PSYNC is refused).

One round trip per batch: the DUMP/PTTL of the keys of one SCAN reply travel with the
SCAN for the next cursor. The checkpoint after a batch is (db, next cursor, dbs done):
SCAN cursors are stateless on the server, so a restarted task continues where it was.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Any

from ..entry import RESTORE, Batch, Entry
from ..errors import EndpointError, FatalTaskError, MigrationError
from ..progress import Progress
from ..resp import Connection, ReplyError, keyspace, parse_info
from ..spec import TaskSpec

log = logging.getLogger("cdcd.reader.scan")

SCAN_COUNT = 512
_GLOB = re.compile(rb"([*?\[\]\\])")


# Error replies that go away by themselves; any other (NOPERM, ERR ...) needs the operator.
TRANSIENT = ("LOADING", "BUSY", "TRYAGAIN", "MASTERDOWN", "CLUSTERDOWN")


def refused(conn: Connection, command: str, reply: Any) -> MigrationError:
    """Turn a source's error reply into the task error it means."""
    message = f"{conn.name}: {command} failed: {reply}"
    if str(reply).startswith(TRANSIENT):
        return EndpointError(message)
    return FatalTaskError(message)


def match_pattern(spec: TaskSpec) -> bytes | None:
    """Let the server filter when exactly one include prefix is given."""
    if len(spec.filter.include_prefixes) == 1:
        return _GLOB.sub(rb"\\\1", spec.filter.include_prefixes[0]) + b"*"
    return None


async def source_dbs(conn: Connection, spec: TaskSpec) -> dict[int, int]:
    """Return {db: key count} for the selected dbs that hold keys."""
    info = parse_info(await conn.call("INFO", "keyspace"))
    return {db: n for db, n in sorted(keyspace(info).items()) if spec.filter.db_ok(db)}


class ScanSnapshot:
    def __init__(self, conn: Connection, spec: TaskSpec, progress: Progress,
                 checkpoint: dict[str, Any] | None, *, count: int = SCAN_COUNT) -> None:
        self.conn = conn
        self.spec = spec
        self.progress = progress
        self.ckpt = checkpoint or {}
        self.count = count

    async def run(self, out: "asyncio.Queue[Batch | None]", *, end: bool = True) -> None:
        """Queue every selected key; then a None that ends the writer, unless ``end`` is
        False (a feed of later changes follows on the same queue)."""
        dbs = await source_dbs(self.conn, self.spec)
        done: list[int] = list(self.ckpt.get("dbs_done", []))
        if not self.progress.keys_total:
            self.progress.keys_total = sum(dbs.values())
        for db in dbs:
            if db in done:
                continue
            cursor = int(self.ckpt.get("cursor", 0)) if self.ckpt.get("db") == db else 0
            await self._scan_db(db, cursor, done, out)
            done.append(db)
        if end:
            await out.put(None)

    async def _scan_db(self, db: int, cursor: int, done: list[int],
                       out: "asyncio.Queue[Batch | None]") -> None:
        conn = self.conn
        await conn.select(db)
        flt = self.spec.filter
        pattern = match_pattern(self.spec)
        scan: list[Any] = [b"SCAN", b"0", b"COUNT", str(self.count).encode()]
        if pattern is not None:
            scan += [b"MATCH", pattern]
        scan[1] = str(cursor).encode()
        reply = (await conn.pipeline([scan]))[0]
        if reply.__class__ is ReplyError:
            raise refused(conn, "SCAN", reply)
        while True:
            next_cursor, keys = int(reply[0]), reply[1]
            if flt.by_key:
                keys = [k for k in keys if flt.key_ok(k)]
            cmds: list[list[Any]] = []
            for k in keys:
                cmds.append([b"DUMP", k])
                cmds.append([b"PTTL", k])
            if next_cursor:
                scan[1] = str(next_cursor).encode()
                cmds.append(scan)
            now_ms = int(time.time() * 1000)
            replies = await conn.pipeline(cmds) if cmds else []
            entries: list[Entry] = []
            nbytes = 0
            for i, k in enumerate(keys):
                payload, ttl = replies[2 * i], replies[2 * i + 1]
                if payload.__class__ is ReplyError:
                    raise refused(conn, "DUMP", payload)
                if ttl.__class__ is ReplyError:
                    raise refused(conn, "PTTL", ttl)
                if payload is None or ttl == -2:
                    continue  # expired or deleted since SCAN saw it
                entries.append((RESTORE, db, k, now_ms + ttl if ttl >= 0 else 0, payload))
                nbytes += len(payload)
            ckpt = {"db": db, "cursor": next_cursor, "dbs_done": done + ([db] if not next_cursor
                                                                          else [])}
            await out.put(Batch(entries, ckpt, nbytes, len(entries)))
            if not next_cursor:
                return
            reply = replies[-1]
            if reply.__class__ is ReplyError:
                raise refused(conn, "SCAN", reply)
