"""The exactly-once markers: the only keys cdcd keeps on a target for itself.

A task's marker ``cdcd:checkpoint:<task_id>`` holds ``replid offset db``: the stream
position of the last batch applied. It lives in a db of the target the task does not write
(``choose_db``), so the user's dbs hold exactly the source's keys (DBSIZE equal); records
of older versions keep theirs in db 0. The writer sets it inside the same MULTI/EXEC
as the batch, so the target itself says what it holds, whatever the store or a crash did.
On every (re)connect the task reads it back and compares it with its own checkpoint
(``judge``): the target's word wins. Everything about markers (name, format, how a batch
writes one, how a resume reads it, how they are purged and told apart from user keys)
lives here.
"""

from __future__ import annotations

import dataclasses
from binascii import crc_hqx
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache, cached_property

from .errors import FatalTaskError
from .readers.psync import StreamPos
from .resp import Connection

PREFIX = b"cdcd:checkpoint:"
TMP_PREFIX = b"cdcd:tmp:"          # big keys being rebuilt (readers/bigkey.py)
MARKER_DB = 0                       # where markers lived before choose_db, and the fallback
CDCD_PREFIXES = (PREFIX, TMP_PREFIX)


def parse_marker(conn: Connection, key: bytes, raw: bytes, *, data: bool = False
                 ) -> StreamPos:
    """A marker's value: ``replid offset db``, then optionally, with ``data`` (a task's
    marker) where the last data command ended, else (a slot's marker) the cluster source's
    shard whose stream it speaks for."""
    try:
        replid, offset, db, *rest = raw.decode().split()
        if len(rest) > 1:
            raise ValueError(raw)
        if data:
            return StreamPos(replid=replid, offset=int(offset), db=int(db),
                             data=int(rest[0]) if rest else -1)
        return StreamPos(replid=replid, offset=int(offset), db=int(db),
                         shard=rest[0] if rest else "")
    except ValueError:
        raise FatalTaskError(f"{conn.name}: checkpoint key {key[:80].decode(errors='replace')}"
                             f" holds {raw[:60]!r}, not a cdcd checkpoint") from None


def is_cdcd_key(key: bytes) -> bool:
    """Say whether a target key is cdcd's own (a marker or a big key being rebuilt)."""
    return key.startswith(CDCD_PREFIXES)


@dataclass(frozen=True, kw_only=True)
class Verdict:
    """What a task resumes from after comparing its checkpoint with the target's marker.

    ``resume``: the position to ask the source for (None: a full sync); ``lost``: a
    sentence when the target does not hold what the checkpoint says (restarted empty,
    flushed, rolled back to an older snapshot), else "".
    """

    resume: StreamPos | None
    lost: str = ""
    full: bool = False
    # A cluster target: slot -> offset its marker holds, for the slots whose marker is
    # past ``resume`` (the replayed stream skips, per slot, what the slot already holds).
    skip: dict[int, int] = field(default_factory=dict)


def choose_db(databases: int, written: Callable[[int], bool], source_dbs: Iterable[int]
              ) -> int:
    """Pick the db for a task's marker: the highest db the task never writes; when it may
    write every db (no filter.dbs), the highest one no source db with keys maps to now;
    db 0 when there is none."""
    for db in range(databases - 1, -1, -1):
        if not written(db):
            return db
    busy = set(source_dbs)
    for db in range(databases - 1, -1, -1):
        if db not in busy:
            return db
    return MARKER_DB


class Markers:
    """One task's marker on one target."""

    def __init__(self, task_id: str, db: int = MARKER_DB) -> None:
        self.key = PREFIX + task_id.encode()
        self.db = db

    @property
    def keys(self) -> list[str]:
        """The marker keys as the task view lists them (db, key)."""
        return [f"db {self.db}: {self.key.decode()}"]

    def key_for(self, shard: str) -> bytes:
        """A cluster source's shards each have their own marker (``<key>:<shard>``)."""
        return self.key + b":" + shard.encode() if shard else self.key

    def command(self, pos: StreamPos) -> list[bytes]:
        """The command that records ``pos``, sent in ``db`` inside the batch's MULTI/EXEC."""
        data = f" {pos.data}" if pos.data >= 0 else ""
        return [b"SET", self.key_for(pos.shard),
                f"{pos.replid} {pos.offset} {pos.db}{data}".encode()]

    async def read(self, conn: Connection, shard: str = "") -> StreamPos | None:
        """Read the position the target holds (None when it has no marker)."""
        await conn.select(self.db)
        key = self.key_for(shard)
        raw = await conn.call("GET", key)
        if not raw:
            return None
        return parse_marker(conn, key, raw, data=True)

    async def purge(self, conn: Connection) -> int:
        """Delete the marker and a cluster source's per-shard markers (SCAN, never KEYS:
        the marker db may be a user's db 0 for records of older versions)."""
        await conn.select(self.db)
        keys = [self.key]
        cursor = b"0"
        while True:
            cursor, found = await conn.call("SCAN", cursor, "MATCH", self.key + b":*",
                                            "COUNT", 1000)
            keys += found
            if cursor == b"0":
                break
        return int(await conn.call("DEL", *keys))

    async def judge(self, conn: Connection, local: StreamPos | None,
                    shard: str = "") -> Verdict:
        """Compare the task's checkpoint with what the target holds; the target wins.

        - marker present: resume from it. It is newer than ``local`` when the store missed
          the last checkpoints (a crash), older when the target went back in time (restarted
          from an older RDB/AOF): then the stream between the two is applied again, once.
        - marker missing although the task has streamed to this target: the target lost
          the data (restarted without persistence, flushed): a full sync.
        """
        remote = await self.read(conn, shard)
        if remote is None:
            if local is None:
                return Verdict(resume=None)
            return Verdict(resume=None, full=True,
                           lost=f"{conn.name} no longer holds the checkpoint marker "
                                f"{self.key_for(shard).decode()} (restarted empty or "
                                f"flushed) although "
                                f"offset {local.offset} was applied")
        if local is not None and remote.offset < local.offset:
            return Verdict(resume=remote,
                           lost=f"{conn.name} went back to offset {remote.offset} (the "
                                f"checkpoint says {local.offset}; restarted from an older "
                                f"snapshot?); resuming from the target's marker")
        return Verdict(resume=remote)


# --- a cluster target: one marker per slot -----------------------------------------------

SLOTS = 16384


@cache
def slot_tags() -> tuple[bytes, ...]:
    """For every slot, a short hash tag whose CRC16 falls in it (the first hex number
    that does): ``{tag}`` puts a marker key in the slot it speaks for."""
    tags: list[bytes | None] = [None] * SLOTS
    left, i = SLOTS, 0
    while left:
        tag = b"%x" % i
        slot = crc_hqx(tag, 0) & (SLOTS - 1)
        if tags[slot] is None:
            tags[slot] = tag
            left -= 1
        i += 1
    return tuple(t for t in tags if t is not None)


def _ranges(slots: Iterable[int]) -> str:
    out: list[str] = []
    start = prev = -2
    for s in sorted(slots):
        if s != prev + 1:
            if start >= 0:
                out.append(f"{start}-{prev}" if prev != start else str(start))
            start = s
        prev = s
    if start >= 0:
        out.append(f"{start}-{prev}" if prev != start else str(start))
    return ",".join(out)


class SlotMarkers:
    """A task's markers on a Redis Cluster target: ``cdcd:checkpoint:<task_id>:{tag}``,
    one per slot, in the slot itself.

    A MULTI/EXEC on a cluster may only touch one slot, so there is no key a whole batch
    could be recorded in. Instead each slot's part of a batch is one MULTI/EXEC that also
    sets that slot's marker to the stream position (``replid offset db``) up to which the
    slot holds every command. A marker moves with its slot when the cluster is resharded
    and with the data to a replica, so it always speaks for the data beside it. After the
    snapshot every slot gets one (16384 small keys: bounded, listed in the view, ignored
    by verify, purged on request); the writer rewrites the markers of idle slots in turn
    (``REFRESH_S``), so none is much older than the stream.
    """

    REFRESH_S = 2.0

    def __init__(self, task_id: str) -> None:
        self.prefix = PREFIX + task_id.encode() + b":{"

    @cached_property
    def tags(self) -> tuple[bytes, ...]:
        """The slots' tags: built once per process (0.2 s: cluster pipelines build them in
        a thread first, see Task._cluster_writer), then cached."""
        return slot_tags()

    @property
    def keys(self) -> list[str]:
        return [f"db 0 of every master: {self.prefix.decode()}<tag>}} (one per slot, 16384)"]

    def key(self, slot: int) -> bytes:
        return self.prefix + self.tags[slot] + b"}"

    @staticmethod
    def value(replid: str, offset: int, db: int, shard: str = "") -> bytes:
        if shard:
            return f"{replid} {offset} {db} {shard}".encode()
        return f"{replid} {offset} {db}".encode()

    async def _scan(self, conn: Connection) -> AsyncIterator[list[bytes]]:
        """The task's slot markers on one master, a SCAN page at a time."""
        cursor = b"0"
        while True:
            cursor, keys = await conn.call("SCAN", cursor, "MATCH", self.prefix + b"*",
                                           "COUNT", 2000)
            if keys:
                yield keys
            if cursor == b"0":
                return

    async def read(self, conns: Sequence[Connection]) -> dict[int, StreamPos]:
        """Every slot marker the masters hold: slot -> position."""
        from .topology import key_slot
        out: dict[int, StreamPos] = {}
        for conn in conns:
            async for keys in self._scan(conn):
                values = await conn.pipeline([["GET", k] for k in keys])
                for k, raw in zip(keys, values):
                    if isinstance(raw, bytes):     # else moved meanwhile
                        out[key_slot(k)] = parse_marker(conn, k, raw)
        missing = [s for s in range(SLOTS) if s not in out]
        if missing and len(missing) < SLOTS:
            # A slot migrating between masters while we scanned them one after the other:
            # ask every master for those keys (ASKING reaches a key already imported).
            for conn in conns:
                cmds: list[list[bytes]] = []
                for slot in missing:
                    cmds += [[b"ASKING"], [b"GET", self.key(slot)]]
                replies = await conn.pipeline(cmds)
                for slot, raw in zip(missing, replies[1::2]):
                    if isinstance(raw, bytes) and slot not in out:
                        out[slot] = parse_marker(conn, self.key(slot), raw)
        return out

    async def purge(self, conns: Sequence[Connection]) -> int:
        removed = 0
        for conn in conns:
            async for keys in self._scan(conn):
                replies = await conn.pipeline([["DEL", k] for k in keys])
                removed += sum(r for r in replies if isinstance(r, int))
        return removed

    @staticmethod
    def judge(marks: dict[int, StreamPos], local: StreamPos | None,
              changed: dict[str, list[int]],
              slots: Iterable[int] | None = None, shard: str = "",
              moved_from: dict[int, int] | None = None) -> Verdict:
        """Compare the task's checkpoint with the slot markers; the markers win.

        ``changed``: masters (by name) that are not the servers the checkpoint was written
        to (restarted, or a replica promoted in a failover), with their slots: their data
        may be older than the checkpoint, down to what their slot markers say.

        - a slot without a marker although the task streamed: the cluster lost data (a
          master restarted empty, a flush, a failover to a replica that had nothing yet):
          a full sync;
        - else resume from the checkpoint, or from the oldest marker of a changed master's
          slots when that is older; each slot then skips what its marker says it holds.

        ``slots``: judge only these (a cluster source's shard ``shard``: its slots' markers
        hold its stream's positions). Slots move between a source's shards (handoff.py):
        a marker names the shard whose stream wrote it; a slot that moved in and still has
        its previous owner's marker holds nothing of this shard's yet; in a slot that moved
        away (``moved_from``: slot -> fence, its events up to the fence not all checkpointed
        yet) whose marker another shard wrote since, this shard's events up to the fence
        are all applied (the other shard's waited for them).
        """
        away: dict[int, int] = {}
        if slots is not None:
            mine = set(slots)
            missing = sorted(mine - set(marks))
            for s, p in marks.items():
                if s in mine:
                    continue
                if p.shard == shard and shard:
                    away[s] = p.offset
                elif moved_from and s in moved_from:
                    away[s] = moved_from[s]
            marks = {s: p for s, p in marks.items()
                     if s in mine and p.shard in ("", shard)}
            changed = {name: [s for s in ss if s in marks] for name, ss in changed.items()}
            changed = {name: ss for name, ss in changed.items() if ss}
        else:
            missing = [s for s in range(SLOTS) if s not in marks]
        if local is None:
            if missing:
                return Verdict(resume=None)
            # Every slot marked, the store without a position (a crash before the first
            # checkpoint was saved): the snapshot is whole; resume from the oldest marker.
            if not marks:
                return Verdict(resume=None)
            oldest = min(marks.values(), key=lambda p: p.offset)
            skip = {s: p.offset for s, p in marks.items() if p.offset > oldest.offset}
            skip.update((s, o) for s, o in away.items() if o > oldest.offset)
            return Verdict(resume=dataclasses.replace(oldest, shard=""), skip=skip)
        if missing:
            return Verdict(resume=None, full=True,
                           lost=f"the target cluster has no checkpoint marker for "
                                f"{len(missing)} slots ({_ranges(missing)[:200]}) although "
                                f"offset {local.offset} was applied (a master restarted "
                                f"empty, was flushed, or a replica that had not received "
                                f"them yet was promoted)")
        resume: StreamPos = local
        why: list[str] = []
        for name, slots in changed.items():
            for s in slots:
                if marks[s].offset < resume.offset:
                    resume = marks[s]
            why.append(name)
        skip = {s: p.offset for s, p in marks.items() if p.offset > resume.offset}
        skip.update((s, o) for s, o in away.items() if o > resume.offset)
        if resume is not local:
            resume = dataclasses.replace(resume, shard="")
        lost = ""
        if resume is not local:
            lost = (f"target master {', '.join(why)} changed (restarted or failed over) and "
                    f"may hold less than the checkpoint (offset {local.offset}); resuming "
                    f"from offset {resume.offset}, each slot skipping what its marker says "
                    f"it holds")
        return Verdict(resume=resume, lost=lost, skip=skip)
