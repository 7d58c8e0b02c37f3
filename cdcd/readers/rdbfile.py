"""Read a backup file as a source: ``source: {"rdb_file": "/path/dump.rdb"}``.

The file goes through the psync reader's RDB path (splitter, filters, big keys, write
modes) as a stream of slices read in a worker thread, never loaded whole; progress counts
the bytes read of the file's size. Only ``full_amount_migration``: a file has no stream
of changes after it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from typing import IO, Any

from ..compat import RESTORE_PLAN, WritePlan
from ..entry import Batch
from ..errors import EndpointError, FatalTaskError
from ..progress import Progress
from ..rdb import SUPPORTED_VERSIONS
from ..resp import Connection
from ..spec import TaskSpec
from .psync import PsyncReader
from .splitproc import RDB_SLICE

log = logging.getLogger("cdcd.reader.rdbfile")

FILE_READ = 1 << 20


class RdbFileError(Exception):
    """The file cannot be a source: what is wrong with it."""


@dataclass(frozen=True, kw_only=True)
class RdbFileInfo:
    path: str
    size: int
    magic: str                  # "REDIS" or "VALKEY"
    version: int                # the RDB version, that of its DUMP payloads

    @property
    def label(self) -> str:
        return f"RDB file {self.path} ({self.magic} RDB {self.version}, {self.size} bytes)"


def inspect(path: str) -> RdbFileInfo:
    """Open the file and read its header; raise RdbFileError saying what is wrong."""
    if not os.path.isabs(path):
        raise RdbFileError(f"{path!r} is not an absolute path")
    try:
        with open(path, "rb") as f:
            if not os.path.isfile(path):
                raise RdbFileError(f"{path} is not a regular file")
            head = f.read(9)
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        raise RdbFileError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise RdbFileError(f"{path} is a directory, not an RDB file") from None
    except OSError as exc:
        raise RdbFileError(f"{path} cannot be read: {exc.strerror or exc}") from None
    for magic, versions in SUPPORTED_VERSIONS.items():
        digits = head[len(magic):]
        if head.startswith(magic.encode()) and digits.isdigit():
            version = int(digits)
            if version not in versions:
                raise RdbFileError(f"{path} is an RDB of version {version} ({magic}), which "
                                   f"cdcd does not read (it reads " + ", ".join(
                                       f"{m} {v[0]}-{v[-1]}"
                                       for m, v in SUPPORTED_VERSIONS.items()) + ")")
            return RdbFileInfo(path=path, size=size, magic=magic, version=version)
    raise RdbFileError(f"{path} is not an RDB file (it starts with {head[:9]!r}, not "
                       f"REDIS0009..REDIS0012 or VALKEY080/081)")


class RdbFileReader(PsyncReader):
    """The psync reader's RDB path, fed from a file instead of a replication link."""

    def __init__(self, spec: TaskSpec, progress: Progress, *,
                 plan: WritePlan = RESTORE_PLAN) -> None:
        super().__init__(spec, progress, resume=None, host="", port=0, rdb_only=True,
                         plan=plan)
        self.path = spec.source.rdb_file
        self.name = f"RDB file {self.path}"
        self.file: IO[bytes] | None = None
        self.size = 0
        self._chunk = b""           # read from the file, not handed to the splitter yet
        self._at = 0

    async def run(self, out: asyncio.Queue[Batch | None]) -> None:
        try:
            info = await asyncio.to_thread(inspect, self.path)
            self.file = await asyncio.to_thread(open, self.path, "rb")
        except (RdbFileError, OSError) as exc:
            raise FatalTaskError(f"source: {exc}") from None
        try:
            self.size = info.size
            self.progress.file_bytes_total = info.size
            self.progress.file_bytes_read = 0
            try:
                await self._read_rdb(None, out)    # type: ignore[arg-type]
            except EndpointError as exc:           # the file ended early: no retry helps
                raise FatalTaskError(f"{exc.message} (the file is truncated, or changed "
                                     f"while read)") from None
            self.progress.keys_total = self.progress.keys_done
            await out.put(None)
        finally:
            self.file.close()

    async def _line(self, conn: Connection) -> bytes:
        return b"$%d" % self.size          # the header a master sends before its RDB

    async def _read(self, conn: Connection, n: int = RDB_SLICE) -> bytes:
        """The next slice of at most ``n`` bytes: the file is read a MiB at a time in a
        worker thread, handed out in slices (each a turn of the event loop, as from a
        socket)."""
        assert self.file is not None
        if self._at >= len(self._chunk):
            try:
                data: Any = await asyncio.to_thread(self.file.read, FILE_READ)
            except OSError as exc:
                raise FatalTaskError(f"{self.name}: read failed: {exc}") from None
            if not data:
                raise FatalTaskError(f"{self.name}: the file ended after "
                                     f"{self.progress.file_bytes_read} bytes, before the "
                                     f"RDB's end (truncated, or changed while read)")
            self._chunk, self._at = bytes(data), 0
        piece = self._chunk[self._at:self._at + n]
        self._at += len(piece)
        self.progress.file_bytes_read += len(piece)
        return piece
