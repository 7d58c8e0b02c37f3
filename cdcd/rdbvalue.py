"""Decode one RDB value (a DUMP payload's body) into its elements.

The write mode ``rewrite`` (cdcd.compat) writes values with commands instead of RESTORE:
this module turns the value bytes the splitter cut out of an RDB, or a DUMP reply's, into
what those commands take, with the element readers and compact-encoding decoders the
splitter uses for big values (cdcd.rdb). Every encoding of Redis 6.2-8.0 and Valkey 7-8 is
decoded: strings (raw, integer, LZF), lists (linked list, ziplist, quicklist of ziplists
or listpacks), sets (hashtable, intset, listpack), sorted sets (skiplist with text or
binary scores, ziplist, listpack), hashes (hashtable, ziplist, listpack) and streams
(entries, id counters, consumer groups, consumers and pending entries).

What cannot be written with commands raises :class:`ValueNotRewritable` naming the type:
module values (their name is decoded from the module id), hashes with field TTLs
(Redis 7.4+, Valkey 9), the pre-2.6 zipmap.
"""

from __future__ import annotations

from typing import Any

from .rdb import (
    _BIG_ITEMS,
    _BIG_KINDS,
    _BLOB_DECODERS,
    StreamGroup,
    StreamMeta,
    _Corrupt,
    _length,
    _NeedMore,
    _read_string,
    _stream_id,
)

__all__ = ["ModuleValue", "ValueNotRewritable", "decode_payload", "decode_value", "module_name"]

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
