"""Snapshot a source with SCAN + pipelined DUMP/PTTL (works wherever PSYNC is refused).

One round trip per batch, in a three-stage pipeline: each round trip carries the
DUMP/PTTL of the keys the previous one sized, the ``MEMORY USAGE`` of the keys the
previous SCAN returned, and the next SCAN. The checkpoint after a batch is (db, next
cursor, dbs done): SCAN cursors are stateless on the server, so a restarted task
continues where it was.

Big keys: ``MEMORY USAGE`` (default 5 samples: O(1) per key, exact for strings, an
estimate for aggregates, and larger than the DUMP payload in practice) above
``big_value_bytes`` sends a key down the chunked path instead of DUMP: it is read in
windows (GETRANGE, LRANGE, ZRANGE ... WITHSCORES, HSCAN, SSCAN, XRANGE + XINFO/XPENDING)
and rebuilt on the target in a temporary key (see ``bigkey``). Such a key is not read at
one point in time: a change made to it during its copy may be copied in part (scan's
snapshot is best effort anyway; an aggregate with one huge element among small ones may
be estimated small and DUMPed whole). A source refusing MEMORY USAGE gets every key
DUMPed whole, as before.
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
from ..rdb import StreamGroup, StreamMeta
from ..resp import Connection, ReplyError, encode, keyspace, parse_info
from ..spec import TaskSpec
from .bigkey import BIG_VALUE_BYTES, CHUNK_BYTES, CHUNK_ELEMENTS, BigKey

log = logging.getLogger("cdcd.reader.scan")

SCAN_COUNT = 512
# Estimated bytes of DUMP replies one round trip may ask for; more small keys than that
# (say 512 keys of 7 MB) are dumped over several round trips.
DUMP_BUDGET = 16 << 20
# Windows of a big key read per round trip (GETRANGE, LRANGE, ZRANGE).
READ_AHEAD = 4
# A batch of big-key commands goes to the writer at this size.
BATCH_BYTES = 1 << 20
BATCH_ENTRIES = 2048
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


# The per-key commands of a round trip, each built with one %-format (cdcd.resp.encode
# per command would cost more than everything else the reader does per key).
DUMP_PTTL = b"*2\r\n$4\r\nDUMP\r\n$%d\r\n%b\r\n*2\r\n$4\r\nPTTL\r\n$%d\r\n%b\r\n"
MEMORY_USAGE = b"*3\r\n$6\r\nMEMORY\r\n$5\r\nUSAGE\r\n$%d\r\n%b\r\n"


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


class _Changed(Exception):
    """A big key changed type or vanished while it was read in chunks."""


class ScanSnapshot:
    def __init__(self, conn: Connection, spec: TaskSpec, progress: Progress,
                 checkpoint: dict[str, Any] | None, *, count: int = SCAN_COUNT,
                 big_value_bytes: int = BIG_VALUE_BYTES, chunk_bytes: int = CHUNK_BYTES,
                 chunk_elements: int = CHUNK_ELEMENTS) -> None:
        self.conn = conn
        self.spec = spec
        self.progress = progress
        self.ckpt = checkpoint or {}
        self.count = count
        self.big_value_bytes = big_value_bytes
        self.chunk_bytes = chunk_bytes
        self.chunk_elements = chunk_elements
        # Size keys with MEMORY USAGE; off when disabled or the source refuses it.
        self.sizing = big_value_bytes > 0
        self.big_keys = 0

    async def run(self, out: asyncio.Queue[Batch | None], *, end: bool = True) -> None:
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
                       out: asyncio.Queue[Batch | None]) -> None:
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

        def checkpoint(after: int) -> dict[str, Any]:
            return {"db": db, "cursor": after, "dbs_done": done + ([db] if not after else [])}

        last = checkpoint(cursor) if cursor else {"db": db, "cursor": 0, "dbs_done": list(done)}
        # Three stages: `sized` keys get their DUMP/PTTL, `fresh` keys (the last SCAN reply)
        # their MEMORY USAGE, and the next SCAN goes out, all in one round trip.
        sized: tuple[list[bytes], list[int | None], int] | None = None
        fresh: tuple[list[bytes], int] | None = self._keys(reply, flt)
        while sized is not None or fresh is not None:
            small: list[bytes] = []
            big: list[tuple[bytes, int]] = []
            if sized is not None:
                for k, size in zip(sized[0], sized[1]):
                    if size is not None and size > self.big_value_bytes:
                        big.append((k, size))
                    else:
                        small.append(k)
            groups = self._budget(small, sized[1] if sized is not None else [],
                                  sized[0] if sized is not None else [])
            first = groups[0] if groups else []
            parts = [DUMP_PTTL % (len(k), k, len(k), k) for k in first]
            measure = fresh[0] if fresh is not None and self.sizing else []
            parts += [MEMORY_USAGE % (len(k), k) for k in measure]
            ncmds = 2 * len(first) + len(measure)
            more = fresh is not None and fresh[1] != 0
            if more:
                assert fresh is not None
                scan[1] = str(fresh[1]).encode()
                parts.append(encode(scan))
                ncmds += 1
            now_ms = int(time.time() * 1000)
            replies = await self._roundtrip(parts, ncmds)
            # stage 2 -> 1: sizes of the fresh keys
            base = 2 * len(first)
            nxt: tuple[list[bytes], list[int | None], int] | None = None
            if fresh is not None:
                sizes: list[int | None] = [None] * len(fresh[0])
                for i in range(len(measure)):
                    r = replies[base + i]
                    if r.__class__ is ReplyError:
                        log.warning("%s: MEMORY USAGE refused (%s): big keys are copied "
                                    "with a whole DUMP", conn.name, r)
                        self.sizing = False
                        sizes = [None] * len(fresh[0])
                        break
                    sizes[i] = r
                nxt = (fresh[0], sizes, fresh[1])
            # stage 3 -> 2: the next SCAN reply
            new_fresh: tuple[list[bytes], int] | None = None
            if more:
                reply = replies[-1]
                if reply.__class__ is ReplyError:
                    raise refused(conn, "SCAN", reply)
                new_fresh = self._keys(reply, flt)
            # stage 1: the sized keys, now dumped (more round trips if over budget)
            if sized is not None:
                after = checkpoint(sized[2])
                for k, size in big:
                    await self._copy_big(db, k, size, out, last)
                for gi, group in enumerate(groups):
                    if gi:
                        now_ms = int(time.time() * 1000)
                        replies = await self._roundtrip(
                            [DUMP_PTTL % (len(k), k, len(k), k) for k in group], 2 * len(group))
                    entries, nbytes = self._restores(db, group, replies, now_ms)
                    ckpt = after if gi == len(groups) - 1 else last
                    await out.put(Batch(entries, ckpt, nbytes, len(entries)))
                if not groups:
                    await out.put(Batch([], after, 0, 0))
                last = after
            sized, fresh = nxt, new_fresh

    async def _roundtrip(self, parts: list[bytes], n: int) -> list[Any]:
        """Send pre-encoded commands at once; return their n replies."""
        if not n:
            return []
        conn = self.conn
        conn.send(b"".join(parts))
        await conn.drain()
        return await conn.read_replies(n)

    def _keys(self, reply: Any, flt: Any) -> tuple[list[bytes], int]:
        keys = reply[1]
        if flt.by_key:
            keys = [k for k in keys if flt.key_ok(k)]
        return keys, int(reply[0])

    def _budget(self, small: list[bytes], sizes: list[int | None],
                keys: list[bytes]) -> list[list[bytes]]:
        """Split the small keys into groups whose estimated DUMP bytes fit a round trip."""
        if not small:
            return []
        if not self.sizing:
            return [small]
        est = {k: s or 0 for k, s in zip(keys, sizes)}
        total = sum(est[k] for k in small)
        if total <= DUMP_BUDGET:
            return [small]
        groups: list[list[bytes]] = [[]]
        acc = 0
        for k in small:
            if groups[-1] and acc + est[k] > DUMP_BUDGET:
                groups.append([])
                acc = 0
            groups[-1].append(k)
            acc += est[k]
        return groups

    def _restores(self, db: int, keys: list[bytes], replies: list[Any],
                  now_ms: int) -> tuple[list[Entry], int]:
        conn = self.conn
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
        return entries, nbytes

    # --- big keys ---------------------------------------------------------------------------

    async def _copy_big(self, db: int, key: bytes, estimate: int,
                        out: asyncio.Queue[Batch | None], ckpt: dict[str, Any]) -> None:
        """Copy one big key in chunks; start over (twice at most) when it changes type."""
        for attempt in range(3):
            try:
                await self._copy_big_once(db, key, estimate, out, ckpt)
                return
            except _Changed as exc:
                log.info("%s: big key %r changed during its copy (%s)%s", self.conn.name,
                         key[:80], exc, "; copying it again" if attempt < 2 else "; skipped")

    async def _call(self, *cmds: list[Any]) -> list[Any]:
        """Pipeline commands; a WRONGTYPE means the key changed, other errors stop."""
        replies = await self.conn.pipeline(cmds)
        for cmd, r in zip(cmds, replies):
            if r.__class__ is ReplyError:
                if str(r).startswith("WRONGTYPE"):
                    raise _Changed(str(r))
                raise refused(self.conn, " ".join(a.decode() if isinstance(a, bytes) else str(a)
                                                  for a in cmd[:1]), r)
        return replies

    async def _copy_big_once(self, db: int, key: bytes, estimate: int,
                             out: asyncio.Queue[Batch | None], ckpt: dict[str, Any]) -> None:
        kind_raw = (await self._call([b"TYPE", key]))[0]
        kind = kind_raw.decode() if isinstance(kind_raw, bytes) else str(kind_raw)
        length_cmd = {"string": b"STRLEN", "list": b"LLEN", "hash": b"HLEN", "set": b"SCARD",
                      "zset": b"ZCARD", "stream": b"XLEN"}.get(kind)
        if kind == "none":
            return
        if length_cmd is None:   # a module type: whole DUMP, as for small keys
            now_ms = int(time.time() * 1000)
            replies = await self.conn.pipeline([[b"DUMP", key], [b"PTTL", key]])
            entries, nbytes = self._restores(db, [key], replies, now_ms)
            await out.put(Batch(entries, ckpt, nbytes, len(entries)))
            return
        length = int((await self._call([length_cmd, key]))[0])
        b = BigKey(db, key, kind, task_id=self.spec.task_id,
                   replace=self.spec.existing_keys != "skip",
                   size=length if kind == "string" else 0,
                   chunk_bytes=self.chunk_bytes, chunk_elements=self.chunk_elements)
        per_item = max(1, estimate // max(1, length))
        count = max(1, min(self.chunk_elements, self.chunk_bytes // per_item))
        sink = _Sink(out, ckpt)
        sink.nbytes += b.begin(sink.entries)
        try:
            if kind == "string":
                step = self.chunk_bytes
                for start in range(0, length, step * READ_AHEAD):
                    ends = range(start, min(length, start + step * READ_AHEAD), step)
                    for piece in await self._call(*[[b"GETRANGE", key, b"%d" % o,
                                                     b"%d" % (min(o + step, length) - 1)]
                                                    for o in ends]):
                        sink.nbytes += b.add_string(piece, sink.entries)
                    await sink.flush()
            elif kind in ("list", "zset"):
                head = [b"LRANGE", key] if kind == "list" else [b"ZRANGE", key]
                tail = [] if kind == "list" else [b"WITHSCORES"]
                for start in range(0, length, count * READ_AHEAD):
                    cmds = [[*head, b"%d" % o, b"%d" % (o + count - 1), *tail]
                            for o in range(start, min(length, start + count * READ_AHEAD),
                                           count)]
                    for items in await self._call(*cmds):
                        sink.nbytes += b.add_items(items, sink.entries)
                    await sink.flush()
            elif kind in ("hash", "set"):
                scan = b"HSCAN" if kind == "hash" else b"SSCAN"
                cursor = b"0"
                while True:
                    cursor, items = (await self._call([scan, key, cursor, b"COUNT",
                                                       b"%d" % count]))[0]
                    sink.nbytes += b.add_items(items, sink.entries)
                    await sink.flush()
                    if cursor == b"0":
                        break
            else:
                await self._copy_stream(b, key, count, sink)
            kind_now, ttl = await self.conn.pipeline([[b"TYPE", key], [b"PTTL", key]])
            if kind_now != kind_raw or ttl == -2:
                raise _Changed(f"now {kind_now!r}")
        except _Changed:
            sink.nbytes += b.abort(sink.entries)
            await sink.flush(force=True)
            raise
        now_ms = int(time.time() * 1000)
        sink.nbytes += b.finish(now_ms + ttl if ttl >= 0 else 0, sink.entries)
        await sink.flush(force=True)
        self.big_keys += 1
        # The writer counts RESTOREs as keys; a chunked key is counted here, once queued.
        self.progress.keys_done += 1
        self.progress.snapshot_bytes += b.bytes
        log.info("%s: copied big %s %r (db %d) in chunks: %d elements, %s", self.conn.name,
                 kind, key[:80], db, b.elements, _mib(b.bytes))

    async def _copy_stream(self, b: BigKey, key: bytes, count: int, sink: _Sink) -> None:
        """Entries by XRANGE pages, then id counters, groups, consumers, pending entries."""
        start = b"-"
        while True:
            page = (await self._call([b"XRANGE", key, start, b"+", b"COUNT", b"%d" % count]))[0]
            sink.nbytes += b.add_entries([(e[0], e[1]) for e in page], sink.entries)
            await sink.flush()
            if len(page) < count:
                break
            start = _next_id(page[-1][0])
        info_raw, groups_raw = await self._call([b"XINFO", b"STREAM", key],
                                                [b"XINFO", b"GROUPS", key])
        info = _pairs(info_raw)
        sink.nbytes += b.stream_ids(StreamMeta(last_id=info[b"last-generated-id"],
                                               entries_added=info.get(b"entries-added"),
                                               max_deleted_id=info.get(b"max-deleted-entry-id")),
                                    sink.entries)
        for graw in groups_raw:
            g = _pairs(graw)
            group = StreamGroup(name=g[b"name"], last_id=g[b"last-delivered-id"],
                                entries_read=g.get(b"entries-read"))
            consumers = (await self._call([b"XINFO", b"CONSUMERS", key, group.name]))[0]
            group.consumers = [_pairs(c)[b"name"] for c in consumers]
            sink.nbytes += b.stream_group(group, sink.entries)
            start = b"-"
            while True:
                page = (await self._call([b"XPENDING", key, group.name, start, b"+",
                                          b"%d" % count]))[0]
                now_ms = int(time.time() * 1000)
                sink.nbytes += b.stream_pending(
                    group.name, [(entry_id, consumer, now_ms - int(idle), int(times))
                                 for entry_id, consumer, idle, times in page], sink.entries)
                await sink.flush()
                if len(page) < count:
                    break
                start = _next_id(page[-1][0])


class _Sink:
    """Collect one big key's commands and hand them to the writer a batch at a time."""

    def __init__(self, out: asyncio.Queue[Batch | None], ckpt: dict[str, Any]) -> None:
        self.out = out
        self.ckpt = ckpt
        self.entries: list[Entry] = []
        self.nbytes = 0

    async def flush(self, force: bool = False) -> None:
        if self.entries and (force or self.nbytes >= BATCH_BYTES or
                             len(self.entries) >= BATCH_ENTRIES):
            await self.out.put(Batch(self.entries, self.ckpt, self.nbytes, 0))
            self.entries, self.nbytes = [], 0


def _next_id(entry_id: bytes) -> bytes:
    """The stream ID right after ``entry_id`` (an exclusive "(" range needs Redis 6.2)."""
    ms, _, seq = entry_id.partition(b"-")
    if int(seq) < (1 << 64) - 1:
        return b"%s-%d" % (ms, int(seq) + 1)
    return b"%d-0" % (int(ms) + 1)


def _pairs(flat: list[Any]) -> dict[bytes, Any]:
    """A flat [name, value, name, value ...] reply as a dict."""
    return {flat[i]: flat[i + 1] for i in range(0, len(flat) - 1, 2)}
