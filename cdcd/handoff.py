"""Keep a cluster source's streams in order where its slots move between masters.

A resharding of the source moves each key with MIGRATE: the new owner executes
``RESTORE-ASKING k`` (in its stream), then the old owner deletes ``k`` (``DEL k`` in its
stream); clients then write ``k`` on the new owner (``ASKING`` during the import, plainly
afterwards). cdcd reads and applies the shards' streams independently, each with its own
lag, so the target could otherwise get the new owner's RESTORE, or a later write, before
the old owner's DEL or older writes: the key lost or rolled back.

The rule kept here: in every slot, an event of one shard goes to the writer only after
every event of another shard in that slot that happened before it. Nearly every event is
in a slot its shard owns and that did not move lately: it goes at once. The others are
*held*: each shard's reader puts its batches into its ``ShardGate``, in order, and a held
unit (one command, or one source transaction) waits at the gate's head, with everything
after it, while the reader goes on reading. For a held event of shard S in slot s, every
other shard X that had s before (the slot map's history, each step with its *fence*: X's
master offset read after the move was seen) or that has it now (an import under way: the
RESTORE-ASKING of a migrated key, ASKING writes) must have

- read its stream up to P, X's master offset read after S's event was received (for a
  migrated key, after the key is gone from X, so X's DEL is before P), or up to the fence;
- queued for the writer every unit it holds that touches s up to P.

Then all of X's events in s before S's event are ahead of it in the writer's queue (one
queue for a standalone target; per slot, one block in flight for a cluster), whose order
the target keeps. Because a held shard keeps reading, a wait can only be for events that
happened before, in real time, on another master; two shards waiting for each other mean
slots moved both ways between them within one read of the slot map: detected, and the
task goes on from its checkpoint. The slot map and the fences are kept in the task's
checkpoint (``shard_slots``, ``moved``), so a restart goes on with them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import hiredis

from . import crossslot as cs
from .entry import COMMAND, RAW, RESTORE, Batch
from .errors import EndpointError, FatalTaskError
from .markers import _ranges
from .readers.psync import RAW_UNGATED
from .resp import Connection, ServerReplyError, parse_info
from .spec import Endpoint
from .topology import SLOTS, Addr, key_slot

log = logging.getLogger("cdcd.handoff")

GONE_POLL_S = 0.005
# A key copied to a new owner that its old owner still holds this long after: MIGRATE
# ... COPY (the old owner never deletes it), which cdcd cannot order.
GONE_TIMEOUT_S = 30.0
# A shard holding this many entries behind a waiting unit stops reading (memory).
HELD_ENTRIES = 500_000
MERGE_ENTRIES = 4096
# Settling moved slots looks at every one of them: at most this often after a held unit
# (and at every read of the slot map).
SETTLE_EVERY_S = 0.1


class HandoffDeadlock(EndpointError):
    """Two shards each wait for the other (slots moved both ways between two reads of the
    slot map): retried from the checkpoint."""


def entry_slots(entry: tuple[Any, ...]) -> list[int]:
    """The slots an entry of a cluster source's reader touches."""
    kind = entry[0]
    if kind == COMMAND:
        args = entry[2]
        if args[0] in cs.SINGLE_KEY and len(args) > 1:
            return [key_slot(args[1])]
        return cs.slots_of(args)
    if kind == RESTORE:
        return [key_slot(entry[2])]
    if kind == RAW:
        reader = hiredis.Reader()
        for segment in entry[2]:
            reader.feed(segment)
        out: list[int] = []
        while (args := reader.gets()) is not False:
            if isinstance(args, list) and args and args[0].lower() not in RAW_UNGATED:
                out += entry_slots((COMMAND, 0, args))
        return out
    return []


class _Unit:
    __slots__ = ("batch", "held", "start", "offset", "received", "_slots")

    def __init__(self, batch: Batch | None, held: bool, start: int, offset: int,
                 received: float) -> None:
        self.batch = batch
        self.held = held
        self.start = start              # the stream offset it begins after
        self.offset = offset            # its end in the stream (-1: inside an RDB)
        self.received = received
        self._slots: set[int] | None = None

    def slots(self) -> set[int] | None:
        """The slots it touches (None: any, an RDB's part). Asked only of units a held
        unit of another shard may wait for: the source's bytes forwarded as they are
        (RAW) are parsed here, then."""
        if self.batch is None or self.offset < 0:
            return None
        if self._slots is None:
            self._slots = {s for e in self.batch.entries for s in entry_slots(e)}
        return self._slots


class ShardGate:
    """Where one shard's reader puts its batches (``put``, as into a queue); ``run`` passes
    them on to the task's queue, in order, a held unit once ``Handoff.wait_unit`` lets it."""

    def __init__(self, handoff: Handoff, key: str,
                 put: Callable[[Batch | None], Awaitable[None]]) -> None:
        self.handoff = handoff
        self.key = key
        self._put = put
        self.units: deque[_Unit] = deque()
        self.entries = 0
        self._more = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()

    async def put(self, batch: Batch | None, held: bool = False,
                  received: float = 0.0) -> None:
        pos = batch.checkpoint if batch is not None else None
        offset = getattr(pos, "offset", -1)
        start = self.handoff.parsed.get(self.key, -1)
        self.units.append(_Unit(batch, held, start, offset, received or time.monotonic()))
        if offset >= 0:
            self.handoff.parsed[self.key] = offset
        if batch is not None:
            self.entries += len(batch.entries)
        self._more.set()
        self.handoff.changed()
        if self.entries > HELD_ENTRIES:
            self._room.clear()
            await self._room.wait()

    async def run(self) -> None:
        units = self.units
        while True:
            if not units:
                self._more.clear()
                await self._more.wait()
                continue
            unit = units[0]
            if unit.held:
                await self.handoff.wait_unit(self.key, unit)
            # Pass on the head and the units behind it that need no wait, as one batch.
            # They stay in ``units`` until the task's queue has taken them: another
            # shard's held unit must not go ahead of them meanwhile (``holds``).
            batch = unit.batch
            count = 1
            if batch is not None and not unit.held and batch.checkpoint is not None:
                while count < len(units) and len(batch.entries) < MERGE_ENTRIES:
                    nxt = units[count]
                    if nxt.held or nxt.batch is None or nxt.batch.checkpoint is None:
                        break
                    batch = Batch(batch.entries + nxt.batch.entries, nxt.batch.checkpoint,
                                  batch.nbytes + nxt.batch.nbytes,
                                  batch.keys + nxt.batch.keys)
                    count += 1
            await self._put(batch)
            for _ in range(count):
                done = units.popleft()
                if done.batch is not None:
                    self.entries -= len(done.batch.entries)
            if self.entries <= HELD_ENTRIES:
                self._room.set()
            self.handoff.changed()
            if batch is None:
                return

    def holds(self, slot: int, upto: int) -> bool:
        """Whether a unit not passed on yet, ending at or before ``upto``, touches
        ``slot``."""
        for unit in self.units:
            if unit.start >= upto:
                return False        # (all its events end after ``upto``)
            slots = unit.slots()
            if slots is None or slot in slots:
                return True
        return False


class Handoff:
    def __init__(self, owner: list[str], masters: Mapping[str, Addr], ep: Endpoint,
                 moved: Mapping[int, list[tuple[str, int]]] | None = None) -> None:
        self.owner = owner                       # slot -> shard key ("" unknown)
        # slot -> its previous owners, oldest first, each with its fence: the offset past
        # which that shard's stream has nothing more for the slot
        self.moved: dict[int, list[tuple[str, int]]] = {s: list(h) for s, h in
                                                        (moved or {}).items() if h}
        self.masters = dict(masters)             # shard key -> its master (dialled)
        self.ep = ep
        self.gates: dict[str, ShardGate] = {}
        self.parsed: dict[str, int] = {}         # shard key -> offset read and put
        self.waiting: dict[str, set[str]] = {}   # shard key -> the shards it waits for
        self.waits: dict[str, int] = {}          # shard key -> held units so far (view)
        self.settled: Callable[[int, str], None] = lambda slot, owner: None
        self._conns: dict[str, Connection] = {}
        self._locks: dict[str, asyncio.Lock] = {}   # one call at a time per connection
        self._fences: dict[str, tuple[float, int]] = {}
        self._changed = asyncio.Event()
        self._settled_at = 0.0

    def gate(self, key: str, put: Callable[[Batch | None], Awaitable[None]]) -> ShardGate:
        gate = self.gates[key] = ShardGate(self, key, put)
        return gate

    # --- the readers' side ------------------------------------------------------------------

    def clear(self, me: str, slot: int, offset: int) -> bool:
        """Whether shard ``me``'s event in ``slot`` ending at ``offset`` of its stream may
        go without a look at the other shards (nearly always)."""
        if self.moved:
            hist = self.moved.get(slot)
            if hist is not None:
                for prev, fence in hist:
                    if prev == me and offset <= fence:
                        return True     # its own events from when it owned the slot
                return False
        return self.owner[slot] == me

    def clear_command(self, me: str, args: list[bytes], offset: int) -> bool:
        name = args[0]
        if name in cs.SINGLE_KEY and len(args) > 1:
            return self.clear(me, key_slot(args[1]), offset)
        return all(self.clear(me, s, offset) for s in cs.slots_of(args))

    async def wait_unit(self, me: str, unit: _Unit) -> None:
        """Wait until the held ``unit`` of shard ``me`` may go (see the module's text)."""
        assert unit.batch is not None
        offset = unit.offset
        needs: list[tuple[str, int, int]] = []        # (shard, slot, up to)
        for entry in unit.batch.entries:
            end = entry[3] if entry[0] == COMMAND and len(entry) > 3 else offset
            migrated = None
            if entry[0] == COMMAND and entry[2][0].lower() == b"restore":
                migrated = entry[2][1]
            elif entry[0] == RESTORE:
                migrated = entry[2]
            for slot in entry_slots(entry):
                if not self.clear(me, slot, end):
                    needs += await self._needs(me, slot, end, migrated, unit.received)
        if not needs:
            return
        self.waits[me] = self.waits.get(me, 0) + 1
        try:
            while True:
                left = [(x, slot, upto) for x, slot, upto in needs
                        if not self._done(x, slot, upto)]
                if not left:
                    break
                # Only a wait for a unit another gate holds can be part of a cycle (a
                # reader reads on while its gate holds: reading is no wait).
                self.waiting[me] = {x for x, slot, upto in left
                                    if self.parsed.get(x, -1) >= upto}
                self._check_cycle(me)
                self._changed.clear()
                await self._changed.wait()
        finally:
            self.waiting.pop(me, None)
        now = time.monotonic()
        if now - self._settled_at > SETTLE_EVERY_S:
            self._settle()

    async def _needs(self, me: str, slot: int, end: int, migrated: bytes | None,
                     received: float) -> list[tuple[str, int, int]]:
        out: list[tuple[str, int, int]] = []
        for prev, fence in self.moved.get(slot, ()):
            if prev == me and end <= fence:
                return out      # its own events from when it owned the slot
            out.append((prev, slot, fence))
        prev = self.owner[slot]
        if prev and prev != me and prev in self.masters:
            # the slot's owner is another shard: an import under way, or a map not yet read
            out.append((prev, slot, await self._fence(prev, migrated, received, me)))
        return out

    def _done(self, shard: str, slot: int, upto: int) -> bool:
        if self.parsed.get(shard, -1) < upto:
            return False
        gate = self.gates.get(shard)
        return gate is None or not gate.holds(slot, upto)

    def changed(self) -> None:
        """A shard put or passed on a unit: held units look again."""
        if self.waiting:
            self._changed.set()

    def _settle(self) -> None:
        """Drop the history steps every shard is past: the slot's owner's events go at
        once again."""
        self._settled_at = time.monotonic()
        for slot in list(self.moved):
            hist = self.moved[slot]
            while hist and self._done(hist[0][0], slot, hist[0][1]):
                hist.pop(0)
            if not hist:
                del self.moved[slot]
                self.settled(slot, self.owner[slot])

    def _check_cycle(self, me: str) -> None:
        stack, seen = [me], set()
        while stack:
            at = stack.pop()
            for nxt in self.waiting.get(at, ()):
                if nxt == me:
                    raise HandoffDeadlock(f"source shards {me} and {at} wait for each other "
                                          f"(slots moved both ways at once); going on from "
                                          f"the checkpoint")
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)

    # --- the slot map's side ----------------------------------------------------------------

    async def remap(self, owner: list[str]) -> dict[int, tuple[str, int]]:
        """Take a new slot map; each slot whose owner changed gets its fence (the previous
        owner's master offset, read now). Return those slots: (previous owner, fence)."""
        changed: dict[str, list[int]] = {}
        fences: dict[int, tuple[str, int]] = {}
        for slot in range(SLOTS):
            old, new = self.owner[slot], owner[slot]
            if old != new and old and new:
                changed.setdefault(old, []).append(slot)
        for prev, slots in changed.items():
            if prev not in self.masters:
                continue
            fence = await self._offset(prev)
            for slot in slots:
                self.moved.setdefault(slot, []).append((prev, fence))
                fences[slot] = (prev, fence)
            log.info("source slots %s moved from shard %s to shard(s) %s; their new owners' "
                     "events there wait for shard %s's up to offset %d", _ranges(slots)[:200],
                     prev, ",".join(sorted({owner[s] for s in slots})), prev, fence)
        self.owner[:] = owner
        self._settle()
        self.changed()
        return fences

    def tick(self) -> None:
        """Every second (the slot map's poll): settle what is past."""
        if self.moved:
            self._settle()

    @staticmethod
    def moved_from_json(d: Mapping[str, Any] | None) -> dict[int, list[tuple[str, int]]]:
        return {int(s): [(str(h[0]), int(h[1])) for h in hist] for s, hist in
                (d or {}).items()}

    # --- the masters ------------------------------------------------------------------------

    async def _conn(self, shard: str) -> Connection:
        conn = self._conns.get(shard)
        if conn is None:
            conn = await Connection.open(*self.masters[shard], role="source", ep=self.ep)
            self._conns[shard] = conn
        return conn

    async def _call(self, shard: str, *args: bytes | str) -> Any:
        async with self._locks.setdefault(shard, asyncio.Lock()):
            conn = await self._conn(shard)
            return await conn.call(*args)

    async def _offset(self, shard: str) -> int:
        info = parse_info(await self._call(shard, "INFO", "replication"))
        return int(info.get("master_repl_offset", "0") or 0)

    async def _fence(self, prev: str, gone: bytes | None, received: float, me: str) -> int:
        """``prev``'s master offset read after ``received`` (and, for a migrated key
        ``gone``, after the key left ``prev``)."""
        if gone is None:
            cached = self._fences.get(prev)
            if cached is not None and cached[0] > received:
                return cached[1]
        else:
            deadline = time.monotonic() + GONE_TIMEOUT_S
            while True:
                try:
                    held = await self._call(prev, "EXISTS", gone)
                except ServerReplyError:
                    held = 0        # MOVED/ASK: the slot or the key has left it
                if not held:
                    break
                if time.monotonic() > deadline:
                    raise FatalTaskError(
                        f"source key {gone[:80]!r} was copied to shard {me} by MIGRATE but "
                        f"shard {prev} still holds it after {GONE_TIMEOUT_S:g}s (MIGRATE "
                        f"... COPY?): the two copies cannot be ordered; resync the task "
                        f"once the resharding is done")
                await asyncio.sleep(GONE_POLL_S)
        asked = time.monotonic()
        fence = await self._offset(prev)
        if gone is None:
            self._fences[prev] = (asked, fence)
        return fence

    def close(self) -> None:
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()


def moved_json(moved: Mapping[int, list[tuple[str, int]]]) -> dict[str, Any]:
    """Moved slots' histories as the checkpoint keeps them (``moved_from_json``)."""
    return {str(s): [list(step) for step in hist] for s, hist in moved.items() if hist}
