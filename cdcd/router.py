"""Write to a Redis Cluster target: a router in front of one ``Writer`` per master.

Every entry goes to the master serving its key's slot (CRC16 of the key or its {hash
tag}); a group of plain strings becomes one MSET per slot; a MULTI/EXEC block (a big key
put into place) goes whole to the slot of its keys, which share one slot by construction
(readers/bigkey.py tags the temporary key); FUNCTION LOAD goes to every master. The
masters are written in parallel, each through its own pipelined connection, and a batch
is acknowledged once every master has acknowledged its part of it and of every batch
before it, so a checkpoint never claims more than the cluster holds.

The command stream (an incremental task) goes per slot: each slot's part of a batch is one
MULTI/EXEC that ends by setting the slot's marker (markers.SlotMarkers), so after any
crash every slot says exactly which commands it holds and a replay skips those. A command
whose keys span slots (crossslot.py) is a barrier: everything before it is acknowledged,
then it is applied from the target's own state, destination first, slot by slot.

A MOVED, ASK, TRYAGAIN or CLUSTERDOWN reply means the cluster's shape changed under the
copy (a resharding, a failover): the transaction holding it was not applied, the writer
raises a retryable error (TopologyChanged) and the task goes on from its checkpoint with
the cluster's new shape, the slot markers keeping the replay exact.
"""

from __future__ import annotations

import asyncio
import time
from binascii import crc_hqx
from collections import deque
from collections.abc import Callable
from typing import Any

from . import crossslot as cs
from .entry import COMMAND, RAW, RESTORE, STRINGS, Batch, Entry
from .errors import EndpointError, FatalTaskError, TopologyChanged
from .markers import SLOTS, SlotMarkers
from .progress import Progress
from .ratelimit import TokenBucket
from .readers.psync import StreamPos
from .resp import Connection, ReplyError, encode_into, parse_info
from .spec import Endpoint
from .topology import Topology, key_slot
from .writer import AckFn, Writer, show_key

NODE_INFLIGHT = 4
MULTI = b"*1\r\n$5\r\nMULTI\r\n"
EXEC = b"*1\r\n$4\r\nEXEC\r\n"
RETRYABLE = ("OOM", "LOADING", "BUSY", "MASTERDOWN", "READONLY", "TRYAGAIN", "CLUSTERDOWN")
# Where the key is in the commands the snapshot sends (big-key chunks and their MULTI):
# args[1] for all but XGROUP CREATE/CREATECONSUMER key ...
KEY_AT = {b"XGROUP": 2, b"xgroup": 2}


def _to_db0(db: int) -> int:
    return 0


class ClusterRouter:
    """Same interface as ``Writer.run``, over one connection per master."""

    def __init__(self, topology: Topology, ep: Endpoint, *, progress: Progress,
                 replace: bool = True, limiter: TokenBucket | None = None,
                 io_timeout: float | None = None, marks: SlotMarkers | None = None,
                 task_id: str = "", db_map: Callable[[int], int] = _to_db0) -> None:
        self.topology = topology
        self.ep = ep
        self.progress = progress
        self._replace = replace
        self.limiter = limiter
        self.io_timeout = io_timeout
        self.conns: list[Connection] = []
        self.writers: list[Writer] = []
        self.links: list[NodeLink] = []
        self.slot_node = [topology.owner[s] for s in range(len(topology.owner))]
        # The command stream (incremental tasks): slot markers, what each slot already
        # holds on a resume (slot -> offset), whether the next stream position ends a
        # snapshot (then every slot gets its marker), and the source db check.
        self.marks = marks
        self.skip: dict[int, int] = {}
        self.skip_until = -1
        self.mark_all = False
        self.streaming = False
        self.db_map = db_map
        self.tmp_prefix = b"cdcd:tmp:" + task_id.encode() + b":x:"
        self._refresh_at = time.monotonic()
        self._refresh_next = 0
        self._stream_replid = ""
        self._idle = asyncio.Event()

    def resume(self, skip: dict[int, int]) -> None:
        """Resume the stream (no snapshot first): skip, per slot, what its marker holds."""
        self.streaming = True
        self.skip = dict(skip)
        self.skip_until = max(skip.values(), default=-1)

    @property
    def replace(self) -> bool:
        return self._replace

    @replace.setter
    def replace(self, value: bool) -> None:
        self._replace = value
        for w in self.writers:
            w.replace = value

    async def open(self) -> None:
        try:
            for node in self.topology.masters:
                conn = await Connection.open(*node.dial, role="target", ep=self.ep,
                                             io_timeout=self.io_timeout)
                self.conns.append(conn)
                writer = Writer(conn, progress=self.progress, replace=self._replace,
                                db_map=_to_db0, limiter=self.limiter)
                self.writers.append(writer)
                self.links.append(NodeLink(conn, writer, node.name, self))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for conn in self.conns:
            conn.close()

    async def identities(self) -> dict[str, str]:
        """The masters as servers: node id -> run_id (a restart or a promoted replica is
        another server, whose data may be older than the task's checkpoint)."""
        out: dict[str, str] = {}
        for node, conn in zip(self.topology.masters, self.conns):
            info = parse_info(await conn.call("INFO", "server"))
            out[node.node_id] = str(info.get("run_id", ""))
        return out

    # --- splitting ----------------------------------------------------------------------------

    def node_of(self, key: bytes) -> int:
        i = self.slot_node[key_slot(key)]
        if i < 0:
            raise FatalTaskError(f"target cluster: no master serves the slot of key "
                                 f"{key[:80]!r}")
        return i

    def split(self, entries: list[Entry]) -> dict[int, list[Entry]]:
        """Each master's part of a batch, in the batch's order."""
        parts: dict[int, list[Entry]] = {}
        slot_node = self.slot_node
        block: list[Entry] | None = None     # a MULTI ... EXEC block being gathered
        for entry in entries:
            kind = entry[0]
            if block is not None:
                block.append(entry)
                if entry[2][0].upper() == b"EXEC":
                    keyed = block[1:-1]     # the commands between MULTI and EXEC
                    node = self.node_of(self._key(keyed[0][2])) if keyed else 0
                    parts.setdefault(node, []).extend(block)
                    block = None
                continue
            if kind == RESTORE:
                key = entry[2]
                node = slot_node[crc_hqx(key, 0) & 16383] if b"{" not in key else \
                    self.node_of(key)
                if node < 0:
                    node = self.node_of(key)    # raises, naming the key
                part = parts.get(node)
                if part is None:
                    part = parts[node] = []
                part.append(entry)
            elif kind == STRINGS:
                self._split_strings(entry, parts)
            elif kind == COMMAND:
                args = entry[2]
                name = args[0].upper()
                if name == b"MULTI":
                    block = [entry]
                elif name == b"FUNCTION":
                    for node in range(len(self.writers)):
                        parts.setdefault(node, []).append(entry)
                else:
                    parts.setdefault(self.node_of(self._key(args)), []).append(entry)
            elif kind == RAW:
                raise FatalTaskError("target cluster: forwarded replication bytes cannot be "
                                     "routed (a bug: the stream must be parsed per command)")
            else:
                raise FatalTaskError(f"target cluster: unknown entry kind {kind}")
        if block is not None:
            raise FatalTaskError("target cluster: a MULTI block without EXEC in one batch")
        return parts

    @staticmethod
    def _key(args: list[bytes]) -> bytes:
        i = KEY_AT.get(args[0], 1)
        if len(args) <= i:
            raise FatalTaskError(f"target cluster: cannot route {args[0][:40]!r} (no key)")
        return args[i]

    def _split_strings(self, entry: Entry, parts: dict[int, list[Entry]]) -> None:
        """(STRINGS, db, pairs, keys, nbytes) -> one STRINGS entry per slot (one MSET)."""
        by_slot: dict[int, list[bytes]] = {}
        pairs = entry[2]
        for i in range(0, len(pairs), 2):
            by_slot.setdefault(key_slot(pairs[i]), []).extend((pairs[i], pairs[i + 1]))
        for slot, group in by_slot.items():
            nbytes = sum(len(group[j]) for j in range(1, len(group), 2))
            node = self.slot_node[slot]
            if node < 0:
                raise FatalTaskError(f"target cluster: no master serves slot {slot}")
            parts.setdefault(node, []).append((STRINGS, entry[1], group, len(group) // 2,
                                               nbytes))

    # --- writing ------------------------------------------------------------------------------

    async def run(self, queue: asyncio.Queue[Batch | None], on_ack: AckFn) -> None:
        """Consume batches until None; acknowledge each once every master has its part."""
        try:
            await self._run(queue, on_ack)
        except BaseExceptionGroup as eg:
            from .task import first_error
            raise first_error(eg) from None

    async def _run(self, queue: asyncio.Queue[Batch | None], on_ack: AckFn) -> None:
        order: deque[list[Any]] = deque()     # [batch, parts still to be answered]
        lock = asyncio.Lock()

        async def release() -> None:
            async with lock:
                while order and order[0][1] == 0:
                    batch = order.popleft()[0]
                    if self.streaming and isinstance(batch.checkpoint, StreamPos) and \
                            batch.keys < 0:
                        self.progress.ops_applied += -batch.keys - 1
                    await on_ack(batch)

        async def collector(link: NodeLink) -> None:
            while True:
                while not link.inflight:
                    link.wake.clear()
                    await link.wake.wait()
                parent = await link.collect()
                parent[1] -= 1
                link.space.set()
                self._idle.set()
                await release()

        async with asyncio.TaskGroup() as tg:
            collectors = [tg.create_task(collector(link)) for link in self.links]
            while True:
                batch = await queue.get()
                if batch is None:
                    break
                item = [batch, 1]       # 1 until every part is sent
                order.append(item)
                await self._route(batch, item)
                item[1] -= 1
                await release()
            await self._drain()
            await release()
            for c in collectors:
                c.cancel()

    async def _drain(self) -> None:
        """Wait until every master has answered everything sent to it (a barrier)."""
        while any(link.inflight for link in self.links):
            self._idle.clear()
            await self._idle.wait()

    async def _route(self, batch: Batch, item: list[Any]) -> None:
        if self.marks is not None and self.streaming:
            await self._stream(batch, item)
            return
        for i, entries in self.split(batch.entries).items():
            await self.links[i].send_entries(entries, item)
        pos = batch.checkpoint
        if self.marks is not None and isinstance(pos, StreamPos):
            # The snapshot's last batch: from here on every slot holds the source's state
            # at ``pos``; each gets its marker (after its data, on the same connection).
            self.streaming = True
            if self.mark_all:
                self.mark_all = False
                value = self.marks.value(pos.replid, pos.offset, pos.db)
                per_node: dict[int, list[int]] = {}
                for slot in range(SLOTS):
                    per_node.setdefault(self._owner(slot), []).append(slot)
                for i, slots in per_node.items():
                    cmds = [[b"SET", self.marks.key(s), value] for s in slots]
                    await self.links[i].send_unit([("plain", c) for c in cmds], item)

    def _owner(self, slot: int) -> int:
        i = self.slot_node[slot]
        if i < 0:
            raise TopologyChanged(f"target cluster: no master serves slot {slot}")
        return i

    # --- the command stream -------------------------------------------------------------------

    async def _stream(self, batch: Batch, item: list[Any]) -> None:
        """Route a batch of replicated commands: per slot, a MULTI/EXEC ending with the
        slot's marker; a command spanning slots after a barrier, on its own."""
        pos = batch.checkpoint
        assert isinstance(pos, StreamPos)
        batch.keys = -(len(batch.entries) + 1)     # ops, counted when acknowledged
        self._stream_replid = pos.replid
        blocks: dict[int, list[list[bytes]]] = {}
        skipping = self.skip_until >= 0
        last_end, last_db = pos.offset, pos.db
        for entry in batch.entries:
            args, db, end = entry[2], entry[1], entry[3]
            if self.db_map(db) != 0:
                raise FatalTaskError(f"source db {db} has keys but a Redis Cluster has db 0 "
                                     f"only: map it with db_mapping {{\"{db}\": 0}} or leave "
                                     f"it out with filter.dbs ({cs.show(args)})")
            p = cs.plan(args)
            if p.kind == cs.ONE:
                if not skipping or end > self.skip.get(p.slot, -1):
                    blocks.setdefault(p.slot, []).append(args)
            elif p.kind == cs.SPLIT:
                for slot, part in p.parts:
                    if not skipping or end > self.skip.get(slot, -1):
                        blocks.setdefault(slot, []).append(part)
            else:
                if blocks:
                    await self._send_blocks(blocks, last_end, last_db, item)
                    blocks = {}
                await self._drain()
                await self._cross(p, args, end, db)
            last_end, last_db = end, db
        await self._send_blocks(blocks, pos.offset, pos.db, item, refresh=True)
        if skipping and pos.offset >= self.skip_until:
            self.skip, self.skip_until = {}, -1

    async def _send_blocks(self, blocks: dict[int, list[list[bytes]]], end: int, db: int,
                           item: list[Any], *, refresh: bool = False) -> None:
        marks = self.marks
        assert marks is not None
        value = marks.value(self._stream_replid, end, db)
        units: dict[int, list[tuple[str, Any]]] = {}
        for slot, cmds in blocks.items():
            cmds.append([b"SET", marks.key(slot), value])
            units.setdefault(self._owner(slot), []).append(("multi", cmds))
        if refresh:
            # Markers of idle slots, in turn: none stays much older than the stream, so a
            # master that fails over never sends the resume back further than that.
            now = time.monotonic()
            n = min(SLOTS, int((now - self._refresh_at) * SLOTS / marks.REFRESH_S))
            if n:
                self._refresh_at = now
                for k in range(n):
                    slot = (self._refresh_next + k) % SLOTS
                    if slot not in blocks:
                        units.setdefault(self._owner(slot), []).append(
                            ("plain", [b"SET", marks.key(slot), value]))
                self._refresh_next = (self._refresh_next + n) % SLOTS
        for i, unit in units.items():
            await self.links[i].send_unit(unit, item)

    def _skipped(self, slot: int, end: int) -> bool:
        return self.skip_until >= 0 and end <= self.skip.get(slot, -1)

    async def _cross(self, p: cs.Plan, args: list[bytes], end: int, db: int) -> None:
        """Apply a command whose keys span slots (everything before it is acknowledged, so
        the target holds the source's state just before it). Destination first: after a
        crash half way, the replay skips the part done (its slot's marker says so) and the
        source key the rest reads is still as it was."""
        marks = self.marks
        assert marks is not None
        if p.kind == cs.FATAL:
            raise FatalTaskError(f"target cluster: cannot apply {p.why}")
        if p.kind == cs.ALL:
            await self._on_all(args)
            return
        if p.kind == cs.FLUSH:
            await self._flush(end, db)
            return
        if p.kind == cs.SMOVE:
            member = args[3]
            await self._block(p.dst_slot, [[b"SADD", p.dst, member]], end, db)
            await self._block(p.src_slot, [[b"SREM", p.src, member]], end, db)
        elif p.kind == cs.LMOVE:
            name = args[0].upper()
            if name in (b"RPOPLPUSH", b"BRPOPLPUSH"):
                wherefrom, whereto = b"RIGHT", b"LEFT"
            else:
                wherefrom, whereto = args[3].upper(), args[4].upper()
            if not self._skipped(p.dst_slot, end):
                elem = await self._read(p.src_slot, [b"LINDEX", p.src,
                                                     b"0" if wherefrom == b"LEFT" else b"-1"])
                if elem is None:
                    raise FatalTaskError(f"target cluster: {cs.show(args)}: the list is empty "
                                         f"on the target (it differs from the source)")
                push = b"LPUSH" if whereto == b"LEFT" else b"RPUSH"
                await self._block(p.dst_slot, [[push, p.dst, elem]], end, db)
            pop = b"LPOP" if wherefrom == b"LEFT" else b"RPOP"
            await self._block(p.src_slot, [[pop, p.src]], end, db)
        elif p.kind in (cs.RENAME, cs.COPY):
            if not self._skipped(p.dst_slot, end):
                payload, ttl = await self._dump(p.src_slot, p.src, args)
                await self._block(p.dst_slot, [[b"RESTORE", p.dst, ttl, payload, b"REPLACE"]],
                                  end, db)
            if p.kind == cs.RENAME:
                await self._block(p.src_slot, [[b"DEL", p.src]], end, db)
        elif p.kind == cs.STORE:
            if self._skipped(p.dst_slot, end):
                return
            cmd = list(args)
            cmds: list[list[bytes]] = []
            tmps: list[bytes] = []
            tag = marks.tags[p.dst_slot]
            for n, (i, key) in enumerate(p.foreign):
                tmp = self.tmp_prefix + b"{" + tag + b"}:%d" % n
                tmps.append(tmp)
                cmd[i] = tmp
                payload = await self._read(key_slot(key), [b"DUMP", key])
                if payload is not None:
                    cmds.append([b"RESTORE", tmp, b"0", payload, b"REPLACE"])
            cmds.append(cmd)
            cmds.append([b"DEL", *tmps])
            await self._block(p.dst_slot, cmds, end, db)

    async def _read(self, slot: int, cmd: list[bytes]) -> Any:
        link = self.links[self._owner(slot)]
        reply = (await link.conn.pipeline([cmd]))[0]
        if reply.__class__ is ReplyError:
            raise link.error(cmd, reply)
        return reply

    async def _dump(self, slot: int, key: bytes, args: list[bytes]) -> tuple[bytes, bytes]:
        link = self.links[self._owner(slot)]
        payload, pttl = await link.conn.pipeline([[b"DUMP", key], [b"PTTL", key]])
        for cmd, reply in (([b"DUMP", key], payload), ([b"PTTL", key], pttl)):
            if reply.__class__ is ReplyError:
                raise link.error(cmd, reply)
        if payload is None:
            raise FatalTaskError(f"target cluster: {cs.show(args)}: key {show_key(key)} is "
                                 f"missing on the target (it differs from the source)")
        return payload, b"%d" % max(int(pttl), 0)

    async def _block(self, slot: int, cmds: list[list[bytes]], end: int, db: int) -> None:
        """One slot's MULTI/EXEC with its marker, sent and answered now (a barrier step);
        nothing when the slot's marker says it holds it already."""
        if self._skipped(slot, end):
            return
        marks = self.marks
        assert marks is not None
        cmds = [*cmds, [b"SET", marks.key(slot), marks.value(self._stream_replid, end, db)]]
        link = self.links[self._owner(slot)]
        holder = [None, 1]
        await link.send_unit([("multi", cmds)], holder)
        await self._drain()

    async def _on_all(self, args: list[bytes]) -> None:
        """FUNCTION / SCRIPT: on every master, in forms a replay may repeat."""
        cmd = list(args)
        sub = cmd[1].upper() if len(cmd) > 1 else b""
        if cmd[0].upper() == b"FUNCTION":
            if sub == b"LOAD" and not any(a.upper() == b"REPLACE" for a in cmd[2:-1]):
                cmd = [cmd[0], cmd[1], b"REPLACE", *cmd[2:]]
            elif sub == b"RESTORE":
                cmd = [a for a in cmd if a.upper() not in (b"APPEND", b"FLUSH")]
                if not any(a.upper() == b"REPLACE" for a in cmd[3:]):
                    cmd.append(b"REPLACE")
        for link in self.links:
            reply = (await link.conn.pipeline([cmd]))[0]
            if reply.__class__ is ReplyError:
                if sub == b"DELETE" and "not found" in str(reply).lower():
                    continue     # replayed after a crash: already deleted
                raise link.error(cmd, reply)

    async def _flush(self, end: int, db: int) -> None:
        """FLUSHALL / FLUSHDB: each master empties and sets the markers of its slots in one
        transaction (a flush removes the markers too)."""
        marks = self.marks
        assert marks is not None
        value = marks.value(self._stream_replid, end, db)
        per_node: dict[int, list[int]] = {}
        for slot in range(SLOTS):
            per_node.setdefault(self._owner(slot), []).append(slot)
        for i, slots in per_node.items():
            if all(self._skipped(s, end) for s in slots):
                continue
            cmds = [[b"FLUSHALL"], *([b"SET", marks.key(s), value] for s in slots)]
            await self.links[i].send_unit([("multi", cmds)], [None, 1])
        await self._drain()


class NodeLink:
    """One master's connection: snapshot batches through its Writer, stream units
    (MULTI/EXEC blocks and plain commands) encoded here, answered in the order sent."""

    def __init__(self, conn: Connection, writer: Writer, name: str,
                 router: ClusterRouter) -> None:
        self.conn = conn
        self.writer = writer
        self.name = name
        self.router = router
        # ("w", None, parent): a Writer batch; ("u", unit, parent): a stream unit
        self.inflight: deque[tuple[str, Any, list[Any]]] = deque()
        self.wake = asyncio.Event()
        self.space = asyncio.Event()

    async def _room(self) -> None:
        while len(self.inflight) >= NODE_INFLIGHT:
            self.space.clear()
            await self.space.wait()

    async def send_entries(self, entries: list[Entry], parent: list[Any]) -> None:
        await self._room()
        await self.writer.send(Batch(entries, None, 0, 0))
        parent[1] += 1
        self.inflight.append(("w", None, parent))
        self.wake.set()

    async def send_unit(self, unit: list[tuple[str, Any]], parent: list[Any]) -> None:
        await self._room()
        parts: list[bytes] = []
        for kind, cmds in unit:
            if kind == "multi":
                parts.append(MULTI)
                for c in cmds:
                    encode_into(parts, c)
                parts.append(EXEC)
            else:
                encode_into(parts, cmds)
        data = b"".join(parts)
        limiter = self.router.limiter
        if limiter is not None:
            await limiter.take(len(data))
        self.conn.send(data)
        await self.conn.drain()
        self.router.progress.bytes_written += len(data)
        parent[1] += 1
        self.inflight.append(("u", unit, parent))
        self.wake.set()

    async def collect(self) -> list[Any]:
        kind, unit, parent = self.inflight[0]
        if kind == "w":
            await self.writer.collect()
        else:
            n = sum(len(c) + 2 if k == "multi" else 1 for k, c in unit)
            self.check(unit, await self.conn.read_replies(n))
        self.inflight.popleft()
        return parent

    def check(self, unit: list[tuple[str, Any]], replies: list[Any]) -> None:
        """Every command of a unit must have been applied; a transaction refused at queue
        time (MOVED, ASK, CROSSSLOT, OOM ...) was not applied at all."""
        at = 0
        for kind, cmds in unit:
            if kind == "plain":
                if replies[at].__class__ is ReplyError:
                    raise self.error(cmds, replies[at])
                at += 1
                continue
            queued = replies[at + 1:at + 1 + len(cmds)]
            result = replies[at + 1 + len(cmds)]
            at += len(cmds) + 2
            for cmd, r in zip(cmds, queued):
                if r.__class__ is ReplyError:
                    raise self.error(cmd, r)
            if result.__class__ is ReplyError or not isinstance(result, list):
                raise self.error([b"EXEC"], result)
            for cmd, r in zip(cmds, result):
                if r.__class__ is ReplyError:
                    raise FatalTaskError(f"target cluster node {self.name}: {cs.show(cmd)} "
                                         f"failed inside its transaction: {r} (the target "
                                         f"differs from the source)")

    def error(self, cmd: list[bytes], reply: Any) -> EndpointError | FatalTaskError:
        msg = str(reply)
        text = f"target cluster node {self.name}: {cs.show(cmd)} failed: {msg}"
        if msg.startswith(("MOVED", "ASK")):
            return TopologyChanged(text + " (the cluster's shape changed: going on with the "
                                   "new one)")
        if msg.startswith(RETRYABLE):
            return EndpointError(text)
        return FatalTaskError(text)
