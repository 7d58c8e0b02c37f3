"""Decode one RDB value (a DUMP payload's body) into its elements.

The write mode ``rewrite`` (cdcd.compat) writes values with commands instead of RESTORE:
this module turns the value bytes the splitter cut out of an RDB, or a DUMP reply's, into
what those commands take. Its element readers also decode big values as they arrive (the
splitter's). Every encoding of Redis 6.2-8.0 and Valkey 7-8 is decoded: strings (raw,
integer, LZF), lists (linked list, ziplist, quicklist of ziplists or listpacks), sets
(hashtable, intset, listpack), sorted sets (skiplist with text or binary scores, ziplist,
listpack), hashes (hashtable, ziplist, listpack) and streams (entries, id counters,
consumer groups, consumers and pending entries).

What cannot be written with commands raises :class:`ValueNotRewritable` naming the type:
module values (their name is decoded from the module id), hashes with field TTLs
(Redis 7.4+, Valkey 9), the pre-2.6 zipmap.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from .encodings import _BLOB_DECODERS, _listpack_items, _ziplist_items
from .primitives import _length, _read_string
from .records import StreamGroup, StreamMeta, _Corrupt, _NeedMore

__all__ = ["ModuleValue", "ValueNotRewritable", "decode_payload", "decode_value",
           "module_name"]

# Value types a big value can be decoded from, and the kind of value they hold.
_BIG_KINDS = {0: "string", 1: "list", 2: "set", 3: "zset", 4: "hash", 5: "zset",
              10: "list", 11: "set", 12: "zset", 13: "hash", 14: "list", 16: "hash",
              17: "zset", 18: "list", 20: "set", 15: "stream", 19: "stream", 21: "stream"}

# --- element readers of big values: (data, index, length, items) -> index after ---

def _item_string(buf: bytes, p: int, n: int, items: list[bytes]) -> int:
    s, e = _read_string(buf, p, n)
    items.append(s)
    return e


def _item_pair(buf: bytes, p: int, n: int, items: list[bytes]) -> int:
    b = buf[p] if p < n else 0xFF
    if b < 0x40:  # the usual short plain field: inline
        q = p + 1 + b
        if q < n and buf[q] < 0x40:
            e = q + 1 + buf[q]
            if e <= n:
                items.append(buf[p + 1:q])
                items.append(buf[q + 1:e])
                return e
    f, q = _read_string(buf, p, n)
    v, e = _read_string(buf, q, n)
    items.append(f)
    items.append(v)
    return e


def _item_zset(buf: bytes, p: int, n: int, items: list[bytes]) -> int:
    """Member and score as a length-prefixed decimal string (type 3)."""
    m, q = _read_string(buf, p, n)
    if q >= n:
        raise _NeedMore(q + 1)
    b = buf[q]
    if b >= 253:
        score, e = (b"nan", b"inf", b"-inf")[b - 253], q + 1
    else:
        e = q + 1 + b
        if e > n:
            raise _NeedMore(e)
        score = buf[q + 1:e]
    items.append(m)
    items.append(score)
    return e


_unpack_double = struct.Struct("<d").unpack_from


def _item_zset2(buf: bytes, p: int, n: int, items: list[bytes]) -> int:
    """Member and 8-byte little-endian double (type 5); repr() is exact and parses back."""
    b = buf[p] if p < n else 0xFF
    if b < 0x40:  # the usual short plain member: inline
        q = p + 1 + b
        m = buf[p + 1:q]
    else:
        m, q = _read_string(buf, p, n)
    e = q + 8
    if e > n:
        raise _NeedMore(e)
    items.append(m)
    items.append(repr(_unpack_double(buf, q)[0]).encode())
    return e


def _item_ziplist_node(buf: bytes, p: int, n: int, items: list[bytes]) -> int:
    blob, e = _read_string(buf, p, n)
    items += _ziplist_items(blob, p)
    return e


def _item_quicklist2_node(buf: bytes, p: int, n: int, items: list[bytes]) -> int:
    container, q = _length(buf, p, n)
    blob, e = _read_string(buf, q, n)
    if container == 1:  # PLAIN: one big element
        items.append(blob)
    elif container == 2:  # PACKED: a listpack
        items += _listpack_items(blob, q)
    else:
        raise _Corrupt(f"unknown quicklist container {container}", p)
    return e

def _stream_id(raw: bytes | bytearray) -> bytes:
    """A 16-byte big-endian stream ID (ms, seq) as text."""
    return b"%d-%d" % (int.from_bytes(raw[:8], "big"), int.from_bytes(raw[8:16], "big"))


def _item_stream_node(buf: bytes, p: int, n: int, items: list[Any]) -> int:
    """One listpack node of a stream (t_stream.c): its live entries as (id, fields)."""
    master, q = _read_string(buf, p, n)
    blob, e = _read_string(buf, q, n)
    if len(master) != 16:
        raise _Corrupt("stream node key is not a 16-byte ID", p)
    lp = _listpack_items(blob, q)
    ms0 = int.from_bytes(master[:8], "big")
    seq0 = int.from_bytes(master[8:], "big")
    try:
        nf = int(lp[2])
        fields = lp[3:3 + nf]
        i = 4 + nf  # count, deleted, num-fields, the fields, a 0 ending the master entry
        while i < len(lp):
            flags = int(lp[i])
            entry_id = b"%d-%d" % (ms0 + int(lp[i + 1]), seq0 + int(lp[i + 2]))
            if flags & 2:  # SAMEFIELDS: values only, the master entry's fields
                values = lp[i + 3:i + 3 + nf]
                i += 4 + nf  # ... and the entry's lp-count
                pairs = [x for fv in zip(fields, values) for x in fv]
            else:
                k = int(lp[i + 3])
                pairs = lp[i + 4:i + 4 + 2 * k]
                i += 5 + 2 * k
            if not flags & 1:  # not DELETED
                items.append((entry_id, pairs))
    except (IndexError, ValueError):
        raise _Corrupt("malformed stream listpack", q) from None
    return e


_BIG_ITEMS: dict[int, Callable[[bytes, int, int, list[Any]], int]] = {
    1: _item_string, 2: _item_string, 4: _item_pair, 3: _item_zset, 5: _item_zset2,
    14: _item_ziplist_node, 18: _item_quicklist2_node,
    15: _item_stream_node, 19: _item_stream_node, 21: _item_stream_node,
}



_STREAMS = (15, 19, 21)
_MODULE_CHARSET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_NOT_REWRITABLE = {
    9: "a zipmap hash (Redis < 2.6 encoding)",
    22: "a hash with field TTLs", 23: "a hash with field TTLs",
    24: "a hash with field TTLs", 25: "a hash with field TTLs",
}

Decoded = tuple[str, list[Any], StreamMeta | None]


class ValueNotRewritable(Exception):
    """A value no command can rebuild (module types), or a malformed one."""


class ModuleValue(ValueNotRewritable):
    """A module type's value: only the module can write it."""


def module_name(module_id: int) -> str:
    """The 9-character name and encoding version in a module type id (moduleTypeEncodeId)."""
    version = module_id & 1023
    rest = module_id >> 10
    name = ""
    for _ in range(9):
        name = _MODULE_CHARSET[rest & 63] + name
        rest >>= 6
    return f"{name} (encoding version {version})"


def decode_payload(payload: bytes) -> Decoded:
    """Decode a DUMP payload: type byte, value, 2-byte RDB version, 8-byte CRC64."""
    if len(payload) < 11:
        raise ValueNotRewritable(f"DUMP payload of {len(payload)} bytes is too short")
    return decode_value(payload[0], payload[1:-10])


def decode_value(t: int, data: bytes) -> Decoded:
    """Return (kind, elements, stream meta) of the value of RDB type ``t`` in ``data``.

    Elements as BigKey.add_chunk takes them: a string's bytes; list or set members; hash
    field, value, ...; zset member, score (text ZADD parses to the same double), ...;
    stream entries (id, [field, value, ...]).
    """
    n = len(data)
    try:
        if t == 0:
            return "string", [_read_string(data, 0, n)[0]], None
        decode_blob = _BLOB_DECODERS.get(t)
        if decode_blob is not None:
            return _BIG_KINDS[t], decode_blob(_read_string(data, 0, n)[0], 0), None
        read = _BIG_ITEMS.get(t)
        if read is not None:
            count, p = _length(data, 0, n)
            items: list[Any] = []
            for _ in range(count):
                p = read(data, p, n, items)
            meta = _stream_meta(t, data, p, n) if t in _STREAMS else None
            return _BIG_KINDS[t], items, meta
        if t in (6, 7):
            module = module_name(_length(data, 0, n)[0]) if t == 7 else "pre-GA format"
            raise ModuleValue(f"a module value of module {module}: only the module "
                                     f"can write it (RESTORE into a target with the module "
                                     f"loaded)")
    except (_NeedMore, _Corrupt, IndexError) as exc:
        what = exc.what if isinstance(exc, _Corrupt) else "truncated value"
        raise ValueNotRewritable(f"malformed value of RDB type {t}: {what}") from None
    what = _NOT_REWRITABLE.get(t, f"a value of unknown RDB type {t}")
    raise ValueNotRewritable(f"{what}: no command rebuilds it on this target")


def _stream_meta(t: int, data: bytes, p: int, n: int) -> StreamMeta:
    """A stream's counters and groups after its nodes (rdbLoadObject; see
    RdbSplitter._big_stream_meta, which reads the same as the bytes arrive)."""
    _, p = _length(data, p, n)                       # number of entries
    ms, p = _length(data, p, n)
    seq, p = _length(data, p, n)
    meta = StreamMeta(last_id=b"%d-%d" % (ms, seq))
    if t >= 19:
        _, p = _length(data, p, n)                   # first id: recomputed by the target
        _, p = _length(data, p, n)
        ms, p = _length(data, p, n)
        seq, p = _length(data, p, n)
        meta.max_deleted_id = b"%d-%d" % (ms, seq)
        meta.entries_added, p = _length(data, p, n)
    groups, p = _length(data, p, n)
    for _ in range(groups):
        name, p = _read_string(data, p, n)
        ms, p = _length(data, p, n)
        seq, p = _length(data, p, n)
        group = StreamGroup(name=name, last_id=b"%d-%d" % (ms, seq))
        if t >= 19:
            read, p = _length(data, p, n)
            group.entries_read = None if read >= (1 << 63) else read
        pel: dict[bytes, tuple[int, int]] = {}
        count, p = _length(data, p, n)
        for _ in range(count):
            raw = data[p:p + 24]
            if len(raw) < 24:
                raise _NeedMore(p + 24)
            deliveries, p = _length(data, p + 24, n)
            pel[raw[:16]] = (int.from_bytes(raw[16:24], "little", signed=True), deliveries)
        consumers, p = _length(data, p, n)
        for _ in range(consumers):
            consumer, p = _read_string(data, p, n)
            p += 8 if t < 21 else 16                 # seen (and active) time
            group.consumers.append(consumer)
            count, p = _length(data, p, n)
            for _ in range(count):
                raw = data[p:p + 16]
                if len(raw) < 16:
                    raise _NeedMore(p + 16)
                p += 16
                delivered, deliveries = pel.get(raw, (0, 0))
                group.pending.append((_stream_id(raw), consumer, delivered, deliveries))
        meta.groups.append(group)
    return meta
