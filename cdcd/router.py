"""Write to a Redis Cluster target: a router in front of one ``Writer`` per master.

Every entry goes to the master serving its key's slot (CRC16 of the key or its {hash
tag}); a group of plain strings becomes one MSET per slot; a MULTI/EXEC block (a big key
put into place) goes whole to the slot of its keys, which share one slot by construction
(readers/bigkey.py tags the temporary key); FUNCTION LOAD goes to every master. The
masters are written in parallel, each through its own pipelined connection, and a batch
is acknowledged once every master has acknowledged its part of it and of every batch
before it, so a checkpoint never claims more than the cluster holds.

A MOVED, ASK, TRYAGAIN or CLUSTERDOWN reply means the cluster's shape changed under the
copy (a resharding, a failover): the writer raises a retryable error and the task starts
again from its checkpoint with the cluster's new shape.
"""

from __future__ import annotations

import asyncio
from binascii import crc_hqx
from collections import deque
from typing import Any

from .entry import COMMAND, RAW, RESTORE, STRINGS, Batch, Entry
from .errors import FatalTaskError
from .progress import Progress
from .ratelimit import TokenBucket
from .resp import Connection
from .spec import Endpoint
from .topology import Topology, key_slot
from .writer import AckFn, Writer

NODE_QUEUE = 4
# Where the key is in the commands the snapshot sends (big-key chunks and their MULTI):
# args[1] for all but XGROUP CREATE/CREATECONSUMER key ...
KEY_AT = {b"XGROUP": 2, b"xgroup": 2}


def _to_db0(db: int) -> int:
    return 0


class ClusterRouter:
    """Same interface as ``Writer.run``, over one connection per master."""

    def __init__(self, topology: Topology, ep: Endpoint, *, progress: Progress,
                 replace: bool = True, limiter: TokenBucket | None = None,
                 io_timeout: float | None = None) -> None:
        self.topology = topology
        self.ep = ep
        self.progress = progress
        self._replace = replace
        self.limiter = limiter
        self.io_timeout = io_timeout
        self.conns: list[Connection] = []
        self.writers: list[Writer] = []
        self.slot_node = [topology.owner[s] for s in range(len(topology.owner))]

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
                self.writers.append(Writer(conn, progress=self.progress, replace=self._replace,
                                           db_map=_to_db0, limiter=self.limiter))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for conn in self.conns:
            conn.close()

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
        node_queues: list[asyncio.Queue[Batch | None]] = [
            asyncio.Queue(maxsize=NODE_QUEUE) for _ in self.writers]
        order: deque[list[Any]] = deque()     # [batch, masters still to answer]
        seq = 0
        done: dict[int, list[Any]] = {}

        async def release() -> None:
            while order and not order[0][1]:
                batch = order.popleft()[0]
                await on_ack(batch)

        def node_ack(i: int) -> AckFn:
            async def ack(sub: Batch) -> None:
                item = done.pop(sub.checkpoint * len(self.writers) + i)
                item[1].discard(i)
                await release()
            return ack

        async def feed() -> None:
            nonlocal seq
            while True:
                batch = await queue.get()
                if batch is None:
                    for q in node_queues:
                        await q.put(None)
                    return
                parts = self.split(batch.entries)
                seq += 1
                item = [batch, set(parts)]
                order.append(item)
                if not parts:
                    await release()
                    continue
                for i, entries in parts.items():
                    done[seq * len(self.writers) + i] = item
                    await node_queues[i].put(Batch(entries, seq, 0, 0))

        async with asyncio.TaskGroup() as tg:
            tg.create_task(feed())
            for i, w in enumerate(self.writers):
                tg.create_task(w.run(node_queues[i], node_ack(i)))
        await release()
