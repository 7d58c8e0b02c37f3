"""Snapshot a source with SCAN + pipelined reads (works wherever PSYNC is refused).

Every round trip carries the next SCAN and the reads of the keys earlier SCANs returned:
plain strings are read whole with GETRANGE, other keys sized with MEMORY USAGE and then
DUMPed (see :class:`ScanSnapshot`). Strings without a TTL become one MSET per group on
the target, everything else a RESTORE. The checkpoint after a batch is (db, cursor of the
last SCAN reply whose keys are all queued, dbs done): SCAN cursors are stateless on the
server, so a restarted task continues where it was.

Big keys: above ``big_value_bytes`` a key goes down the chunked path instead of DUMP: it is
read in windows (GETRANGE, LRANGE, ZRANGE ... WITHSCORES, HSCAN, SSCAN, XRANGE +
XINFO/XPENDING) and rebuilt on the target in a temporary key (see ``bigkey``). Such a key
is not read at one point in time: a change made to it during its copy may be copied in
part (scan's snapshot is best effort anyway; an aggregate with one huge element among
small ones may be estimated small and DUMPed whole). A source refusing MEMORY USAGE gets
every key DUMPed whole, as before; one refusing GETRANGE gets every key sized and dumped.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import deque
from typing import Any

from ..compat import RESTORE_PLAN, WritePlan
from ..entry import RESTORE, STRINGS, Batch, Entry, string_payload
from ..errors import EndpointError, FatalTaskError, MigrationError
from ..progress import Progress
from ..rdb import StreamGroup, StreamMeta
from ..resp import Connection, ReplyError, encode, keyspace, parse_info
from ..spec import TaskSpec
from .bigkey import BIG_VALUE_BYTES, CHUNK_BYTES, CHUNK_ELEMENTS, BigKey
from .rewrite import Rewriter

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


async def source_dbs(conn: Connection, spec: TaskSpec) -> dict[int, tuple[int, int]]:
    """Return {db: (keys, keys with a TTL)} for the selected dbs that hold keys."""
    info = parse_info(await conn.call("INFO", "keyspace"))
    expires = keyspace(info, "expires")
    return {db: (n, expires.get(db, 0)) for db, n in sorted(keyspace(info).items())
            if spec.filter.db_ok(db)}


# The per-key commands of a round trip, each built with one %-format (cdcd.resp.encode
# per command would cost more than everything else the reader does per key).
DUMP = b"*2\r\n$4\r\nDUMP\r\n$%d\r\n%b\r\n"
PTTL = b"*2\r\n$4\r\nPTTL\r\n$%d\r\n%b\r\n"
MEMORY_USAGE = b"*3\r\n$6\r\nMEMORY\r\n$5\r\nUSAGE\r\n$%d\r\n%b\r\n"
# Plain strings up to PROBE_BYTES are read by one GETRANGE, without MEMORY USAGE and DUMP
# (each command costs the source's main thread about a microsecond, whatever it does).
PROBE_BYTES = 16384
GETRANGE = b"*4\r\n$8\r\nGETRANGE\r\n$%%d\r\n%%b\r\n$1\r\n0\r\n$%d\r\n%d\r\n"
INFO_KEYSPACE = encode([b"INFO", b"keyspace"])
# A STRINGS entry (one MSET on the target) carries at most this many keys / value bytes.
MSET_KEYS = 1024
MSET_BYTES = 1 << 20


def _per_key(command: bytes, keys: list[Any], ttl: bool) -> list[bytes]:
    """Format ``command`` (a %-format taking len(key), key) for each (key, ...) item,
    each followed by its PTTL when ``ttl``."""
    if ttl:
        return [command % (len(k), k) + PTTL % (len(k), k) for k, *_ in keys]
    return [command % (len(k), k) for k, *_ in keys]


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


class _Changed(Exception):
    """A big key changed type or vanished while it was read in chunks."""


class _Gen:
    """The keys of one SCAN reply: the cursor after it is safe to save once all are queued."""

    __slots__ = ("cursor", "pending", "queued")

    def __init__(self, cursor: int, pending: int) -> None:
        self.cursor = cursor
        self.pending = pending      # keys not finished yet
        self.queued = 0             # keys handed to the writer


class _Round:
    """What one round trip asked for, in reply order (``later``: DUMP groups over budget)."""

    __slots__ = ("dump", "probe", "size", "scans", "per", "ncmds", "later", "now_ms")

    def __init__(self, dump: list[tuple[bytes, _Gen, int | None]],
                 probe: list[tuple[bytes, _Gen]], size: list[tuple[bytes, _Gen]],
                 scans: bool, per: int, ncmds: int,
                 later: list[list[tuple[bytes, _Gen, int | None]]]) -> None:
        self.dump = dump
        self.probe = probe
        self.size = size
        self.scans = scans
        self.per = per
        self.ncmds = ncmds
        self.later = later
        self.now_ms = int(time.time() * 1000)


class ScanSnapshot:
    """Each key goes through at most three round trips, all pipelined with the next SCAN:

    * probe: ``GETRANGE key 0 PROBE_BYTES`` returns a plain string whole (the common
      case: done); WRONGTYPE, a longer string or an empty reply send it on to sizing.
      Probing turns itself off while most keys turn out not to be strings.
    * size: ``MEMORY USAGE`` (default 5 samples: O(1) per key, exact for strings, an
      estimate for aggregates, larger than the DUMP payload in practice); above
      ``big_value_bytes`` the key is copied in chunks, otherwise
    * dump: ``DUMP``.

    ``PTTL`` goes with the probe and the dump while the db holds keys with a TTL; while it
    holds none (INFO keyspace ``expires=0``), each round trip ends with INFO keyspace
    instead, and if a TTL appeared meanwhile the keys of that round trip get their PTTL
    in one more round trip.
    """

    def __init__(self, conn: Connection, spec: TaskSpec, progress: Progress,
                 checkpoint: dict[str, Any] | None, *, count: int = SCAN_COUNT,
                 big_value_bytes: int = BIG_VALUE_BYTES, chunk_bytes: int = CHUNK_BYTES,
                 chunk_elements: int = CHUNK_ELEMENTS, plan: WritePlan = RESTORE_PLAN) -> None:
        self.conn = conn
        # How dumped values are written: RESTORE of their payloads, or commands.
        self.plan = plan
        # Whether a big key rebuilt here replaces the target's key (the writer's rule).
        self.replace = spec.existing_keys != "skip"
        self.spec = spec
        self.progress = progress
        self.ckpt = checkpoint or {}
        self.count = count
        self.big_value_bytes = big_value_bytes
        self.chunk_bytes = chunk_bytes
        self.chunk_elements = chunk_elements
        # Size keys with MEMORY USAGE; off when disabled or the source refuses it.
        self.sizing = big_value_bytes > 0
        # A probe reads at most probe_bytes + 1 bytes: never more than a big value.
        self.probe_bytes = min(PROBE_BYTES, big_value_bytes) if self.sizing else PROBE_BYTES
        self._getrange = GETRANGE % (len(str(self.probe_bytes)), self.probe_bytes)
        # Read keys as strings first; off while most are not, or if GETRANGE is refused.
        self.probing = True
        self.probe_allowed = True
        self._strings = self._others = 0
        self.big_keys = 0
        self.covered = 0        # keys queued up to the last checkpoint
        self.rewriter = (Rewriter(plan, spec, progress, source=conn.name,
                                  chunk_bytes=chunk_bytes,
                                  chunk_elements=chunk_elements)
                         if plan.rewrite else None)

    async def run(self, out: asyncio.Queue[Batch | None], *, end: bool = True) -> None:
        """Queue every selected key; then a None that ends the writer, unless ``end`` is
        False (a feed of later changes follows on the same queue)."""
        dbs = await source_dbs(self.conn, self.spec)
        done: list[int] = list(self.ckpt.get("dbs_done", []))
        if "keys" in self.ckpt:
            # Keys queued past the checkpoint before a stop are copied (and counted) again.
            self.progress.keys_done = self.covered = int(self.ckpt["keys"])
        if not self.progress.keys_total:
            self.progress.keys_total = sum(n for n, _ in dbs.values())
        for db, (_, expires) in dbs.items():
            if db in done:
                continue
            cursor = int(self.ckpt.get("cursor", 0)) if self.ckpt.get("db") == db else 0
            await self._scan_db(db, cursor, expires > 0, done, out)
            done.append(db)
        if end:
            await out.put(None)

    async def _scan_db(self, db: int, cursor: int, ttl: bool, done: list[int],
                       out: asyncio.Queue[Batch | None]) -> None:
        conn = self.conn
        await conn.select(db)
        pattern = match_pattern(self.spec)
        scan: list[Any] = [b"SCAN", b"0", b"COUNT", str(self.count).encode()]
        if pattern is not None:
            scan += [b"MATCH", pattern]
        scan[1] = str(cursor).encode()
        reply = (await conn.pipeline([scan]))[0]
        if reply.__class__ is ReplyError:
            raise refused(conn, "SCAN", reply)

        def checkpoint(after: int) -> dict[str, Any]:
            return {"db": db, "cursor": after, "dbs_done": done + ([db] if not after else []),
                    "keys": self.covered}

        def advance() -> dict[str, Any]:
            """The checkpoint after every SCAN reply whose keys are all queued."""
            ckpt = last
            while gens and gens[0].pending <= 0:
                gen = gens.popleft()
                self.covered += gen.queued
                ckpt = checkpoint(gen.cursor)
            return ckpt

        last = checkpoint(cursor) if cursor else {"db": db, "cursor": 0, "dbs_done": list(done),
                                                  "keys": self.covered}
        gens: deque[_Gen] = deque()
        fresh, more = self._keys(reply, gens)
        rnd: _Round | None = await self._send(scan, fresh, [], [], more, ttl)
        while rnd is not None:
            replies = await conn.read_replies(rnd.ncmds)
            got: list[tuple[bytes, _Gen, Any, Any]] = []     # (key, gen, value, pttl)
            per = rnd.per
            self._dumped(rnd.dump, replies, 0, per, got, dump=True)
            i = per * len(rnd.dump)
            again = self._dumped(rnd.probe, replies, i, per, got, dump=False)
            i += per * len(rnd.probe)
            to_size = again     # _send dumps them unsized once sizing is off
            to_dump: list[tuple[bytes, _Gen, int | None]] = []
            big: list[tuple[bytes, _Gen, int]] = []
            for j, (k, g) in enumerate(rnd.size):
                r = replies[i + j]
                if r.__class__ is ReplyError:
                    log.warning("%s: MEMORY USAGE refused (%s): big keys are copied "
                                "with a whole DUMP", conn.name, r)
                    self.sizing = False
                    to_dump += [(k2, g2, None) for k2, g2 in rnd.size[j:]]
                    break
                if r is None:                   # gone since SCAN saw it
                    g.pending -= 1
                elif r > self.big_value_bytes:
                    big.append((k, g, r))
                else:
                    to_dump.append((k, g, r))
            i += len(rnd.size)
            fresh, more = [], 0
            if rnd.scans:
                reply = replies[i]
                i += 1
                if reply.__class__ is ReplyError:
                    raise refused(conn, "SCAN", reply)
                fresh, more = self._keys(reply, gens)
            if per == 1:                       # sent without PTTLs: INFO keyspace came last
                info = replies[i]
                if info.__class__ is ReplyError:
                    raise refused(conn, "INFO keyspace", info)
                if keyspace(parse_info(info), "expires").get(db, 0):
                    # A TTL appeared: ask the keys just read for theirs, from now on always.
                    ttl = True
                    got = await self._add_ttls(got)
            # Big keys in chunks and DUMPs over the byte budget take round trips of their
            # own; then the next round goes out, and this one's keys are queued while the
            # source works on it.
            for k, g, size in big:
                g.queued += await self._copy_big(db, k, size, out, last)
                g.pending -= 1
            for group in rnd.later:
                await self._dump_group(db, group, ttl, out, last)
            self.probing = self.probe_allowed and self._strings >= self._others
            nxt = await self._send(scan, fresh, to_size, to_dump, more, ttl) \
                if fresh or to_size or to_dump or more else None
            entries, nbytes = self._entries(db, got, rnd.now_ms)
            last = advance()
            await out.put(Batch(entries, last, nbytes, len(entries)))
            rnd = nxt
        await out.put(Batch([], advance(), 0, 0))

    async def _send(self, scan: list[Any], fresh: list[tuple[bytes, _Gen]],
                    to_size: list[tuple[bytes, _Gen]],
                    to_dump: list[tuple[bytes, _Gen, int | None]], more: int,
                    ttl: bool) -> _Round:
        """Send one round: DUMPs (within the byte budget), probes, sizes, SCAN, INFO."""
        probe: list[tuple[bytes, _Gen]] = []
        if self.probing:
            probe = fresh
        else:
            to_size = to_size + fresh
        if not self.sizing:
            to_dump = to_dump + [(k, g, None) for k, g in to_size]
            to_size = []
        groups = self._budget(to_dump)
        first = groups[0] if groups else []
        parts = _per_key(DUMP, first, ttl) + _per_key(self._getrange, probe, ttl)
        parts += _per_key(MEMORY_USAGE, to_size, False)
        per = 2 if ttl else 1
        ncmds = per * (len(first) + len(probe)) + len(to_size)
        if more:
            scan[1] = str(more).encode()
            parts.append(encode(scan))
            ncmds += 1
        if not ttl:
            parts.append(INFO_KEYSPACE)
            ncmds += 1
        rnd = _Round(first, probe, to_size, bool(more), per, ncmds, groups[1:])
        self.conn.send(b"".join(parts))
        await self.conn.drain()
        return rnd

    async def _dump_group(self, db: int, group: list[tuple[bytes, _Gen, int | None]],
                          ttl: bool, out: asyncio.Queue[Batch | None],
                          ckpt: dict[str, Any]) -> int:
        """DUMP a group of keys in a round trip of its own; queue them; return how many."""
        per = 2 if ttl else 1
        now_ms = int(time.time() * 1000)
        replies = await self._roundtrip(_per_key(DUMP, group, ttl), per * len(group))
        got: list[tuple[bytes, _Gen, Any, Any]] = []
        self._dumped(group, replies, 0, per, got, dump=True)
        entries, nbytes = self._entries(db, got, now_ms)
        await out.put(Batch(entries, ckpt, nbytes, len(entries)))
        return len(got)

    async def _roundtrip(self, parts: list[bytes], n: int) -> list[Any]:
        """Send pre-encoded commands at once; return their n replies."""
        if not n:
            return []
        conn = self.conn
        conn.send(b"".join(parts))
        await conn.drain()
        return await conn.read_replies(n)

    def _keys(self, reply: Any, gens: deque[_Gen]) -> tuple[list[tuple[bytes, _Gen]], int]:
        """The keys of a SCAN reply (filtered), tagged with their generation; the cursor."""
        keys = reply[1]
        flt = self.spec.filter
        if flt.by_key:
            keys = [k for k in keys if flt.key_ok(k)]
        gen = _Gen(int(reply[0]), len(keys))
        gens.append(gen)
        return [(k, gen) for k in keys], gen.cursor

    def _dumped(self, keys: list[Any], replies: list[Any], i: int, per: int,
                got: list[tuple[bytes, _Gen, Any, Any]], *, dump: bool
                ) -> list[tuple[bytes, _Gen]]:
        """Collect DUMP (or GETRANGE) replies [+ PTTL] from ``replies[i:]`` into ``got``.

        Keys gone meanwhile are finished here. For GETRANGE, return the keys that are not
        settled by it (not strings, long strings, ambiguous empty replies)."""
        again: list[tuple[bytes, _Gen]] = []
        for j, item in enumerate(keys):
            k, g = item[0], item[1]
            value = replies[i + per * j]
            pttl = replies[i + per * j + 1] if per == 2 else None
            if pttl.__class__ is ReplyError:
                raise refused(self.conn, "PTTL", pttl)
            if value.__class__ is ReplyError:
                if dump:
                    raise refused(self.conn, "DUMP", value)
                if str(value).startswith("WRONGTYPE"):
                    self._others += 1
                else:
                    log.warning("%s: GETRANGE refused (%s): every key is sized and dumped",
                                self.conn.name, value)
                    self.probe_allowed = self.probing = False
                again.append((k, g))
                continue
            if value is None or pttl == -2:
                g.pending -= 1          # expired or deleted since SCAN saw it
                continue
            if not dump and (len(value) > self.probe_bytes or (not value and pttl is None)):
                again.append((k, g))    # long (size it first) or maybe missing (DUMP says)
                continue
            if not dump or value[0] == 0:
                self._strings += 1
            else:
                self._others += 1
            got.append((k, g, value if dump else (value,), pttl))
        if self._strings + self._others > 4096:     # weigh the recent keys most
            self._strings >>= 1
            self._others >>= 1
        return again

    async def _add_ttls(self, got: list[tuple[bytes, _Gen, Any, Any]]
                        ) -> list[tuple[bytes, _Gen, Any, Any]]:
        """PTTL for keys read without one."""
        replies = await self._roundtrip([PTTL % (len(k), k) for k, _, _, _ in got], len(got))
        out = []
        for (k, g, value, _), pttl in zip(got, replies):
            if pttl.__class__ is ReplyError:
                raise refused(self.conn, "PTTL", pttl)
            if pttl == -2:
                g.pending -= 1
            else:
                out.append((k, g, value, pttl))
        return out

    def _budget(self, keys: list[tuple[bytes, _Gen, int | None]]
                ) -> list[list[tuple[bytes, _Gen, int | None]]]:
        """Split keys to dump into groups whose estimated DUMP bytes fit a round trip."""
        if not keys:
            return []
        total = sum(s or 0 for _, _, s in keys)
        if total <= DUMP_BUDGET:
            return [keys]
        groups: list[list[tuple[bytes, _Gen, int | None]]] = [[]]
        acc = 0
        for item in keys:
            est = item[2] or 0
            if groups[-1] and acc + est > DUMP_BUDGET:
                groups.append([])
                acc = 0
            groups[-1].append(item)
            acc += est
        return groups

    def _entries(self, db: int, got: list[tuple[bytes, _Gen, Any, Any]],
                 now_ms: int) -> tuple[list[Entry], int]:
        """RESTOREs for dumped keys and strings with a TTL, MSET groups for the others.

        A probed string's value comes wrapped in a 1-tuple (a DUMP payload does not)."""
        entries: list[Entry] = []
        pairs: list[bytes] = []
        pair_bytes = nbytes = 0
        for k, g, value, pttl in got:
            g.pending -= 1
            g.queued += 1
            if value.__class__ is tuple:
                v = value[0]
                if pttl is None or pttl < 0:
                    pairs += (k, v)
                    pair_bytes += len(v)
                    if len(pairs) >= 2 * MSET_KEYS or pair_bytes >= MSET_BYTES:
                        entries.append((STRINGS, db, pairs, len(pairs) // 2, pair_bytes))
                        nbytes += pair_bytes
                        pairs, pair_bytes = [], 0
                    continue
                if self.rewriter is not None:
                    nbytes += self.rewriter.string(db, k, v, now_ms + pttl, self.replace,
                                                   entries)
                    self._rewritten(len(v))
                    continue
                value = string_payload(v)
            expire = now_ms + pttl if pttl is not None and pttl >= 0 else 0
            if self.rewriter is not None:
                nbytes += self.rewriter.key(db, k, value, expire, self.replace, entries)
                self._rewritten(len(value))
                continue
            entries.append((RESTORE, db, k, expire, value))
            nbytes += len(value)
        if pairs:
            entries.append((STRINGS, db, pairs, len(pairs) // 2, pair_bytes))
            nbytes += pair_bytes
        return entries, nbytes

    def _rewritten(self, size: int) -> None:
        # The writer counts RESTOREs as keys; a key written as commands counts once queued.
        self.progress.keys_done += 1
        self.progress.snapshot_bytes += size

    # --- big keys ---------------------------------------------------------------------------

    async def _copy_big(self, db: int, key: bytes, estimate: int,
                        out: asyncio.Queue[Batch | None], ckpt: dict[str, Any]) -> int:
        """Copy one big key in chunks; start over (twice at most) when it changes type.
        Return 1 when the key was queued, 0 when it was gone or kept changing."""
        for attempt in range(3):
            try:
                return await self._copy_big_once(db, key, estimate, out, ckpt)
            except _Changed as exc:
                log.info("%s: big key %r changed during its copy (%s)%s", self.conn.name,
                         key[:80], exc, "; copying it again" if attempt < 2 else "; skipped")
        return 0

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
                             out: asyncio.Queue[Batch | None], ckpt: dict[str, Any]) -> int:
        kind_raw = (await self._call([b"TYPE", key]))[0]
        kind = kind_raw.decode() if isinstance(kind_raw, bytes) else str(kind_raw)
        length_cmd = {"string": b"STRLEN", "list": b"LLEN", "hash": b"HLEN", "set": b"SCARD",
                      "zset": b"ZCARD", "stream": b"XLEN"}.get(kind)
        if kind == "none":
            return 0
        if length_cmd is None:   # a module type: whole DUMP, as for small keys
            return await self._dump_group(db, [(key, _Gen(0, 1), None)], True, out, ckpt)
        length = int((await self._call([length_cmd, key]))[0])
        b = BigKey(db, key, kind, task_id=self.spec.task_id,
                   replace=self.replace,
                   size=length if kind == "string" else 0,
                   chunk_bytes=self.chunk_bytes, chunk_elements=self.chunk_elements,
                   stream_counters=self.plan.stream_counters)
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
        return 1

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
