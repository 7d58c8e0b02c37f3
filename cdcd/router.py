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
from collections.abc import Awaitable, Callable, Iterable, Sequence
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
from .topology import HostMapping, Node, Topology, key_slot, show_addr
from .writer import AckFn, Writer, show_key

NODE_INFLIGHT = 4
MULTI = b"*1\r\n$5\r\nMULTI\r\n"
EXEC = b"*1\r\n$4\r\nEXEC\r\n"
ASKING = b"*1\r\n$6\r\nASKING\r\n"
MERGE_ENTRIES = 8192
RETRYABLE = ("OOM", "LOADING", "BUSY", "MASTERDOWN", "READONLY", "TRYAGAIN", "CLUSTERDOWN")
# the slot moved or is moving: the block goes again, where the cluster says
REDIRECTS = ("MOVED ", "ASK ", "TRYAGAIN", "CLUSTERDOWN")
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
                 task_id: str = "", db_map: Callable[[int], int] = _to_db0,
                 mapping: HostMapping | None = None) -> None:
        self.topology = topology
        self.ep = ep
        self.progress = progress
        self._replace = replace
        self.limiter = limiter
        self.io_timeout = io_timeout
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
        # A cluster source (shards.py): each shard's slots; the shards whose batches are
        # stream batches, and those whose snapshot's end must mark their slots.
        self.shard_slots: dict[str, list[int]] = {}
        self.streaming_shards: set[str] = set()
        self.mark_shards: set[str] = set()
        # each shard's replay skips (its stream's offsets), swapped in per batch
        self._skips: dict[str, tuple[dict[int, int], int]] = {}
        # marker refresh, per stream ("" unless a cluster source): (when, next slot index)
        self._refresh: dict[str, tuple[float, int]] = {"": (time.monotonic(), 0)}
        self.db_map = db_map
        self.tmp_prefix = b"cdcd:tmp:" + task_id.encode() + b":x:"
        self._stream_replid = ""
        self._stream_shard = ""
        self._idle = asyncio.Event()
        self.mapping = mapping if mapping is not None else HostMapping()
        self.slot_busy: dict[int, Block] = {}      # each slot's last block sent
        self.deferred: dict[int, Deferred] = {}    # blocks waiting for their slot's
        self.ready: list[int] = []                  # slots whose deferred block may go
        self.flush_ready = asyncio.Event()
        self.open_blocks = 0                        # blocks not yet applied
        self._tg: asyncio.TaskGroup
        self._release: Callable[[], Awaitable[None]]

    def resume_shard(self, shard: str, skip: dict[int, int]) -> None:
        """A cluster source's shard resumes its stream: skip, per slot, what it holds."""
        self.streaming_shards.add(shard)
        self._skips[shard] = (dict(skip), max(skip.values(), default=-1))

    def restart_shard(self, shard: str) -> None:
        """A shard of a cluster source answered a full resync."""
        self.streaming_shards.discard(shard)
        self.mark_shards.add(shard)
        self._skips.pop(shard, None)

    def slots_moved(self, slots: Iterable[int]) -> None:
        """Source slots changed shards (handoff.py): out of their old shard's marker ring
        until their new owner's events may go (``slot_settled``)."""
        gone = set(slots)
        for shard, ring in self.shard_slots.items():
            if not gone.isdisjoint(ring):
                self.shard_slots[shard] = [s for s in ring if s not in gone]

    def slot_settled(self, slot: int, shard: str) -> None:
        """A moved source slot's previous owner is queued past its fence: from now on the
        slot's marker speaks for ``shard``'s stream."""
        ring = self.shard_slots.get(shard)
        if ring is not None and slot not in ring:
            ring.append(slot)

    def _is_stream(self, pos: Any) -> bool:
        """Whether a batch with this checkpoint is a stream batch (routed per slot with
        markers), not snapshot data."""
        if self.marks is None or not isinstance(pos, StreamPos):
            return False
        return pos.shard in self.streaming_shards if pos.shard else self.streaming

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

    @property
    def conns(self) -> list[Connection]:
        return [link.conn for link in self.links]

    @property
    def writers(self) -> list[Writer]:
        return [link.writer for link in self.links]

    async def open(self) -> None:
        try:
            for node in self.topology.masters:
                await self._connect(node)
        except BaseException:
            self.close()
            raise

    async def _connect(self, node: Node) -> NodeLink:
        """A connection to a master, its snapshot Writer and its link (appended)."""
        conn = await Connection.open(*node.dial, role="target", ep=self.ep,
                                     io_timeout=self.io_timeout)
        writer = Writer(conn, progress=self.progress, replace=self._replace, db_map=_to_db0,
                        limiter=self.limiter)
        link = NodeLink(conn, writer, node, self)
        self.links.append(link)
        return link

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
                    if batch.keys < 0:
                        self.progress.ops_applied += -batch.keys - 1
                    await on_ack(batch)
        self._release = release

        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            for link in self.links:
                link.collector = tg.create_task(self._collect(link))
            flusher = tg.create_task(self._flush_deferred())
            held: list[Batch | None] = []
            while True:
                batch = held.pop() if held else await queue.get()
                if batch is None:
                    break
                if self._is_stream(batch.checkpoint):
                    batch = _merge_queued(batch, queue, held, self._is_stream)
                item: list[Any] = [batch, 1]       # 1 until every part is sent
                order.append(item)
                await self._route(batch, item)
                item[1] -= 1
                await release()
            await self._drain()
            await release()
            flusher.cancel()
            for link in self.links:
                if link.collector is not None:
                    link.collector.cancel()

    async def _collect(self, link: NodeLink) -> None:
        """Read one master's replies in order; a block refused because its slot moved is
        sent again where the cluster says (MOVED, ASK) or a moment later (TRYAGAIN)."""
        while True:
            while not link.inflight:
                link.wake.clear()
                await link.wake.wait()
            parent, refused = await link.collect()
            for blk, reply in refused:
                parent[1] += 1
                self._tg.create_task(self._redirect(blk, reply, parent))
            parent[1] -= 1
            link.space.set()
            self._idle.set()
            await self._release()

    async def _flush_deferred(self) -> None:
        """Send the blocks that waited for their slot's previous block, once it is done."""
        while True:
            while not self.ready:
                self.flush_ready.clear()
                await self.flush_ready.wait()
            slots, self.ready = self.ready, []
            units: dict[int, list[Block]] = {}
            marks = self.marks
            assert marks is not None
            for slot in slots:
                d = self.deferred.pop(slot, None)
                if d is None:
                    continue
                d.cmds.append([b"SET", marks.key(slot), d.value])
                blk = Block(slot, d.cmds, True, self)      # counted when deferred
                blk.parents = d.parents
                self.slot_busy[slot] = blk
                units.setdefault(self._owner(slot), []).append(blk)
            for i, unit in units.items():
                await self.links[i].send_unit(unit, [None, 1])
            self._idle.set()

    async def _redirect(self, blk: Block, reply: Any, parent: list[Any]) -> None:
        try:
            msg = str(reply)
            limit = self.io_timeout or 60.0
            if time.monotonic() - blk.since > limit:
                raise EndpointError(f"target cluster: slot {blk.slot} still refused after "
                                    f"{limit:g}s: {msg}")
            blk.tries += 1
            blk.asking = False
            words = msg.split()
            if words[0] == "MOVED" and len(words) >= 3:
                i = await self._link_at(words[2])
                self.slot_node[blk.slot] = i
            elif words[0] == "ASK" and len(words) >= 3:
                i = await self._link_at(words[2])
                blk.asking = True
            else:       # TRYAGAIN (a slot half migrated), CLUSTERDOWN (a failover)
                await asyncio.sleep(min(0.02 * blk.tries, 0.5))
                i = self._owner(blk.slot)
            await self.links[i].send_unit([blk], parent)
        finally:
            parent[1] -= 1
            self._idle.set()
            await self._release()

    async def _link_at(self, addr: str) -> int:
        """The link to the master announced at ``addr`` (connected when new: a master
        added to the cluster)."""
        for i, link in enumerate(self.links):
            if show_addr(link.node.announced) == addr:
                return i
        host, _, port = addr.rpartition(":")
        announced = (host.strip("[]"), int(port))
        link = await self._connect(Node(node_id="", announced=announced,
                                        dial=self.mapping.dial(announced), role="master"))
        link.collector = self._tg.create_task(self._collect(link))
        return len(self.links) - 1

    async def _drain(self) -> None:
        """Wait until every master has answered everything sent to it, every refused
        block applied where it belongs (a barrier)."""
        while self.open_blocks or any(link.inflight for link in self.links):
            self._idle.clear()
            await self._idle.wait()

    async def _route(self, batch: Batch, item: list[Any]) -> None:
        pos = batch.checkpoint
        if self._is_stream(pos):
            await self._stream(batch, item)
            return
        for i, entries in self.split(batch.entries).items():
            await self.links[i].send_entries(entries, item)
        if self.marks is not None and isinstance(pos, StreamPos) and pos.shard:
            # A source shard's snapshot ends: its slots hold its state at ``pos``.
            self.streaming_shards.add(pos.shard)
            if pos.shard in self.mark_shards:
                self.mark_shards.discard(pos.shard)
                await self._mark(self.shard_slots[pos.shard], pos, item)
        elif self.marks is not None and isinstance(pos, StreamPos):
            # The snapshot's last batch: from here on every slot holds the source's state
            # at ``pos``; each gets its marker (after its data, on the same connection).
            self.streaming = True
            if self.mark_all:
                self.mark_all = False
                await self._mark(range(SLOTS), pos, item)

    async def _mark(self, slots: Sequence[int], pos: StreamPos, item: list[Any]) -> None:
        """Set the markers of ``slots`` to ``pos`` (a snapshot's end), each on its master
        behind the snapshot's data."""
        assert self.marks is not None
        value = self.marks.value(pos.replid, pos.offset, pos.db, pos.shard)
        units: dict[int, list[Block]] = {}
        for slot in slots:
            blk = self._new_block(slot, [[b"SET", self.marks.key(slot), value]], multi=False)
            units.setdefault(self._owner(slot), []).append(blk)
        for i, unit in units.items():
            await self.links[i].send_unit(unit, item)

    def restart_snapshot(self) -> None:
        """The source answered a full resync: snapshot batches come again, and every slot
        gets its marker once they are applied."""
        self.streaming = False
        self.mark_all = True
        self.skip, self.skip_until = {}, -1

    def _owner(self, slot: int) -> int:
        i = self.slot_node[slot]
        if i < 0:
            raise TopologyChanged(f"target cluster: no master serves slot {slot}")
        return i

    def _new_block(self, slot: int, cmds: list[list[bytes]], *, multi: bool = True) -> Block:
        blk = Block(slot, cmds, multi, self)
        self.slot_busy[slot] = blk
        self.open_blocks += 1
        return blk

    async def _slot_free(self, slot: int) -> None:
        """One block per slot in flight: a block refused by a moving slot is applied again
        before the slot's next one is sent, so a slot never holds a later block without
        an earlier one (its marker would claim both)."""
        blk = self.slot_busy.get(slot)
        if blk is not None and not blk.done:
            await blk.wait()

    # --- the command stream -------------------------------------------------------------------

    async def _stream(self, batch: Batch, item: list[Any]) -> None:
        """Route a batch of replicated commands: per slot, a MULTI/EXEC ending with the
        slot's marker; a command spanning slots after a barrier, on its own."""
        pos = batch.checkpoint
        assert isinstance(pos, StreamPos)
        if batch.entries and batch.entries[0][0] == RAW:
            raise FatalTaskError("target cluster: forwarded replication bytes cannot be "
                                 "routed (a bug: the stream must be parsed per command)")
        batch.keys = -(len(batch.entries) + 1)     # ops, counted when acknowledged
        self._stream_replid = pos.replid
        self._stream_shard = pos.shard
        if pos.shard:
            self.skip, self.skip_until = self._skips.get(pos.shard, ({}, -1))
        blocks: dict[int, list[list[bytes]]] = {}
        skipping = self.skip_until >= 0
        skip = self.skip
        single = cs.SINGLE_KEY
        last_end, last_db = pos.offset, pos.db
        ok_db = -1
        for entry in batch.entries:
            args, db, end = entry[2], entry[1], entry[3]
            if db != ok_db:
                if self.db_map(db) != 0:
                    raise FatalTaskError(f"source db {db} has keys but a Redis Cluster has db "
                                         f"0 only: map it with db_mapping {{\"{db}\": 0}} or "
                                         f"leave it out with filter.dbs ({cs.show(args)})")
                ok_db = db
            if args[0] in single and len(args) > 1:      # the common case, inline
                key = args[1]
                slot = crc_hqx(key, 0) & 16383 if b"{" not in key else key_slot(key)
                if not skipping or end > skip.get(slot, -1):
                    block = blocks.get(slot)
                    if block is None:
                        blocks[slot] = [args]
                    else:
                        block.append(args)
                last_end, last_db = end, db
                continue
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
        if skipping and not pos.shard and pos.offset >= self.skip_until:
            self.skip, self.skip_until = {}, -1

    async def _send_blocks(self, blocks: dict[int, list[list[bytes]]], end: int, db: int,
                           item: list[Any], *, refresh: bool = False) -> None:
        marks = self.marks
        assert marks is not None
        value = marks.value(self._stream_replid, end, db, self._stream_shard)
        busy = self.slot_busy
        deferred = self.deferred
        units: dict[int, list[Block]] = {}
        slot_node = self.slot_node
        key = marks.key
        for slot, cmds in blocks.items():
            prev = busy.get(slot)
            if (prev is not None and not prev.done) or slot in deferred:
                # The slot's last block is still in flight: this one waits behind it (one
                # block per slot in flight), merged with any other waiting there.
                d = deferred.get(slot)
                if d is None:
                    d = deferred[slot] = Deferred()
                    self.open_blocks += 1
                d.cmds.extend(cmds)
                d.value = value
                d.parents.append(item)
                item[1] += 1
                continue
            cmds.append([b"SET", key(slot), value])
            i = slot_node[slot]
            unit = units.get(i)
            if unit is None:
                unit = units[i] = []
            unit.append(self._new_block(slot, cmds))
        if refresh:
            # Markers of idle slots, in turn: none stays much older than the stream, so a
            # master that fails over never sends the resume back further than that. (A
            # cluster source: only the slots of the batch's shard, whose stream it is.)
            now = time.monotonic()
            shard = self._stream_shard
            ring: Sequence[int] = self.shard_slots[shard] if shard else range(SLOTS)
            at, start = self._refresh.setdefault(shard, (now, 0))
            n = min(len(ring), int((now - at) * len(ring) / marks.REFRESH_S))
            if n:
                for k in range(n):
                    slot = ring[(start + k) % len(ring)]
                    busy_blk = self.slot_busy.get(slot)
                    if slot in blocks or (busy_blk is not None and not busy_blk.done) or \
                            slot in deferred or self._skipped(slot, end + 1):
                        continue        # (a slot ahead of the replay keeps its marker)
                    blk = self._new_block(slot, [[b"SET", marks.key(slot), value]],
                                          multi=False)
                    units.setdefault(self._owner(slot), []).append(blk)
                self._refresh[shard] = (now, (start + n) % len(ring))
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
        value = marks.value(self._stream_replid, end, db, self._stream_shard)
        cmds = [*cmds, [b"SET", marks.key(slot), value]]
        await self._slot_free(slot)
        blk = self._new_block(slot, cmds)
        await self.links[self._owner(slot)].send_unit([blk], [None, 1])
        await blk.wait()

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
        if self._stream_shard:
            raise FatalTaskError("FLUSHALL/FLUSHDB on a cluster source into a cluster "
                                 "target is not supported yet (it would empty other "
                                 "shards' slots); resync the task")
        value = marks.value(self._stream_replid, end, db, self._stream_shard)
        per_node: dict[int, list[int]] = {}
        for slot in range(SLOTS):
            per_node.setdefault(self._owner(slot), []).append(slot)
        for i, slots in per_node.items():
            if all(self._skipped(s, end) for s in slots):
                continue
            cmds = [[b"FLUSHALL"], *([b"SET", marks.key(s), value] for s in slots)]
            # one transaction for the master's every slot: ordered behind slot 'slots[0]'
            blk = self._new_block(slots[0], cmds)
            await self.links[i].send_unit([blk], [None, 1])
            await blk.wait()


def _merge_queued(batch: Batch, queue: asyncio.Queue[Batch | None],
                  held: list[Batch | None], is_stream: Callable[[Any], bool]) -> Batch:
    """Fold stream batches already waiting into this one: one block per slot for all of
    them (a busy stream then costs fewer transactions, and a slot waiting for its block in
    flight gathers what comes meanwhile)."""
    if not isinstance(batch.checkpoint, StreamPos):
        return batch
    entries: list[Entry] | None = None
    checkpoint = batch.checkpoint
    while not queue.empty() and len(entries or batch.entries) < MERGE_ENTRIES:
        nxt = queue.get_nowait()
        if nxt is None or not is_stream(nxt.checkpoint) or \
                nxt.checkpoint.shard != checkpoint.shard:
            held.append(nxt)
            break
        if entries is None:
            entries = list(batch.entries)
        entries += nxt.entries
        checkpoint = nxt.checkpoint
    return batch if entries is None else Batch(entries, checkpoint, 0, 0)


class Deferred:
    """A slot's commands waiting for the slot's block in flight (see _send_blocks)."""

    __slots__ = ("cmds", "value", "parents")

    def __init__(self) -> None:
        self.cmds: list[list[bytes]] = []
        self.value = b""
        self.parents: list[list[Any]] = []


class Block:
    """One slot's part of a batch (commands ending with the slot's marker, in one
    MULTI/EXEC) or one marker refresh (a plain SET): sent, perhaps refused by a moving
    slot and sent again, done once applied."""

    __slots__ = ("slot", "cmds", "multi", "asking", "done", "event", "tries", "since",
                 "router", "parents")

    def __init__(self, slot: int, cmds: list[list[bytes]], multi: bool,
                 router: ClusterRouter) -> None:
        self.slot = slot
        self.cmds = cmds
        self.multi = multi
        self.asking = False
        self.done = False
        self.event: asyncio.Event | None = None
        self.tries = 0
        self.since = time.monotonic()
        self.router = router
        self.parents: list[list[Any]] | None = None    # batches held by a deferred block

    @property
    def replies(self) -> int:
        return (len(self.cmds) + 2 if self.multi else len(self.cmds)) + self.asking

    def encode(self, parts: list[bytes]) -> None:
        if self.asking:
            parts.append(ASKING)
        if self.multi:
            parts.append(MULTI)
        for c in self.cmds:
            encode_into(parts, c)
        if self.multi:
            parts.append(EXEC)

    def finish(self) -> None:
        self.done = True
        router = self.router
        router.open_blocks -= 1
        if self.event is not None:
            self.event.set()
        if self.parents is not None:
            for parent in self.parents:
                parent[1] -= 1
        if self.slot in router.deferred:
            router.ready.append(self.slot)
            router.flush_ready.set()

    async def wait(self) -> None:
        if not self.done:
            if self.event is None:
                self.event = asyncio.Event()
            await self.event.wait()


class NodeLink:
    """One master's connection: snapshot batches through its Writer, stream units
    (MULTI/EXEC blocks and plain commands) encoded here, answered in the order sent."""

    def __init__(self, conn: Connection, writer: Writer, node: Node,
                 router: ClusterRouter) -> None:
        self.conn = conn
        self.writer = writer
        self.node = node
        self.name = node.name
        self.collector: asyncio.Task[None] | None = None
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

    async def send_unit(self, unit: list[Block], parent: list[Any]) -> None:
        await self._room()
        parts: list[bytes] = []
        for blk in unit:
            blk.encode(parts)
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

    async def collect(self) -> tuple[list[Any], list[tuple[Block, Any]]]:
        """Read the replies of the oldest unit in flight: (its parent, the blocks refused
        because their slot moved, each with its reply)."""
        kind, unit, parent = self.inflight[0]
        refused: list[tuple[Block, Any]] = []
        if kind == "w":
            await self.writer.collect()
        else:
            replies = await self.conn.read_replies(sum(blk.replies for blk in unit))
            at = 0
            for blk in unit:
                n = blk.replies
                bad = self.check(blk, replies[at:at + n])
                at += n
                if bad is None:
                    blk.finish()
                else:
                    refused.append((blk, bad))
        self.inflight.popleft()
        return parent, refused

    def check(self, blk: Block, replies: list[Any]) -> Any:
        """None when the block was applied; the reply when its slot moved (nothing of the
        transaction was applied: it goes where the cluster says); raise otherwise."""
        if blk.asking:
            replies = replies[1:]       # ASKING's OK
        if not blk.multi:
            for cmd, r in zip(blk.cmds, replies):
                if r.__class__ is ReplyError:
                    return self._moved(cmd, r)
            return None
        cmds = blk.cmds
        queued, result = replies[1:1 + len(cmds)], replies[1 + len(cmds)]
        for cmd, r in zip(cmds, queued):
            if r.__class__ is ReplyError:
                return self._moved(cmd, r)
        if replies[0].__class__ is ReplyError:
            return self._moved([b"MULTI"], replies[0])
        if result.__class__ is ReplyError or not isinstance(result, list):
            return self._moved([b"EXEC"], result)
        for cmd, r in zip(cmds, result):
            if r.__class__ is ReplyError:
                raise FatalTaskError(f"target cluster node {self.name}: {cs.show(cmd)} "
                                     f"failed inside its transaction: {r} (the target "
                                     f"differs from the source)")
        return None

    def _moved(self, cmd: list[bytes], reply: Any) -> Any:
        if str(reply).startswith(REDIRECTS):
            return reply
        raise self.error(cmd, reply)

    def error(self, cmd: list[bytes], reply: Any) -> EndpointError | FatalTaskError:
        msg = str(reply)
        text = f"target cluster node {self.name}: {cs.show(cmd)} failed: {msg}"
        if msg.startswith(("MOVED", "ASK")):
            return TopologyChanged(text + " (the cluster's shape changed: going on with the "
                                   "new one)")
        if msg.startswith(RETRYABLE):
            return EndpointError(text)
        return FatalTaskError(text)
