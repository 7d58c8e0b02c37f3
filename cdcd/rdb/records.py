"""What the splitter emits (key, function and big-value records) and its errors."""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any


class RdbError(Exception):
    """A malformed or unsupported RDB: what went wrong and at which byte offset."""


class KeyRecord:
    """One key of the RDB with its value as a ready DUMP payload."""

    __slots__ = ("db", "expire_ms", "freq", "idle", "key", "payload", "rdb_type")

    def __init__(self, db: int, key: bytes, rdb_type: int, payload: bytes, expire_ms: int,
                 idle: int | None, freq: int | None) -> None:
        self.db = db
        self.key = key
        self.rdb_type = rdb_type
        self.payload = payload
        self.expire_ms = expire_ms
        self.idle = idle
        self.freq = freq

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, KeyRecord):
            return NotImplemented
        return (self.db == other.db and self.key == other.key
                and self.rdb_type == other.rdb_type and self.payload == other.payload
                and self.expire_ms == other.expire_ms and self.idle == other.idle
                and self.freq == other.freq)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (f"KeyRecord(db={self.db}, key={self.key[:64]!r}, rdb_type={self.rdb_type}, "
                f"payload=<{len(self.payload)} bytes>, expire_ms={self.expire_ms}, "
                f"idle={self.idle}, freq={self.freq})")


class FunctionRecord:
    """A function library (FUNCTION2 opcode): the code given to FUNCTION LOAD."""

    __slots__ = ("code",)

    def __init__(self, code: bytes) -> None:
        self.code = code

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FunctionRecord):
            return NotImplemented
        return self.code == other.code

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"FunctionRecord(code=<{len(self.code)} bytes>)"


class BigValueStart:
    """A value over the splitter's threshold begins; its elements follow in
    :class:`BigValueChunk` records, then a :class:`BigValueEnd`.

    ``kind`` is what the value is: "string", "list", "set", "zset" or "hash"; ``size`` is
    a string's length (0 for the others).
    """

    __slots__ = ("db", "expire_ms", "freq", "idle", "key", "kind", "rdb_type", "size")

    def __init__(self, db: int, key: bytes, rdb_type: int, kind: str, size: int,
                 expire_ms: int, idle: int | None, freq: int | None) -> None:
        self.db = db
        self.key = key
        self.rdb_type = rdb_type
        self.kind = kind
        self.size = size
        self.expire_ms = expire_ms
        self.idle = idle
        self.freq = freq

    def __repr__(self) -> str:
        return (f"BigValueStart(db={self.db}, key={self.key[:64]!r}, rdb_type={self.rdb_type}, "
                f"kind={self.kind}, size={self.size}, expire_ms={self.expire_ms})")


class BigValueChunk:
    """The next decoded elements of a big value, in order: string pieces; list or set
    members; hash field, value, field, value ...; zset member, score, ... (a score as
    text that parses back to the same double); stream (id, [field, value, ...])."""

    __slots__ = ("items",)

    def __init__(self, items: list[Any]) -> None:
        self.items = items

    def __repr__(self) -> str:
        return f"BigValueChunk(<{len(self.items)} items>)"


@dataclass(kw_only=True)
class StreamGroup:
    """A consumer group of a big stream, as XINFO/XPENDING or the RDB describe it."""

    name: bytes
    last_id: bytes
    entries_read: int | None = None     # Redis 7.0+, None when unknown
    consumers: list[bytes] = field(default_factory=list)
    # (entry id, consumer, last delivery unix ms, delivery count)
    pending: list[tuple[bytes, bytes, int, int]] = field(default_factory=list)


@dataclass(kw_only=True)
class StreamMeta:
    """What a stream holds besides its entries: id counters and consumer groups."""

    last_id: bytes
    entries_added: int | None = None    # Redis 7.0+
    max_deleted_id: bytes | None = None  # Redis 7.0+
    groups: list[StreamGroup] = field(default_factory=list)


class BigValueEnd:
    """The big value started by the last :class:`BigValueStart` is complete; a stream's
    counters and groups come with it."""

    __slots__ = ("stream",)

    def __init__(self, stream: StreamMeta | None = None) -> None:
        self.stream = stream

    def __repr__(self) -> str:
        return f"BigValueEnd(stream={self.stream!r})"


Record = KeyRecord | FunctionRecord | BigValueStart | BigValueChunk | BigValueEnd
Buffer = bytes | bytearray
Want = Callable[[int, bytes], bool]
_Parse = Generator[int, None, int]  # yields the buffer index it needs, returns the end


class _NeedMore(Exception):
    """The buffer ends before index ``need``."""

    __slots__ = ("need",)

    def __init__(self, need: int) -> None:
        self.need = need


class _Corrupt(Exception):
    """Malformed data at buffer index ``pos``; turned into RdbError with the stream offset."""

    def __init__(self, what: str, pos: int) -> None:
        super().__init__(what)
        self.what = what
        self.pos = pos
