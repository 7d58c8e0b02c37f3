"""The exactly-once markers: the only keys cdcd keeps on a target for itself.

A task's marker ``cdcd:checkpoint:<task_id>`` (target db 0) holds ``replid offset db``: the
stream position of the last batch applied. The writer sets it inside the same MULTI/EXEC
as the batch, so the target itself says what it holds, whatever the store or a crash did.
On every (re)connect the task reads it back and compares it with its own checkpoint
(``judge``): the target's word wins. Everything about markers (name, format, how a batch
writes one, how a resume reads it, how they are purged and told apart from user keys)
lives here.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import FatalTaskError
from .readers.psync import StreamPos
from .resp import Connection

PREFIX = b"cdcd:checkpoint:"
TMP_PREFIX = b"cdcd:tmp:"          # big keys being rebuilt (readers/bigkey.py)
MARKER_DB = 0
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


class Markers:
    """One task's marker on one target."""

    def __init__(self, task_id: str) -> None:
        self.key = PREFIX + task_id.encode()

    @property
    def keys(self) -> list[str]:
        """The marker keys as the task view lists them (db, key)."""
        return [f"db {MARKER_DB}: {self.key.decode()}"]

    def command(self, pos: StreamPos) -> list[bytes]:
        """The command that records ``pos``, sent in db 0 inside the batch's MULTI/EXEC."""
        return [b"SET", self.key, f"{pos.replid} {pos.offset} {pos.db}".encode()]

    async def read(self, conn: Connection) -> StreamPos | None:
        """Read the position the target holds (None when it has no marker)."""
        await conn.select(MARKER_DB)
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
        await conn.select(MARKER_DB)
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
