"""Act as a replica of the source: PSYNC, split the RDB into RESTOREs, then follow the
replication stream command by command, tracking the replication offset exactly.

The reader emits batches whose checkpoint is a ``StreamPos`` (replid, offset, db): the
offset of the last byte the batch covers and the db selected at that point. A batch never
ends inside a MULTI/EXEC block of the source.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import hiredis

from ..compat import RESTORE_PLAN, CommandRefused, WritePlan, translate
from ..entry import COMMAND, RAW, RESTORE, STRINGS, Batch, Entry, restore_entry, string_payload
from ..errors import EndpointError, FatalTaskError
from ..progress import Progress
from ..rdb import (
    BigValueChunk,
    BigValueEnd,
    BigValueStart,
    FunctionRecord,
    KeyRecord,
    RdbError,
    RdbSplitter,
)
from ..resp import Connection, ServerReplyError, encode
from ..spec import TaskSpec
from ..topology import key_slot
from .bigkey import BIG_VALUE_BYTES, CHUNK_BYTES, CHUNK_ELEMENTS, BigKey
from .keys import CommandFilter
from .rewrite import Rewriter
from .splitproc import RdbFeed

if TYPE_CHECKING:
    from ..handoff import Handoff

log = logging.getLogger("cdcd.reader.psync")

READ_CHUNK = 1 << 18
BATCH_ENTRIES = 2048
BATCH_BYTES = 1 << 20
# A stream read shorter than this waits COALESCE_S before the next read.
TRICKLE_BYTES = 4096
COALESCE_S = 0.002
STREAM_MIN_TIMEOUT = 15.0  # the master PINGs every 10 s (repl-ping-replica-period)
HANDSHAKE_TIMEOUT = 30.0
ACK_EVERY = 1.0


class PsyncRefused(FatalTaskError):
    """The source will not act as our master (ACL, unknown command on managed services)."""


@dataclass(frozen=True, kw_only=True)
class StreamPos:
    replid: str
    offset: int
    db: int
    # Where the last command that could change data ended (-1: unknown). Past it the
    # stream held only PINGs, REPLCONFs and heartbeats: a source that failed over to a
    # replica which never got those can still continue from ``data``.
    data: int = -1
    # A cluster source: which shard's stream (its key in the checkpoint), "" otherwise.
    shard: str = ""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"replid": self.replid, "offset": self.offset, "db": self.db}
        if self.data >= 0:
            out["data"] = self.data
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> StreamPos | None:
        if not d or not d.get("replid"):
            return None
        return cls(replid=str(d["replid"]), offset=int(d["offset"]), db=int(d.get("db", 0)),
                   data=int(d.get("data", -1)))


# Commands of the stream that need more than forwarding (the rest go by the fast path).
STREAM_SPECIAL = frozenset((b"select", b"publish", b"ping", b"replconf", b"multi", b"exec",
                            b"eval", b"evalsha", b"script"))


# Commands CommandFilter.apply may rewrite even when it filters nothing.
NEEDS_FILTER = frozenset((b"flushall", b"swapdb", b"move", b"copy"))
# Commands of the stream without keys: never held (handoff.py) when forwarded raw.
RAW_UNGATED = frozenset((b"select", b"ping", b"replconf", b"multi", b"exec", b"publish"))


def command_size(args: list[bytes]) -> int:
    """Bytes a command takes in the replication stream (the master sends canonical RESP).

    Written without bytes formatting: this runs once per replicated command.
    """
    n = 4 if len(args) < 10 else len(b"*%d\r\n" % len(args))
    for a in args:
        size = len(a)
        n += size + (6 if size < 10 else 7 if size < 100 else 8 if size < 1000
                     else len(b"$%d\r\n" % size) + 2)
    return n


class PsyncReader:
    """One replica link to one source node.

    Callbacks: ``on_full_sync(replid, offset)`` before the RDB is applied (the task resets
    snapshot progress and counts a resync), ``on_stream()`` when the RDB is done and the
    command stream begins.
    """

    def __init__(self, spec: TaskSpec, progress: Progress, *, resume: StreamPos | None,
                 host: str, port: int, rdb_only: bool = False, resync: bool = False,
                 on_full_sync: Callable[[str, int], None] = lambda r, o: None,
                 on_stream: Callable[[], None] = lambda: None,
                 after_rdb: Callable[[set[int] | None], Awaitable[None]] | None = None,
                 parse: bool = False, plan: WritePlan = RESTORE_PLAN) -> None:
        self.spec = spec
        # How the RDB's values are written: RESTORE of their payloads, or commands.
        self.plan = plan
        self._rewriter: Rewriter | None = None    # replicated RESTOREs, when rewriting
        self.progress = progress
        self.resume = resume
        self.host = host
        self.port = port
        self.rdb_only = rdb_only
        self.on_full_sync = on_full_sync
        self.on_stream = on_stream
        # Called once the RDB is queued, before the stream: with the hashes of the keys
        # the RDB held when the task had copied data before (a resync), else None.
        self.after_rdb = after_rdb
        # Parse every command (never forward the source's bytes): a cluster target routes
        # each by slot and needs each command's end offset.
        self.parse = parse
        # A full sync is a resync (stale target keys are removed after it) when the task
        # copied data before: asked to (``resync``), or the source refused to continue.
        self.resync = resync
        self.resyncing = False
        # Whether big keys rebuilt by this reader replace the target's (the writer's rule).
        self.replace = spec.existing_keys != "skip"
        self.timeout = float(spec.link_timeout_s)
        self.name = f"source {host}:{port}"
        # A cluster source resharded while it runs (handoff.py): asked before each command
        # and RDB record of this shard (``shard``) whose slot moved lately.
        self.gate: Handoff | None = None
        # Called before a raw stream gives up on a transaction it must hold: the next
        # attempt parses every command (only parsed transactions are held whole).
        self.parse_next_time: Callable[[], None] = lambda: None
        # A snapshot batch ends at this many entries or bytes. The shards of a cluster
        # source share one event loop: smaller batches keep each writer step short, and
        # the API answering while they run (the benchmark's API p99 row).
        self.rdb_batch = (BATCH_ENTRIES, BATCH_BYTES)
        self.shard = ""
        self.read_at = 0.0        # when the last bytes were read (monotonic)
        self.replid = ""
        self.offset = 0           # offset of the last byte consumed from the stream
        self.data_offset = -1     # where the last command that may change data ended
        self.db = 0
        self.applied = 0          # offset the target has acknowledged (sent in REPLCONF ACK)
        self.conn: Connection | None = None
        self.filter = CommandFilter(spec)
        self.scripts: dict[bytes, bytes] = {}
        self.pending: deque[tuple[int, float]] = deque()   # (offset, read at) not applied
        self.heartbeats: deque[tuple[int, float]] = deque()  # (offset, published at)
        self.heartbeat_channel = b"__cdcd_heartbeat__:" + spec.task_id.encode()
        self.nonce = uuid.uuid4().hex[:12].encode()   # ignore beats of an earlier process
        self.measured = False
        self.getack = False
        self._buf = b""

    # --- the link ---------------------------------------------------------------------------

    async def run(self, out: asyncio.Queue[Batch | None]) -> None:
        conn = await Connection.open(self.host, self.port, role="source", ep=self.spec.source)
        self.conn = conn
        try:
            full = await self._handshake(conn)
            if full:
                await self._read_rdb(conn, out)
                if self.rdb_only:
                    await out.put(None)
                    return
            self.on_stream()
            async with asyncio.TaskGroup() as tg:
                acker = tg.create_task(self._ack_loop(conn))
                try:
                    await self._stream(conn, out)
                finally:
                    acker.cancel()
        finally:
            conn.close()

    async def _handshake(self, conn: Connection) -> bool:
        """Ask for a partial resync from the checkpoint; return True for a full resync."""
        listen = conn.writer.get_extra_info("sockname")
        try:
            await conn.call("REPLCONF", "listening-port", listen[1] if listen else 0,
                            timeout=HANDSHAKE_TIMEOUT)
            await conn.call("REPLCONF", "capa", "eof", "capa", "psync2",
                            timeout=HANDSHAKE_TIMEOUT)
        except ServerReplyError as exc:
            raise PsyncRefused(f"{self.name}: refuses to replicate to us: {exc.reply}") from exc
        self.progress.status = ("waiting for the source to answer PSYNC (a full sync starts "
                                "once its fork begins: repl-diskless-sync-delay, a BGSAVE "
                                "in progress)")
        if self.resume is not None:
            psync = encode(["PSYNC", self.resume.replid, str(self.resume.offset + 1)])
        else:
            psync = encode(["PSYNC", "?", "-1"])
        conn.send(psync)
        await conn.drain()
        line = await self._line(conn)
        if line.startswith(b"+FULLRESYNC"):
            parts = line.split()
            if len(parts) < 3:
                raise EndpointError(f"{self.name}: malformed reply {line[:100]!r}")
            self.replid, self.offset = parts[1].decode(), int(parts[2])
            self.db = 0
            self.resyncing = self.resync or self.resume is not None
            log.info("%s: full resync from %s offset %d", self.name, self.replid, self.offset)
            self.on_full_sync(self.replid, self.offset)
            return True
        if line.startswith(b"+CONTINUE"):
            assert self.resume is not None
            parts = line.split()
            self.replid = parts[1].decode() if len(parts) > 1 else self.resume.replid
            self.offset = self.resume.offset
            self.db = self.resume.db
            self.data_offset = self.resume.data
            self.applied = self.offset
            log.info("%s: partial resync continues at offset %d", self.name, self.offset + 1)
            return False
        text = line.decode(errors="replace")
        if line.startswith(b"-NOPERM") or "unknown command" in text.lower() or \
                line.startswith(b"-NOAUTH"):
            raise PsyncRefused(f"{self.name}: refuses PSYNC: {text[1:]}")
        raise EndpointError(f"{self.name}: PSYNC failed: {text[1:] if text else 'no reply'}")

    async def _line(self, conn: Connection) -> bytes:
        """Read one status line, skipping the bare newlines a master sends as keep-alives."""
        while True:
            line = await self._io(conn.reader.readline(), HANDSHAKE_TIMEOUT * 4,
                                  "no answer to PSYNC")
            if not line:
                raise EndpointError(f"{self.name}: connection closed during the handshake")
            line = line.strip(b"\r\n")
            if line:
                return line

    async def _io(self, op: Awaitable[bytes], timeout: float, silent: str) -> bytes:
        """Await a socket read, turning a timeout or a socket error into EndpointError."""
        try:
            async with asyncio.timeout(timeout):   # not wait_for: see resp.py
                return await op
        except TimeoutError:
            raise EndpointError(f"{self.name}: {silent}") from None
        except (ConnectionError, OSError) as exc:
            raise EndpointError(f"{self.name}: connection lost: {exc}") from exc

    async def _read(self, conn: Connection, n: int = READ_CHUNK) -> bytes:
        # The master PINGs every repl-ping-replica-period (10 s): silence for longer than
        # link_timeout_s (like the master's own repl-timeout) means a dead link.
        timeout = max(self.timeout, STREAM_MIN_TIMEOUT)
        self.read_at = time.monotonic()
        data = await self._io(conn.reader.read(n), timeout,
                              f"no data for {timeout:g}s (link dead or source stuck)")
        if not data:
            raise EndpointError(f"{self.name}: connection closed by the source")
        return data

    # --- the RDB ----------------------------------------------------------------------------

    # A value bigger than this in the RDB is decoded as it arrives and written in chunks
    # through a temporary key (readers/bigkey.py); class attributes, so that a test can
    # lower them on one reader.
    big_value_bytes = BIG_VALUE_BYTES
    chunk_bytes = CHUNK_BYTES
    chunk_elements = CHUNK_ELEMENTS

    async def _read_rdb(self, conn: Connection, out: asyncio.Queue[Batch | None]) -> None:
        header = await self._line(conn)
        if not header.startswith(b"$"):
            raise EndpointError(f"{self.name}: expected an RDB, got {header[:80]!r}")
        self.progress.status = "receiving the source's RDB"
        spec = self.spec
        gate = self.gate
        held = False            # the record just read is held (handoff.py)
        # write_mode rewrite: the splitter's KeyRecords become commands, else each key is
        # a RESTORE entry built by the splitter itself.
        rewriter = (Rewriter(self.plan, spec, self.progress, source=self.name,
                             chunk_bytes=self.chunk_bytes,
                             chunk_elements=self.chunk_elements)
                    if self.plan.rewrite else None)
        splitter = RdbSplitter(want=spec.filter.rdb_want(), big_value_bytes=self.big_value_bytes,
                               key_record=None if rewriter is not None else restore_entry)
        big: BigKey | None = None     # the big value being copied in chunks
        big_expire = 0
        eof_mark: bytes | None = None
        remaining = -1
        if header.startswith(b"$EOF:"):
            eof_mark = header[5:]
            if len(eof_mark) != 40:
                raise EndpointError(f"{self.name}: bad diskless EOF mark {header!r}")
        else:
            remaining = int(header[1:])
        entries: list[Entry] = []
        nbytes = 0
        seen: set[int] | None = set() if self.resyncing else None
        feed = RdbFeed(self, conn, splitter, remaining)
        try:
            while (records := await feed.next()) is not None:
                # Key records are entry tuples here (key_record=restore_entry), and a
                # helper's plain strings STRINGS entries (splitproc.py; only a helper makes
                # them).
                if gate is not None and feed.helper_pid:
                    records = self._strings_clear(records, gate)
                for rec in records:
                    if type(rec) is tuple and rec[0] == STRINGS:
                        entries.append(rec)
                        nbytes += rec[4]
                        if seen is not None:
                            pairs = rec[2]
                            for i in range(0, len(pairs), 2):
                                seen.add(key_hash(rec[1], pairs[i]))
                        continue
                    if gate is not None and type(rec) is not BigValueChunk:
                        key = rec[2] if type(rec) is tuple else getattr(rec, "key", None)
                        if key is not None and \
                                not gate.clear(self.shard, key_slot(key), self.offset):
                            # a key in a slot moving between shards: held (handoff.py)
                            if entries:
                                await out.put(Batch(entries, None, nbytes, len(entries)))
                                entries, nbytes = [], 0
                            held = True
                    if type(rec) is tuple:     # (RESTORE, db, key, expire_ms, payload)
                        entries.append(rec)
                        nbytes += len(rec[4])
                        if seen is not None:
                            seen.add(key_hash(rec[1], rec[2]))
                    elif type(rec) is BigValueChunk:
                        assert big is not None
                        nbytes += big.add_chunk(rec.items, entries)
                    elif type(rec) is KeyRecord:
                        assert rewriter is not None
                        nbytes += rewriter.snapshot_key(rec.db, rec.key, rec.rdb_type,
                                                        rec.payload, rec.expire_ms,
                                                        self.replace, entries)
                        if seen is not None:
                            seen.add(key_hash(rec.db, rec.key))
                    elif isinstance(rec, FunctionRecord):
                        if spec.functions == "skip":
                            continue
                        entries.append((COMMAND, 0, [b"FUNCTION", b"LOAD", b"REPLACE",
                                                     rec.code]))
                    elif isinstance(rec, BigValueStart):
                        if seen is not None:
                            seen.add(key_hash(rec.db, rec.key))
                        big = BigKey(rec.db, rec.key, rec.kind, task_id=spec.task_id,
                                     replace=self.replace, size=rec.size,
                                     chunk_bytes=self.chunk_bytes,
                                     chunk_elements=self.chunk_elements,
                                     stream_counters=self.plan.stream_counters)
                        big_expire = max(rec.expire_ms, 0)
                        nbytes += big.begin(entries)
                    elif isinstance(rec, BigValueEnd):
                        assert big is not None
                        nbytes += big.finish(big_expire, entries, rec.stream)
                        self._big_copied(big)
                        # Send the tail now: the batch with the stream position is wrapped
                        # in the writer's MULTI, and the tail may hold a MULTI of its own.
                        await out.put(Batch(entries, None, nbytes, len(entries)))
                        entries, nbytes, big = [], 0, None
                    if held:
                        # the held key alone, so that what follows is not held with it
                        await out.put(Batch(entries, None, nbytes, len(entries)),  # type: ignore[call-arg]
                                      True, self.read_at)
                        entries, nbytes, held = [], 0, False
                if len(entries) >= self.rdb_batch[0] or nbytes >= self.rdb_batch[1]:
                    await out.put(Batch(entries, None, nbytes, len(entries)))
                    entries, nbytes = [], 0
        except RdbError as exc:
            raise FatalTaskError(f"{self.name}: cannot parse the RDB: {exc}") from exc
        finally:
            await feed.close()
        rest = feed.take_rest() + self._buf
        if eof_mark is not None:
            while len(rest) < 40:
                rest += await self._read(conn)
            if rest[:40] != eof_mark:
                raise EndpointError(f"{self.name}: diskless RDB did not end with its EOF mark")
            rest = rest[40:]
        self._buf = rest
        self.progress.keys_total = max(self.progress.keys_total, feed.keys_seen)
        self.data_offset = self.offset
        pos = StreamPos(replid=self.replid, offset=self.offset, db=0, data=self.offset)
        if rewriter is not None and entries:
            # Rewritten keys hold MULTIs of their own; the batch with the stream position
            # is wrapped in the writer's.
            await out.put(Batch(entries, None, nbytes, len(entries)))
            entries, nbytes = [], 0
        await out.put(Batch(entries, pos, nbytes, len(entries)))
        if self.after_rdb is not None:
            await self.after_rdb(seen)

    def _big_copied(self, big: BigKey) -> None:
        # The writer counts RESTOREs as keys; a chunked key is counted here, once queued.
        self.progress.keys_done += 1
        self.progress.snapshot_bytes += big.bytes
        log.info("%s: big %s %r (db %d) copied in chunks: %d elements, %d bytes", self.name,
                 big.kind, big.key[:80], big.db, big.elements, big.bytes)

    # --- the command stream -----------------------------------------------------------------

    async def _ack_loop(self, conn: Connection) -> None:
        """Tell the master how far we are, every second, so it never drops the link."""
        while True:
            conn.send(encode(["REPLCONF", "ACK", str(self.applied)]))
            await conn.drain()
            await asyncio.sleep(ACK_EVERY)

    async def _stream(self, conn: Connection, out: asyncio.Queue[Batch | None]) -> None:
        """Turn the command stream into batches, each ending on a command boundary.

        Without a key filter or db mapping the batch forwards the source's own bytes (one
        RAW entry of byte ranges between the commands we drop: PING, REPLCONF, MULTI/EXEC,
        heartbeats); otherwise each command becomes a COMMAND entry, filtered and mapped.
        """
        parser = hiredis.Reader()
        gets = parser.gets
        trivial = self.filter.trivial
        # Commands the target lacks (an older server): each is parsed and translated.
        fixes = self.plan.fixes
        if self.spec.functions == "skip":
            fixes |= {b"function"}       # dropped (see _translate)
        if self.plan.rewrite:
            fixes |= {b"restore", b"restore-asking"}     # payloads the target refuses
        raw = trivial and not self.parse and not fixes
        start = self.offset     # offset where the current batch began
        buf = bytearray()       # with raw: the stream's bytes from ``start`` on
        if self._buf:
            parser.feed(self._buf)
            if raw:
                buf += self._buf
            self._buf = b""
        received = self.offset + len(buf)
        entries: list[Entry] = []
        pieces: list[tuple[int, int] | bytes] = []   # raw: byte ranges and rewritten commands
        span = start            # raw: where the run of forwarded commands began
        replies = 0             # raw: commands forwarded (each gets a reply)
        ops = 0
        start_db = self.db
        in_multi: list[Entry] | None = None
        multi_at = multi_data = 0       # where a MULTI began, data_end before it
        multi_held = False              # a command of the MULTI waits (handoff.py)
        gate = self.gate
        shard = self.shard              # a cluster source's shard: no FLUSHALL of its own
        data_end = self.data_offset
        flt = self.filter
        beat = self.heartbeat_channel
        trickle = False
        offset = self.offset
        while True:
            args = gets()
            if args is False:
                if offset != start and in_multi is None:
                    if raw:
                        if span < offset:
                            pieces.append((span, offset))
                        entries = self._raw_entry(buf, start, pieces, start_db, replies, ops,
                                                  self.db)
                        del buf[:offset - start]
                        pieces, span, replies, ops, start_db = [], offset, 0, 0, self.db
                    self.offset = start = offset
                    self.data_offset = data_end
                    await self._emit(out, entries)
                    entries = []
                if trickle:
                    # A trickle of writes: let a few milliseconds of them gather in the socket,
                    # so that many light tasks do not each pay a transaction on the target per
                    # command (a busy stream, whose reads come back full, never waits here).
                    await asyncio.sleep(COALESCE_S)
                data = await self._read(conn)
                trickle = len(data) < TRICKLE_BYTES
                parser.feed(data)
                if raw:
                    buf += data
                received += len(data)
                if received > self.progress.source_offset:
                    self.progress.source_offset = received
                continue
            if args.__class__ is not list or not args:
                raise EndpointError(f"{self.name}: unexpected data in the stream: "
                                    f"{str(args)[:80]}")
            begin = offset
            offset += command_size(args)
            name = args[0].lower()
            if shard and (name == b"flushall" or name == b"flushdb"):
                raise self._flush_refused(name)
            if raw and gate is not None and name not in RAW_UNGATED and \
                    not gate.clear_command(self.shard, args, offset):
                if in_multi is not None:
                    # (a transaction held whole needs its commands parsed: next time)
                    self.parse_next_time()
                    raise EndpointError(f"{self.name}: a transaction in a slot moving "
                                        f"between shards: reading the shards command by "
                                        f"command from now on")
                # The run of forwarded bytes ends before this command, which goes on its
                # own, held until the slot's previous owner is ahead of it (handoff.py).
                if span < begin:
                    pieces.append((span, begin))
                entries = self._raw_entry(buf, start, pieces, start_db, replies, ops, self.db)
                del buf[:offset - start]
                self.offset = begin
                self.data_offset = data_end
                await self._emit(out, entries)
                if name == b"restore-asking":
                    args = [b"RESTORE", *args[1:]]
                elif name == b"eval" or name == b"evalsha" or name == b"script":
                    args = self._script(args)
                pieces, span, replies, ops, start_db = [], offset, 0, 0, self.db
                self.offset = start = offset
                self.data_offset = data_end = offset
                await self._emit(out, [(COMMAND, self.db, args, offset)], held=True)
                entries = []
                continue
            if raw and name not in STREAM_SPECIAL:
                ops += 1            # forwarded as the source sent it
                replies += 1
                data_end = offset
                continue
            if name == b"select":
                self.db = int(args[1])
                replies += 1        # forwarded as it is when raw
                continue
            if name == b"publish" and len(args) == 3 and args[1] == beat:
                self.offset = offset
                self._beat(args[2])
            elif name == b"ping" or name == b"replconf":
                if name == b"replconf" and len(args) > 1 and args[1].lower() == b"getack":
                    conn.send(encode(["REPLCONF", "ACK", str(self.applied)]))
                    self.getack = True   # answer again once the target has caught up
            elif name == b"multi":
                in_multi = []
                multi_at, multi_data, multi_held = begin, data_end, False
                data_end = offset
            elif name == b"exec":
                if in_multi is not None and multi_held:
                    # The transaction is held (handoff.py): what comes before it goes on,
                    # in a batch of its own; the transaction is a batch of its own.
                    if multi_at != start:
                        self.offset = start = multi_at
                        self.data_offset = multi_data
                        await self._emit(out, entries)
                        entries = []
                    self.offset = start = offset
                    self.data_offset = data_end = offset
                    await self._emit(out, in_multi, held=True)
                    in_multi = None
                    continue
                data_end = offset
                if in_multi is not None:
                    entries.extend(in_multi)
                in_multi = None
            elif raw:
                ops += 1
                replies += 1
                if name != b"publish":      # (Sentinel's hellos: no data either)
                    data_end = offset
                if name == b"eval" or name == b"evalsha" or name == b"script":
                    rewritten = self._script(args)
                    if rewritten is not args:
                        pieces += [(span, begin), encode(rewritten)]
                        span = offset
                continue
            else:
                held = False
                if gate is not None and not gate.clear_command(self.shard, args, offset):
                    if in_multi is not None:
                        multi_held = True
                    else:
                        # A slot moving between shards: this command is held (handoff.py),
                        # in a batch of its own; the events before it go on.
                        held = True
                        if begin != start:
                            self.offset = start = begin
                            self.data_offset = data_end
                            await self._emit(out, entries)
                            entries = []
                if name == b"restore-asking":
                    args = [b"RESTORE", *args[1:]]    # (a MIGRATE's copy, applied anywhere)
                if name != b"publish":
                    data_end = offset
                if name == b"eval" or name == b"evalsha" or name == b"script":
                    args = self._script(args)
                target = in_multi if in_multi is not None else entries
                for args in (self._translate(args) if name in fixes else (args,)):
                    if trivial and name not in NEEDS_FILTER:
                        target.append((COMMAND, self.db, args, offset))
                    else:
                        for db, cmd in flt.apply(self.db, args):
                            target.append((COMMAND, db, cmd, offset))
                if in_multi is None and (held or len(entries) >= BATCH_ENTRIES or
                                         offset - start >= BATCH_BYTES):
                    self.offset = start = offset
                    self.data_offset = data_end
                    await self._emit(out, entries, held)
                    entries = []
                continue
            # A command cdcd consumes itself: the raw run of forwarded bytes ends before it.
            if raw:
                if span < begin:
                    pieces.append((span, begin))
                span = offset

    def _flush_refused(self, name: bytes) -> FatalTaskError:
        return FatalTaskError(
            f"{self.name}: {name.decode().upper()} on one shard of the source cluster: "
            f"applied on the target it would also empty the other shards' keys, and cdcd "
            f"does not yet empty one shard's slots alone; resync the task to copy the "
            f"source again")

    @staticmethod
    def _raw_entry(buf: bytearray, start: int, pieces: list[tuple[int, int] | bytes],
                   db: int, replies: int, ops: int, end_db: int) -> list[Entry]:
        """Cut the forwarded byte ranges out of ``buf`` (which begins at offset ``start``)."""
        if not replies:
            return []
        segments = [bytes(buf[p[0] - start:p[1] - start]) if isinstance(p, tuple) else p
                    for p in pieces if not isinstance(p, tuple) or p[0] < p[1]]
        return [(RAW, db, segments, replies, ops, end_db)]

    async def _emit(self, out: asyncio.Queue[Batch | None], entries: list[Entry],
                    held: bool = False) -> None:
        pos = StreamPos(replid=self.replid, offset=self.offset, db=self.db,
                        data=self.data_offset)
        self.pending.append((self.offset, time.monotonic()))
        if held:    # (out is the shard's ShardGate: handoff.py)
            await out.put(Batch(entries, pos, 0, 0), True, self.read_at)  # type: ignore[call-arg]
        else:
            await out.put(Batch(entries, pos, 0, 0))
        await asyncio.sleep(0)   # let the API and other tasks in between batches

    def _translate(self, args: list[bytes]) -> list[list[bytes]]:
        """The commands an older target takes for a replicated one (cdcd.compat), or a
        FatalTaskError naming the command it has no equivalent for."""
        name = args[0].lower()
        if self.spec.functions == "skip" and name == b"function":
            return []
        if name == b"restore" or name == b"restore-asking":
            if self._rewriter is None:
                self._rewriter = Rewriter(self.plan, self.spec, self.progress, source=self.name)
            return self._rewriter.restore_command(self.db, args)
        assert self.plan.target is not None
        try:
            return translate(args, self.plan.target)
        except CommandRefused as exc:
            shown = b" ".join(a[:40] for a in args[:3]).decode(errors="replace")
            raise FatalTaskError(f"{self.name}: replicated command {shown!r} cannot be "
                                 f"applied to the target: {exc}") from None

    def _script(self, args: list[bytes]) -> list[bytes]:
        """Remember script bodies so a verbatim EVALSHA can be sent as EVAL."""
        name = args[0].lower()
        if name == b"eval" and len(args) > 1:
            self.scripts[hashlib.sha1(args[1]).hexdigest().encode()] = args[1]
        elif name == b"script" and len(args) > 2 and args[1].lower() == b"load":
            self.scripts[hashlib.sha1(args[2]).hexdigest().encode()] = args[2]
        elif name == b"evalsha" and len(args) > 1:
            body = self.scripts.get(args[1].lower())
            if body is not None:
                return [b"EVAL", body, *args[2:]]
        return args

    def heartbeat(self) -> list[bytes]:
        """A PUBLISH that travels through the stream and times it end to end.

        PUBLISH is replicated but stores nothing, so it leaves nothing behind on the
        source or the target; the reader recognises it and never applies it.
        """
        return [b"PUBLISH", self.heartbeat_channel,
                b"%s %d" % (self.nonce, time.monotonic_ns())]

    def acked(self, pos: StreamPos) -> None:
        """The target holds everything up to ``pos``: update ACKs and the measured lag."""
        self.applied = pos.offset
        if self.getack and self.conn is not None:
            # Someone runs WAIT on the source: tell it now, not at the next periodic ACK.
            self.getack = False
            self.conn.send(encode(["REPLCONF", "ACK", str(self.applied)]))
        now = time.monotonic()
        beat = None
        while self.heartbeats and self.heartbeats[0][0] <= pos.offset:
            beat = self.heartbeats.popleft()
        if beat is not None:
            self.progress.lag_ms = max(0.0, (now - beat[1]) * 1000)
            self.measured = True
        batch = None
        while self.pending and self.pending[0][0] <= pos.offset:
            batch = self.pending.popleft()
        if batch is not None and not self.measured:
            # No heartbeat seen (PUBLISH refused): time from reading a batch to applying it.
            self.progress.lag_ms = (now - batch[1]) * 1000

    def _strings_clear(self, records: list[Any], gate: Handoff) -> list[Any]:
        """``records`` with each STRINGS entry holding a key of a slot moving between shards
        (held, handoff.py) turned back into a RESTORE per key, which the gate can hold."""
        out: list[Any] = []
        for rec in records:
            if type(rec) is tuple and rec[0] == STRINGS:
                db, pairs = rec[1], rec[2]
                if not all(gate.clear(self.shard, key_slot(pairs[i]), self.offset)
                           for i in range(0, len(pairs), 2)):
                    out += [(RESTORE, db, pairs[i], 0, string_payload(pairs[i + 1]))
                            for i in range(0, len(pairs), 2)]
                    continue
            out.append(rec)
        return out

    def _beat(self, payload: bytes) -> None:
        nonce, _, stamp = payload.partition(b" ")
        if nonce == self.nonce and stamp.isdigit():
            self.heartbeats.append((self.offset, int(stamp) / 1e9))


def key_hash(db: int, key: bytes) -> int:
    """A compact stand-in for (db, key) in the set of keys a resync RDB holds."""
    return hash((db, key))
