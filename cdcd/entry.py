"""The unit of work that flows from a reader to the writer.

Entries are plain tuples (the snapshot moves millions of them; tuples are the cheapest
Python objects to build and unpack):

    (RESTORE, db, key, expire_ms, payload)  expire_ms is absolute unix ms, 0 = no expiry
    (COMMAND, db, args)                     a replicated command, args a list of bytes
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

from typing import Any

RESTORE = 0
COMMAND = 1
RAW = 2

Entry = tuple[Any, ...]


class Batch:
    __slots__ = ("entries", "checkpoint", "nbytes", "keys")

    def __init__(self, entries: list[Entry], checkpoint: Any = None, nbytes: int = 0,
                 keys: int = 0) -> None:
        self.entries = entries
        self.checkpoint = checkpoint
        self.nbytes = nbytes
        self.keys = keys
