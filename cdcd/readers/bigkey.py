"""Copy a value too big for one RESTORE as a series of commands into a temporary key.

Both readers hand a big value to a :class:`BigKey` as decoded pieces (string bytes,
list/set members, hash field/value pairs, zset member/score pairs, stream entries) and
get plain COMMAND entries back, which flow through the writer like any other:

    DEL tmp                                     a leftover of an interrupted copy
    SETRANGE tmp <len-1> "\\0"; SETRANGE tmp <off> <piece> ...            string
    HSET | RPUSH | SADD | ZADD tmp ...          at most chunk_elements / chunk_bytes each
    XADD tmp <id> f v ...; XSETID; XGROUP CREATE; XGROUP CREATECONSUMER; XCLAIM  stream
    RENAME tmp key                              existing_keys replace
    RENAMENX tmp key; DEL tmp                   existing_keys skip (the target's key wins)

With an expiry the last step is one MULTI/EXEC, so the key appears with its TTL at once:
``MULTI; RENAME tmp key; PEXPIREAT key <ms>; EXEC`` (an expiry already past then deletes
the key, as RESTORE ... REPLACE ABSTTL does), or for skip
``MULTI; PEXPIREAT tmp <ms>; RENAMENX tmp key; DEL tmp; EXEC``. The key itself is only
ever touched by that last step, so a client of the target sees the old value (or none)
until the new one is complete.

The temporary key, ``cdcd:tmp:<task_id>:...``, hashes to the key's cluster slot (RENAME
needs both keys in one slot): see :func:`temp_key`. A copy cut short (crash, lost link)
leaves it behind; the next copy of the same key deletes it first.
"""

from __future__ import annotations

import binascii
import functools
import struct
from collections.abc import Sequence
from typing import Any

from ..entry import COMMAND, Entry
from ..rdb import StreamGroup, StreamMeta

# A value whose serialized size (psync: bytes in the RDB) or estimated size (scan:
# MEMORY USAGE) is above this is copied in chunks. Up to it, values travel as one DUMP
# payload / RESTORE: exact encodings, and C speed instead of Python per element. With at
# most ~13 batches between reader and writer (queue + in flight + the one being built),
# each at most ~1 MiB plus one value, values up to 8 MiB keep the daemon well under its
# 200 MB budget even for a dataset made only of such values; chunking starts far below
# the target's proto-max-bulk-len (512 MB), which bounds any single command.
BIG_VALUE_BYTES = 8 << 20
# Each chunk command carries at most this many bytes / elements: short enough that one
# command never blocks the target for long (an HSET of 1024 fields takes ~0.2 ms) and
# that a batch of the writer holds a handful of them.
CHUNK_BYTES = 1 << 20
CHUNK_ELEMENTS = 1024
# What one element costs the daemon beyond its bytes while it waits in a batch (its bytes
# object, list slots, the writer's RESP header for it): the sizes add_* return count it,
# so a batch of tiny elements holds ~15k of them, not 70k.
ITEM_COST = 64

KINDS = ("string", "hash", "list", "set", "zset", "stream")
_ADD = {"hash": b"HSET", "list": b"RPUSH", "set": b"SADD", "zset": b"ZADD"}
_STEP = {"hash": 2, "list": 1, "set": 1, "zset": 2}
_double = struct.Struct("<d").unpack


def hash_tag(key: bytes) -> bytes | None:
    """The part of the key Redis Cluster hashes, when it has a non-empty {tag}."""
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            return key[start + 1:end]
    return None


def key_slot(key: bytes) -> int:
    """Cluster slot of a key: CRC16 (XMODEM, which binascii.crc_hqx is) mod 16384."""
    tag = hash_tag(key)
    return binascii.crc_hqx(tag if tag is not None else key, 0) & 16383


@functools.lru_cache(maxsize=1024)
def slot_tag(slot: int) -> bytes:
    """A short string that hashes to ``slot`` (found by search: ~16k CRCs at worst)."""
    i = 0
    while True:
        tag = b"%x" % i
        if binascii.crc_hqx(tag, 0) & 16383 == slot:
            return tag
        i += 1


def temp_key(task_id: str, key: bytes) -> bytes:
    """Name the temporary key a big value is rebuilt in: same cluster slot as ``key``.

    The prefix ``cdcd:tmp:<task_id>:`` holds no brace (task ids are [A-Za-z0-9_.-]), so:
    a key with a hash tag keeps it (``cdcd:tmp:t:{user}:1`` for ``{user}:1``); a key
    without one and without ``}`` is wrapped whole (``cdcd:tmp:t:{plain}``), whose tag is
    then the key itself. A key without a tag but with a ``}`` cannot be wrapped (a tag
    never contains ``}``), nor can the empty key (``{}`` is no tag): they get a short tag
    searched to hash to the same slot, followed by the key (``cdcd:tmp:t:{1a7}a}b``).
    """
    prefix = b"cdcd:tmp:" + task_id.encode() + b":"
    if hash_tag(key) is not None:
        return prefix + key
    if key and b"}" not in key:
        return prefix + b"{" + key + b"}"
    return prefix + b"{" + slot_tag(key_slot(key)) + b"}" + key


def score_bytes(score: float) -> bytes:
    """A double as ZADD reads it back bit for bit (repr is the shortest exact form)."""
    return repr(score).encode()


def double_score(raw: bytes) -> bytes:
    """An 8-byte little-endian double (RDB zset2) as ZADD text."""
    return repr(_double(raw)[0]).encode()


class BigKey:
    """Turn one big value, piece by piece, into COMMAND entries for the writer.

    ``add_*`` methods append entries to the list they are given and return the bytes of
    the arguments they added (what a batch is sized by). Pieces are coalesced up to
    ``chunk_bytes`` / ``chunk_elements`` per command, so callers may pass any sizes.
    """

    def __init__(self, db: int, key: bytes, kind: str, *, task_id: str, replace: bool,
                 size: int = 0, chunk_bytes: int = CHUNK_BYTES,
                 chunk_elements: int = CHUNK_ELEMENTS, direct: bool = False,
                 stream_counters: bool = True) -> None:
        """``direct``: write the key itself inside one MULTI/EXEC (DEL first), for a value
        small enough for one transaction (write_mode rewrite, existing_keys replace).
        ``stream_counters``: the target takes entries-added, max-deleted-id and a group's
        entries-read (Redis 7.0+, Valkey)."""
        if kind not in KINDS or (direct and kind == "string"):
            raise ValueError(f"no {'direct' if direct else 'chunked'} copy for {kind!r} "
                             f"values")
        self.db = db
        self.key = key
        self.kind = kind
        self.replace = replace
        self.size = size            # string length (SETRANGE pre-allocates it)
        self.direct = direct
        self.stream_counters = stream_counters
        self.tmp = key if direct else temp_key(task_id, key)
        self.chunk_bytes = max(1, chunk_bytes)
        self.chunk_elements = max(1, chunk_elements)
        self.created = False        # tmp holds something: the tail must move it
        self.offset = 0             # string bytes written so far
        self.elements = 0           # elements added so far
        self.bytes = 0              # value bytes added so far
        self._items: list[bytes] = []
        self._item_bytes = 0
        self._stream_ids = False    # an XADD created the stream

    # --- building ---

    def begin(self, out: list[Entry]) -> int:
        """Clear a leftover temporary key (direct: open the transaction and clear the
        key); pre-size a string."""
        if self.direct:
            out.append((COMMAND, self.db, [b"MULTI"]))
        out.append((COMMAND, self.db, [b"DEL", self.tmp]))
        n = len(self.tmp)
        if self.kind == "string" and self.size > 0:
            out.append((COMMAND, self.db, [b"SETRANGE", self.tmp, b"%d" % (self.size - 1),
                                           b"\0"]))
            self.created = True
            n += len(self.tmp) + 20
        return n

    def add_string(self, piece: bytes, out: list[Entry]) -> int:
        """Write the next bytes of a string value."""
        if not piece:
            return 0
        self._items.append(piece)
        self._item_bytes += len(piece)
        self.bytes += len(piece)
        if self._item_bytes >= self.chunk_bytes:
            return self._flush_string(out, final=False)
        return 0

    def _flush_string(self, out: list[Entry], *, final: bool) -> int:
        data = b"".join(self._items) if len(self._items) != 1 else self._items[0]
        self._items = []
        self._item_bytes = 0
        step = self.chunk_bytes
        n = 0
        end = len(data) if final else len(data) - len(data) % step
        view = memoryview(data)
        for i in range(0, end, step):
            piece = bytes(view[i:min(i + step, end)])
            out.append((COMMAND, self.db, [b"SETRANGE", self.tmp, b"%d" % self.offset,
                                           piece]))
            self.offset += len(piece)
            n += len(piece) + len(self.tmp) + 20
        if end < len(data):
            rest = bytes(view[end:])
            self._items = [rest]
            self._item_bytes = len(rest)
        view.release()
        if n:
            self.created = True
        return n

    def add_chunk(self, items: Sequence[Any], out: list[Entry]) -> int:
        """Add decoded pieces: string bytes for a string, (id, fields) entries for a
        stream, elements for the others."""
        if self.kind == "stream":
            return self.add_entries(items, out)
        if self.kind == "string":
            n = 0
            for piece in items:
                n += self.add_string(piece, out)
            return n
        return self.add_items(items, out)

    def add_items(self, items: Sequence[bytes], out: list[Entry]) -> int:
        """Add elements: members (list, set), or flat field/value, member/score pairs
        (hash: f, v, f, v ...; zset: member, score, member, score ... with scores as
        text ZADD parses exactly). Return what the commands added cost (see ITEM_COST)."""
        step = _STEP[self.kind]
        limit_items = self.chunk_elements * step
        limit_bytes = self.chunk_bytes
        n = 0
        i = 0
        total = len(items)
        while i < total:
            pending = self._items
            piece = items[i:i + limit_items - len(pending)]
            size = sum(map(len, piece))
            if self._item_bytes + size < limit_bytes:   # the usual case: whole slices
                pending.extend(piece)
                self._item_bytes += size
                i += len(piece)
                if len(pending) >= limit_items:
                    n += self._flush_items(out, self._item_bytes)
                continue
            # The byte limit falls inside this slice: up to it (whole pairs), item by item.
            acc = self._item_bytes
            j = 0
            while j < len(piece):
                acc += len(piece[j])
                j += 1
                if acc >= limit_bytes and (len(pending) + j) % step == 0:
                    break
            pending.extend(piece[:j])
            self._item_bytes = acc
            i += j
            if acc >= limit_bytes and len(pending) % step == 0:
                n += self._flush_items(out, acc)
        return n

    def _flush_items(self, out: list[Entry], size: int) -> int:
        pending = self._items
        if not pending:
            return 0
        self._items = []
        self._item_bytes = 0
        step = _STEP[self.kind]
        if self.kind == "zset":   # ZADD wants score before member
            args = [b"ZADD", self.tmp, *pending]
            args[2::2] = pending[1::2]
            args[3::2] = pending[0::2]
        else:
            args = [_ADD[self.kind], self.tmp, *pending]
        out.append((COMMAND, self.db, args))
        self.created = True
        self.elements += len(pending) // step
        self.bytes += size
        return size + ITEM_COST * len(pending) + len(self.tmp) + 16

    def add_entries(self, entries: Sequence[tuple[bytes, Sequence[bytes]]],
                    out: list[Entry]) -> int:
        """Add stream entries (id, [field, value, ...]) in id order: one XADD each."""
        n = 0
        for entry_id, fields in entries:
            out.append((COMMAND, self.db, [b"XADD", self.tmp, entry_id, *fields]))
            size = sum(map(len, fields)) + len(entry_id)
            n += size + ITEM_COST * (len(fields) + 1) + len(self.tmp) + 16
            self.bytes += size
            self.elements += 1
        if entries:
            self.created = self._stream_ids = True
        return n

    def stream_meta(self, meta: StreamMeta, out: list[Entry]) -> int:
        """Rebuild a stream's id counters, consumer groups, consumers and pending entries.

        Not rebuilt (no command sets them): consumers' seen/active times (they become
        the copy's time), and pending entries whose message was deleted from the stream
        (XCLAIM ignores ids that no longer exist).
        """
        n = self.stream_ids(meta, out)
        for g in meta.groups:
            n += self.stream_group(g, out)
            n += self.stream_pending(g.name, g.pending, out)
        return n

    def stream_ids(self, meta: StreamMeta, out: list[Entry]) -> int:
        """Set the last id (and entries-added, max-deleted-id when known)."""
        db, tmp = self.db, self.tmp
        if not self._stream_ids:
            # No entry left (all deleted): create the empty stream, then set its id.
            out.append((COMMAND, db, [b"XADD", tmp, b"MAXLEN", b"0", b"0-1", b"f", b"v"]))
            self.created = self._stream_ids = True
        setid = [b"XSETID", tmp, meta.last_id]
        if meta.entries_added is not None and self.stream_counters:
            setid += [b"ENTRIESADDED", b"%d" % meta.entries_added]
        if meta.max_deleted_id is not None and self.stream_counters:
            setid += [b"MAXDELETEDID", meta.max_deleted_id]
        out.append((COMMAND, db, setid))
        return 64 + len(tmp)

    def stream_group(self, g: StreamGroup, out: list[Entry]) -> int:
        """Create a consumer group at its last-delivered id, and its consumers."""
        db, tmp = self.db, self.tmp
        create = [b"XGROUP", b"CREATE", tmp, g.name, g.last_id]
        if g.entries_read is not None and self.stream_counters:
            create += [b"ENTRIESREAD", b"%d" % g.entries_read]
        out.append((COMMAND, db, create))
        for consumer in g.consumers:
            out.append((COMMAND, db, [b"XGROUP", b"CREATECONSUMER", tmp, g.name, consumer]))
        return (64 + len(tmp)) * (1 + len(g.consumers))

    def stream_pending(self, group: bytes, pending: Sequence[tuple[bytes, bytes, int, int]],
                       out: list[Entry]) -> int:
        """Recreate pending entries (id, consumer, last delivery unix ms, deliveries) with
        XCLAIM ... TIME .. RETRYCOUNT .. FORCE JUSTID, which sets both exactly."""
        db, tmp = self.db, self.tmp
        for entry_id, consumer, delivered_ms, count in pending:
            out.append((COMMAND, db, [b"XCLAIM", tmp, group, consumer, b"0", entry_id,
                                      b"TIME", b"%d" % delivered_ms,
                                      b"RETRYCOUNT", b"%d" % count, b"FORCE", b"JUSTID"]))
        return (96 + len(tmp)) * len(pending)

    # --- finishing ---

    def finish(self, expire_ms: int, out: list[Entry], stream: StreamMeta | None = None) -> int:
        """Flush what is pending and move the value into place with its expiry (absolute
        unix ms, 0 = none); a stream's metadata first, when given. Nothing is written
        when the value turned out empty."""
        n = 0
        if stream is not None:
            n += self.stream_meta(stream, out)
        if self.kind == "string":
            if self._items:
                n += self._flush_string(out, final=True)
        elif self.kind != "stream":
            n += self._flush_items(out, self._item_bytes)
        db, tmp, key = self.db, self.tmp, self.key
        if self.direct:
            if expire_ms > 0:
                out.append((COMMAND, db, [b"PEXPIREAT", key, b"%d" % expire_ms]))
            out.append((COMMAND, db, [b"EXEC"]))
            return n + len(key) + 32
        if not self.created:
            return n
        if expire_ms > 0:
            ms = b"%d" % expire_ms
            out.append((COMMAND, db, [b"MULTI"]))
            if self.replace:
                out.append((COMMAND, db, [b"RENAME", tmp, key]))
                out.append((COMMAND, db, [b"PEXPIREAT", key, ms]))
            else:
                out.append((COMMAND, db, [b"PEXPIREAT", tmp, ms]))
                out.append((COMMAND, db, [b"RENAMENX", tmp, key]))
                out.append((COMMAND, db, [b"DEL", tmp]))
            out.append((COMMAND, db, [b"EXEC"]))
        elif self.replace:
            out.append((COMMAND, db, [b"RENAME", tmp, key]))
        else:
            out.append((COMMAND, db, [b"RENAMENX", tmp, key]))
            out.append((COMMAND, db, [b"DEL", tmp]))
        return n + 2 * (len(tmp) + len(key)) + 32

    def abort(self, out: list[Entry]) -> int:
        """Give up on the value (it vanished or changed type at the source): drop tmp."""
        self._items = []
        self._item_bytes = 0
        out.append((COMMAND, self.db, [b"DEL", self.tmp]))
        return len(self.tmp)
