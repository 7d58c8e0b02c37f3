"""Apply batches of entries to the target: pipelined, several batches in flight.

A batch's checkpoint is handed to ``on_ack`` only when the target has answered every
command of that batch and of every batch before it, so a checkpoint never claims more
than the target holds.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import hiredis

from .entry import RAW, RESTORE, STRINGS, Batch, string_payload
from .errors import EndpointError, FatalTaskError, MigrationError
from .progress import Progress
from .ratelimit import TokenBucket
from .resp import Connection, ReplyError, encode_into

log = logging.getLogger("cdcd.writer")

AckFn = Callable[[Batch], Awaitable[None]]

# One %-format per key is the cheapest way to build a RESTORE in Python.
RESTORE_REPLACE = (b"*6\r\n$7\r\nRESTORE\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n"
                   b"$7\r\nREPLACE\r\n$6\r\nABSTTL\r\n")
RESTORE_KEEP = (b"*5\r\n$7\r\nRESTORE\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n"
                b"$6\r\nABSTTL\r\n")
INLINE_PAYLOAD = 64 * 1024
MERGE_ENTRIES = 4096            # bounds for folding queued stream batches into one
MERGE_BYTES = 4 << 20
MULTI = b"*1\r\n$5\r\nMULTI\r\n"
EXEC = b"*1\r\n$4\r\nEXEC\r\n"


class Writer:
    """Write to one standalone target over one connection."""

    def __init__(self, conn: Connection, *, progress: Progress, replace: bool = True,
                 db_map: Callable[[int], int] = lambda db: db, max_inflight: int = 4,
                 limiter: TokenBucket | None = None,
                 marker: Callable[[Any], list[bytes] | None] | None = None,
                 marker_db: int = 0) -> None:
        self.conn = conn
        self.progress = progress
        self.replace = replace
        self.db_map = db_map
        self.max_inflight = max_inflight
        self.limiter = limiter
        # marker(checkpoint) -> a command recording the checkpoint on the target (run in
        # ``marker_db`` in the same MULTI/EXEC as the batch), or None for a batch sent
        # without MULTI.
        self.marker = marker
        self.marker_db = marker_db
        self.db = conn.db
        # (batch, replies expected, reply positions that answer our own SELECTs,
        #  whether the batch is wrapped in MULTI/EXEC)
        self.inflight: deque[tuple[Batch, int, list[int], bool]] = deque()

    async def run(self, queue: asyncio.Queue[Batch | None], on_ack: AckFn) -> None:
        """Consume batches until a None arrives; acknowledge each once the target has it."""
        held: list[Batch | None] = []   # taken from the queue while merging, not merged
        while True:
            if self.inflight and queue.empty() and not held:
                # Nothing new to send: acknowledge what is in flight instead of waiting.
                await on_ack(await self.collect())
                continue
            batch = held.pop() if held else await queue.get()
            if batch is None:
                break
            batch = self._merge_queued(batch, queue, held)
            await self.send(batch)
            while len(self.inflight) >= self.max_inflight:
                await on_ack(await self.collect())
        while self.inflight:
            await on_ack(await self.collect())

    def _merge_queued(self, batch: Batch, queue: asyncio.Queue[Batch | None],
                      held: list[Batch | None]) -> Batch:
        """Fold batches already waiting into this one, so a busy stream of small batches
        costs one transaction (and one checkpoint write on the target) per round trip.

        Only batches that carry a checkpoint marker are merged: those are stream batches,
        which never hold a MULTI of their own; anything else taken from the queue meanwhile
        goes to ``held`` and is sent on its own next.
        """
        if self.marker is None or self.marker(batch.checkpoint) is None:
            return batch
        entries: list[Any] | None = None
        nbytes, checkpoint = batch.nbytes, batch.checkpoint
        while not queue.empty() and nbytes < MERGE_BYTES and \
                len(entries or batch.entries) < MERGE_ENTRIES:
            nxt = queue.get_nowait()
            if nxt is None or self.marker(nxt.checkpoint) is None or \
                    getattr(nxt.checkpoint, "shard", "") != getattr(checkpoint, "shard", ""):
                held.append(nxt)      # (another shard's stream keeps its own checkpoint)
                break
            if entries is None:
                entries = list(batch.entries)
            entries += nxt.entries
            nbytes += nxt.nbytes
            checkpoint = nxt.checkpoint
        return batch if entries is None else Batch(entries, checkpoint, nbytes, batch.keys)

    async def send(self, batch: Batch) -> None:
        parts: list[bytes] = []
        n = 0
        selects: list[int] = []
        restore = RESTORE_REPLACE if self.replace else RESTORE_KEEP
        mark = self.marker(batch.checkpoint) if self.marker is not None else None
        if mark is not None:
            parts.append(MULTI)
        db_map = self.db_map
        append = parts.append
        for entry in batch.entries:
            db = db_map(entry[1])
            if db != self.db:
                encode_into(parts, [b"SELECT", str(db).encode()])
                selects.append(n)
                n += 1
                self.db = db
            kind = entry[0]
            if kind == RAW:
                parts += entry[2]
                n += entry[3]
                self.db = entry[5]   # the SELECTs inside moved the connection
                continue
            if kind == RESTORE:
                key, payload = entry[2], entry[4]
                ttl = b"%d" % entry[3]
                if len(payload) < INLINE_PAYLOAD:
                    append(restore % (len(key), key, len(ttl), ttl, len(payload), payload))
                else:   # do not copy a big payload into a new buffer
                    encode_into(parts, [b"RESTORE", key, ttl, payload,
                                        *([b"REPLACE", b"ABSTTL"] if self.replace
                                          else [b"ABSTTL"])])
            elif kind == STRINGS:
                pairs = entry[2]
                if self.replace:
                    # One MSET costs the target far less than a RESTORE per key.
                    encode_into(parts, [b"MSET", *pairs])
                else:
                    # existing_keys skip: a RESTORE per key, BUSYKEY counted as skipped
                    for i in range(0, len(pairs), 2):
                        key, payload = pairs[i], string_payload(pairs[i + 1])
                        append(restore % (len(key), key, 1, b"0", len(payload), payload))
                    n += entry[3] - 1
            else:
                encode_into(parts, entry[2])
            n += 1
        if mark is not None:
            if self.db != self.marker_db:
                encode_into(parts, [b"SELECT", b"%d" % self.marker_db])
                selects.append(n)
                n += 1
                self.db = self.marker_db
            encode_into(parts, mark)
            parts.append(EXEC)
        data = b"".join(parts) if len(parts) > 1 else parts[0] if parts else b""
        nbytes = len(data)
        if self.limiter is not None:
            await self.limiter.take(nbytes)
        self.conn.send(data)
        await self.conn.drain()
        self.progress.bytes_written += nbytes
        self.inflight.append((batch, n, selects, mark is not None))

    async def collect(self) -> Batch:
        """Read the replies of the oldest batch in flight; raise on a reply that loses data."""
        batch, n, selects, atomic = self.inflight.popleft()
        if atomic:
            replies = await self._exec_replies(batch, n, selects)
        else:
            replies = await self.conn.read_replies(n)
        for r in replies:
            if r.__class__ is ReplyError:
                self._check(batch, replies, selects)
                break
        p = self.progress
        if p.snapshot_done:
            for entry in batch.entries:
                kind = entry[0]
                p.ops_applied += entry[4] if kind == RAW else entry[3] if kind == STRINGS else 1
        else:
            # Snapshot commands (big-key chunks, FUNCTION LOAD) are not replicated ops.
            for entry in batch.entries:
                kind = entry[0]
                if kind == RESTORE:
                    p.keys_done += 1
                    p.snapshot_bytes += len(entry[4])
                elif kind == STRINGS:
                    p.keys_done += entry[3]
                    p.snapshot_bytes += entry[4]
        return batch

    async def _exec_replies(self, batch: Batch, n: int, selects: list[int]) -> list[Any]:
        """Read MULTI, n+1 QUEUED and EXEC; return the n entry/SELECT results from EXEC."""
        replies = await self.conn.read_replies(n + 3)
        queued, result = replies[1:n + 1], replies[-1]
        if result.__class__ is ReplyError or not isinstance(result, list):
            # Refused at queue time (unknown command, OOM, ...): nothing was applied.
            self._check(batch, queued, selects)
            err = replies[n + 1] if replies[n + 1].__class__ is ReplyError else result
            raise self._refused(f"{self.conn.name}: transaction refused: {err}", str(err))
        if result[-1].__class__ is ReplyError:
            raise FatalTaskError(f"{self.conn.name}: writing the checkpoint marker failed: "
                                 f"{result[-1]}")
        return list(result[:n])

    def _refused(self, message: str, reply: str) -> MigrationError:
        if reply.startswith(("OOM", "LOADING", "BUSY", "MASTERDOWN", "READONLY", "TRYAGAIN")):
            return EndpointError(message)
        return FatalTaskError(message)

    def _check(self, batch: Batch, replies: list[Any], selects: list[int]) -> None:
        """Match error replies to entries and decide what each one means."""
        for pos in selects:
            if replies[pos].__class__ is ReplyError:
                raise FatalTaskError(f"{self.conn.name}: SELECT failed: {replies[pos]}")
        skip = set(selects)
        answers = iter([r for i, r in enumerate(replies) if i not in skip])
        for entry in batch.entries:
            if entry[0] == RAW:
                raw_replies = [next(answers) for _ in range(entry[3])]
                for i, reply in enumerate(raw_replies):
                    if reply.__class__ is ReplyError:
                        args = raw_command(entry[2], i)
                        raise self._refused(f"{self.conn.name}: {show_args(args)} failed: "
                                            f"{reply}", str(reply))
                continue
            if entry[0] == STRINGS:
                self._check_strings(entry, answers)
                continue
            reply = next(answers)
            if reply.__class__ is not ReplyError:
                continue
            msg = str(reply)
            if entry[0] == RESTORE:
                if msg.startswith("BUSYKEY") and not self.replace:
                    self.progress.keys_skipped += 1
                    continue
                raise self._refused(f"{self.conn.name}: RESTORE of key {show_key(entry[2])} "
                                    f"(db {self.db_map(entry[1])}) failed: {msg}", msg)
            raise self._refused(f"{self.conn.name}: {show_args(entry[2])} failed: {msg}", msg)


    def _check_strings(self, entry: Any, answers: Any) -> None:
        pairs, db = entry[2], self.db_map(entry[1])
        if self.replace:
            reply = next(answers)
            if reply.__class__ is ReplyError:
                raise self._refused(f"{self.conn.name}: MSET of {entry[3]} keys (db {db}, first "
                                    f"{show_key(pairs[0])}) failed: {reply}", str(reply))
            return
        for i in range(0, len(pairs), 2):
            reply = next(answers)
            if reply.__class__ is not ReplyError:
                continue
            msg = str(reply)
            if msg.startswith("BUSYKEY"):
                self.progress.keys_skipped += 1
                continue
            raise self._refused(f"{self.conn.name}: RESTORE of key {show_key(pairs[i])} "
                                f"(db {db}) failed: {msg}", msg)


def raw_command(segments: list[bytes], index: int) -> list[bytes]:
    """Parse forwarded RESP bytes again to name the ``index``-th command (error path)."""
    parser = hiredis.Reader()
    parser.feed(b"".join(segments))
    args: Any = None
    for _ in range(index + 1):
        args = parser.gets()
    return list(args) if isinstance(args, list) and args else [b"?"]


def show_key(key: bytes, limit: int = 80) -> str:
    text = repr(key[:limit])[1:]
    return text + ("..." if len(key) > limit else "")


def show_args(args: list[bytes]) -> str:
    head = args[0].decode(errors="replace").upper()
    return f"{head} {show_key(args[1])}" if len(args) > 1 else head
