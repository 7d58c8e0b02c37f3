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

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .errors import FatalTaskError
from .readers.psync import StreamPos
from .resp import Connection

PREFIX = b"cdcd:checkpoint:"
TMP_PREFIX = b"cdcd:tmp:"          # big keys being rebuilt (readers/bigkey.py)
MARKER_DB = 0                       # where markers lived before choose_db, and the fallback
CDCD_PREFIXES = (PREFIX, TMP_PREFIX)


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

    def command(self, pos: StreamPos) -> list[bytes]:
        """The command that records ``pos``, sent in ``db`` inside the batch's MULTI/EXEC."""
        return [b"SET", self.key, f"{pos.replid} {pos.offset} {pos.db}".encode()]

    async def read(self, conn: Connection) -> StreamPos | None:
        """Read the position the target holds (None when it has no marker)."""
        await conn.select(self.db)
        raw = await conn.call("GET", self.key)
        if not raw:
            return None
        try:
            replid, offset, db = raw.decode().split()
            return StreamPos(replid=replid, offset=int(offset), db=int(db))
        except ValueError:
            raise FatalTaskError(f"{conn.name}: checkpoint key {self.key.decode()} holds "
                                 f"{raw[:60]!r}, not a cdcd checkpoint") from None

    async def purge(self, conn: Connection) -> int:
        await conn.select(self.db)
        return int(await conn.call("DEL", self.key))

    async def judge(self, conn: Connection, local: StreamPos | None) -> Verdict:
        """Compare the task's checkpoint with what the target holds; the target wins.

        - marker present: resume from it. It is newer than ``local`` when the store missed
          the last checkpoints (a crash), older when the target went back in time (restarted
          from an older RDB/AOF): then the stream between the two is applied again, once.
        - marker missing although the task has streamed to this target: the target lost
          the data (restarted without persistence, flushed): a full sync.
        """
        remote = await self.read(conn)
        if remote is None:
            if local is None:
                return Verdict(resume=None)
            return Verdict(resume=None, full=True,
                           lost=f"{conn.name} no longer holds the checkpoint marker "
                                f"{self.key.decode()} (restarted empty or flushed) although "
                                f"offset {local.offset} was applied")
        if local is not None and remote.offset < local.offset:
            return Verdict(resume=remote,
                           lost=f"{conn.name} went back to offset {remote.offset} (the "
                                f"checkpoint says {local.offset}; restarted from an older "
                                f"snapshot?); resuming from the target's marker")
        return Verdict(resume=remote)
