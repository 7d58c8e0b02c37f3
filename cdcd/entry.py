"""The unit of work that flows from a reader to the writer.

Entries are plain tuples (the snapshot moves millions of them; tuples are the cheapest
Python objects to build and unpack):

    (RESTORE, db, key, expire_ms, payload)  expire_ms is absolute unix ms, 0 = no expiry
    (COMMAND, db, args)                     a command, args a list of bytes
    (COMMAND, db, args, end)                a command of the replication stream and the
                                            stream offset just after it (a cluster target
                                            skips, per slot, what a replay repeats)
    (STRINGS, db, pairs, keys, nbytes)      plain string keys without a TTL: ``pairs`` is
                                            [key, value, key, value ...] (``nbytes`` of
                                            values); the writer sends one MSET for them
    (RAW, db, segments, replies, ops, end_db)
                                            replicated commands forwarded as the source sent
                                            them: RESP byte segments starting in db ``db``
                                            (SELECTs inside, ending in ``end_db``), answered
                                            by ``replies`` replies, ``ops`` of them data
                                            commands

A Batch groups entries with the checkpoint that becomes durable once the target has
acknowledged every entry of the batch (and of all batches before it).
"""

from __future__ import annotations

import struct
from typing import Any

import anycrc

RESTORE = 0
COMMAND = 1
RAW = 2
STRINGS = 3

Entry = tuple[Any, ...]


class Batch:
    __slots__ = ("entries", "checkpoint", "nbytes", "keys")

    def __init__(self, entries: list[Entry], checkpoint: Any = None, nbytes: int = 0,
                 keys: int = 0) -> None:
        self.entries = entries
        self.checkpoint = checkpoint
        self.nbytes = nbytes
        self.keys = keys


def restore_entry(db: int, key: bytes, rdb_type: int, payload: bytes, expire_ms: int,
                  idle: int | None, freq: int | None) -> Entry:
    """Build the writer's RESTORE entry straight from an RDB record (the splitter's
    ``key_record``)."""
    return (RESTORE, db, key, expire_ms if expire_ms > 0 else 0, payload)


# A string's DUMP payload: type 0, the RDB string, a 2-byte RDB version, CRC64. The string
# encoding has not changed since DUMP exists, so version 6 (Redis 2.6) loads everywhere.
_crc64 = anycrc.Model("CRC64-REDIS").calc
_U32 = struct.Struct(">I")
_TAIL_VERSION = b"\x06\x00"


def string_payload(value: bytes) -> bytes:
    """Build the DUMP payload of a plain string value."""
    n = len(value)
    if n < 64:
        head = bytes((0, n))
    elif n < 16384:
        head = bytes((0, 0x40 | (n >> 8), n & 0xFF))
    elif n <= 0xFFFFFFFF:
        head = b"\x00\x80" + _U32.pack(n)
    else:
        head = b"\x00\x81" + n.to_bytes(8, "big")
    body = head + value + _TAIL_VERSION
    crc: int = _crc64(body)
    return body + crc.to_bytes(8, "little")
