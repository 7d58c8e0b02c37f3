"""Split an RDB stream into per-key records (see the package docstring): the framing of
records, the skipping of composite values, and the decoding of big values as they arrive."""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Generator
from typing import Any

import anycrc

from .encodings import _BLOB_DECODERS
from .lzf import _LzfStream
from .primitives import (
    _fixed_bytes,
    _length,
    _read_string,
    _skip_length,
    _skip_string,
    _string_end,
)
from .records import (
    BigValueChunk,
    BigValueEnd,
    BigValueStart,
    Buffer,
    FunctionRecord,
    KeyRecord,
    RdbError,
    Record,
    StreamGroup,
    StreamMeta,
    Want,
    _Corrupt,
    _NeedMore,
    _Parse,
)
from .values import _BIG_ITEMS, _BIG_KINDS, _stream_id

log = logging.getLogger("cdcd.rdb")

_crc64 = anycrc.Model("CRC64-REDIS").calc
_pack_crc = struct.Struct("<Q").pack

# Opcodes (redis/valkey src/rdb.h).
OP_UPDATE = 242  # Valkey 9.x: inline command during a forkless save
OP_SLOT_IMPORT = 243  # Valkey 9.x
OP_SLOT_INFO = 244  # Redis 7.4 cluster
OP_FUNCTION2 = 245
OP_FUNCTION_PRE_GA = 246
OP_MODULE_AUX = 247
OP_IDLE = 248
OP_FREQ = 249
OP_AUX = 250
OP_RESIZEDB = 251
OP_EXPIRETIME_MS = 252
OP_EXPIRETIME = 253
OP_SELECTDB = 254
OP_EOF = 255

SUPPORTED_VERSIONS = {"REDIS": (9, 10, 11, 12), "VALKEY": (80, 81)}

# How the main loop treats each leading byte.
_K_STRING = 0  # value is exactly one RDB string
_K_VALUE = 1  # composite value: skipped in one go, else by a resumable generator
_K_OPCODE = 2
_K_UNSUPPORTED = 3
_K_UNKNOWN = 4

_STRING_TYPES = (0, 9, 10, 11, 12, 13, 16, 17, 20)
_VALUE_TYPES = (1, 2, 3, 4, 5, 7, 14, 15, 18, 19, 21)
_OPCODES = (OP_SLOT_INFO, OP_FUNCTION2, OP_MODULE_AUX, OP_IDLE, OP_FREQ, OP_AUX,
            OP_RESIZEDB, OP_EXPIRETIME_MS, OP_EXPIRETIME, OP_SELECTDB, OP_EOF)

_TYPE_BYTE = [bytes((t,)) for t in range(256)]
_BIG_VALUE = 1 << 16  # from this size on, build payloads with a single copy

_BIG_WINDOW = 1 << 18  # bytes of a big value decoded per feed() (see ``backlog``)
_BIG_PIECE = 1 << 20  # a streamed big string is emitted in pieces of about this size


def _skip_2strings(buf: Buffer, p: int, n: int) -> int:
    return _skip_string(buf, _skip_string(buf, p, n), n)


def _skip_zset_member(buf: Buffer, p: int, n: int) -> int:
    """Skip a member and its score as a length-prefixed decimal string (type 3)."""
    p = _skip_string(buf, p, n)
    if p >= n:
        raise _NeedMore(p + 1)
    b = buf[p]
    e = p + 1 if b >= 253 else p + 1 + b  # 253 nan, 254 +inf, 255 -inf
    if e > n:
        raise _NeedMore(e)
    return e


def _skip_zset2_member(buf: Buffer, p: int, n: int) -> int:
    """Skip a member and its 8-byte binary score (type 5)."""
    e = _skip_string(buf, p, n) + 8
    if e > n:
        raise _NeedMore(e)
    return e


def _skip_quicklist2_node(buf: Buffer, p: int, n: int) -> int:
    return _skip_string(buf, _skip_length(buf, p, n), n)


def _skip_ttl_field(buf: Buffer, p: int, n: int) -> int:
    """Skip a Redis 7.4 hash field: TTL length, field, value (types 22, 24)."""
    return _skip_2strings(buf, _skip_length(buf, p, n), n)


def _skip_valkey_ttl_field(buf: Buffer, p: int, n: int) -> int:
    """Skip a Valkey 9 hash field: field, value, 8-byte expiry (type 22)."""
    e = _skip_2strings(buf, p, n) + 8
    if e > n:
        raise _NeedMore(e)
    return e


def _skip_nack(buf: Buffer, p: int, n: int) -> int:
    """Skip a group PEL entry: 16-byte ID, 8-byte delivery time, delivery count."""
    return _skip_length(buf, p + 24, n)


def _skip_consumer(buf: Buffer, p: int, n: int, times: int) -> int:
    """Skip a consumer: name, ``times`` 8-byte times, its PEL of 16-byte IDs."""
    p = _skip_string(buf, p, n) + 8 * times
    count, p = _length(buf, p, n)
    e = p + 16 * count
    if e > n:
        raise _NeedMore(e)
    return e


def _skip_consumer_v1(buf: Buffer, p: int, n: int) -> int:
    return _skip_consumer(buf, p, n, 1)


def _skip_consumer_v3(buf: Buffer, p: int, n: int) -> int:
    return _skip_consumer(buf, p, n, 2)


def _skip_module_field(buf: Buffer, p: int, n: int) -> int:
    """Skip one (opcode, value) pair of a module value; return -1 after the EOF opcode."""
    op, q = _length(buf, p, n)
    if op == 0:
        return -1 - q
    if op in (1, 2):  # signed / unsigned integer
        return _skip_length(buf, q, n)
    if op == 3:  # float
        e = q + 4
    elif op == 4:  # double
        e = q + 8
    elif op == 5:  # string
        return _skip_string(buf, q, n)
    else:
        raise _Corrupt(f"unknown module value opcode {op}", p)
    if e > n:
        raise _NeedMore(e)
    return e


def _skip_counted(item: Callable[[Buffer, int, int], int], buf: Buffer, p: int,
                  n: int) -> int:
    """Skip a length-prefixed sequence of items in one go."""
    count, p = _length(buf, p, n)
    for _ in range(count):
        p = item(buf, p, n)
    return p

# Composite types that are a plain counted sequence: tried without a generator first.
_SIMPLE_ITEMS: dict[int, Callable[[Buffer, int, int], int]] = {
    1: _skip_string, 2: _skip_string, 14: _skip_string, 18: _skip_quicklist2_node,
    4: _skip_2strings, 3: _skip_zset_member, 5: _skip_zset2_member,
}


class RdbSplitter:
    """Split an RDB byte stream, fed in chunks, into key and function records."""

    def __init__(self, *, want: Want | None = None, payload_version: int | None = None,
                 big_value_bytes: int = 0,
                 key_record: Callable[[int, bytes, int, bytes, int, int | None, int | None],
                                      Any] | None = None) -> None:
        """``big_value_bytes``: values whose serialized size exceeds it are emitted as
        BigValue* records instead of a KeyRecord (0: never; the reader sets the policy).
        ``key_record(db, key, rdb_type, payload, expire_ms, idle, freq)`` builds what is
        emitted for a key instead of a KeyRecord (the psync reader builds its entry tuple
        directly: one object per key less on the hottest path)."""
        self._new_record = key_record or KeyRecord
        self.done = False
        self.version = 0
        self.magic = ""
        self.aux: dict[bytes, bytes] = {}
        self.keys_seen = 0
        self._want = want
        self._payload_version = payload_version
        self._version_bytes = b""
        self._kinds = [_K_UNKNOWN] * 256
        self._unsupported: dict[int, str] = {}
        self._buf = bytearray()
        self._pos = 0  # buffer index of the first byte not yet consumed
        self._base = 0  # stream offset of buf[0]
        self._need = 0  # stream offset the buffer must reach before parsing again
        self._crc = 0  # CRC64 of the file bytes before buf[_crc_pos]
        self._crc_pos = 0
        self._db = 0
        self._expire = -1
        self._idle: int | None = None
        self._freq: int | None = None
        # A composite value being parsed: its generator and the record it belongs to.
        self._gen: _Parse | None = None
        self._pending: tuple[int, bytes, int, int, int, int | None, int | None, bool] | None = None
        self._rest = bytearray()
        self._error: RdbError | None = None
        # A big value being decoded: its generator, where its records go, whether wanted.
        self._big_bytes = big_value_bytes
        self._big: _Parse | None = None
        self._big_out: list[Record] = []
        self._big_wanted = True
        self._big_paused = False
        self.big_values = 0

    @property
    def bytes_consumed(self) -> int:
        """Bytes of the stream consumed so far (the whole RDB once ``done``)."""
        return self._base + self._pos

    @property
    def backlog(self) -> bool:
        """A big value has buffered bytes left to decode: call ``feed(b"")`` for the
        records of its next window. (Each call decodes at most ~256 KiB of a big value, so
        the elements a caller holds at once stay bounded.)"""
        return self._big is not None and self._big_paused

    @property
    def buffered(self) -> int:
        """Bytes held now: the incomplete record and anything fed after it."""
        return len(self._buf) + len(self._rest)

    def take_rest(self) -> bytes:
        """Return and forget the bytes fed after the end of the RDB."""
        rest = bytes(self._rest)
        self._rest.clear()
        return rest

    def finish(self) -> None:
        """Raise RdbError unless the complete RDB, checksum included, was consumed."""
        if self._error is not None:
            raise self._error
        if not self.done:
            where = "in the header" if not self.version else "before the EOF opcode"
            raise RdbError(f"RDB truncated {where}: stream ended at byte offset "
                           f"{self._base + len(self._buf)}, incomplete record starts at "
                           f"byte offset {self.bytes_consumed}")

    def feed(self, data: bytes | bytearray | memoryview) -> list[Record]:
        """Consume a chunk of the stream; return the records it completes."""
        if self._error is not None:
            raise self._error
        if self.done:
            self._rest += data
            return []
        buf = self._buf
        if self._pos and self._gen is None:
            # never while a suspended parse holds indexes into the buffer
            self._forget_consumed()
        buf += data
        if self._base + len(buf) < self._need:
            return []
        out: list[Record] = []
        try:
            self._parse(out)
        except _Corrupt as exc:
            self._error = RdbError(f"{exc.what} at byte offset {self._base + exc.pos} "
                                   f"({self._describe()})")
            raise self._error from None
        except RdbError as exc:
            self._error = exc
            raise
        return out

    # --- going on in another process (readers/splitproc.py) ---

    _CALLBACKS = ("_want", "_new_record")

    def suspend(self) -> dict[str, Any] | None:
        """Return the splitter's state as plain picklable data, for :meth:`resume` in
        another process to go on exactly where this one stopped; None while that cannot be
        (a value half parsed, a big value's window pending, the RDB already complete): try
        again after the next feed. The callbacks (``want``, ``key_record``) are not part of
        it; whoever resumes gives them again."""
        if (self._gen is not None or self._big is not None or self._pending is not None
                or self._error is not None or self.done or self._rest):
            return None
        self._forget_consumed()
        return {k: v for k, v in vars(self).items() if k not in self._CALLBACKS}

    @classmethod
    def resume(cls, state: dict[str, Any], *, want: Want | None = None,
               key_record: Callable[[int, bytes, int, bytes, int, int | None, int | None],
                                    Any] | None = None) -> RdbSplitter:
        """A splitter going on from :meth:`suspend`'s state, with these callbacks."""
        self = cls.__new__(cls)
        vars(self).update(state)
        self._want = want
        self._new_record = key_record or KeyRecord
        return self

    # --- internals ---

    def _forget_consumed(self) -> None:
        """Drop the buffer's consumed bytes (their CRC taken first)."""
        if self._pos:
            self._update_crc(self._pos)
            del self._buf[:self._pos]
            self._base += self._pos
            self._crc_pos -= self._pos
            self._pos = 0

    def _describe(self) -> str:
        return f"{self.magic} RDB version {self.version}" if self.version else "RDB header"

    def _fail(self, what: str, pos: int) -> RdbError:
        return RdbError(f"{what} at byte offset {self._base + pos} ({self._describe()})")

    def _update_crc(self, end: int) -> None:
        if end > self._crc_pos:
            with memoryview(self._buf) as view:
                part = view[self._crc_pos:end]
                self._crc = _crc64(part, self._crc)
                part.release()
            self._crc_pos = end

    def _header(self) -> bool:
        """Parse the magic and version; return False when more bytes are needed."""
        buf = self._buf
        head = bytes(buf[:9])
        if not (b"REDIS".startswith(head[:5]) or b"VALKEY".startswith(head[:6])):
            raise self._fail(f"bad RDB magic {head!r} (expected REDIS%04d or VALKEY%03d)", 0)
        if len(buf) < 9:
            self._need = self._base + 9
            return False
        magic, digits = (("REDIS", head[5:]) if head.startswith(b"REDIS")
                         else ("VALKEY", head[6:]))
        if not digits.isdigit():
            raise self._fail(f"bad RDB magic {head!r} (expected REDIS%04d or VALKEY%03d)", 0)
        version = int(digits)
        if version not in SUPPORTED_VERSIONS[magic]:
            supported = ", ".join(f"{m} {v[0]}-{v[-1]}" for m, v in SUPPORTED_VERSIONS.items())
            raise self._fail(f"unsupported RDB version {version} for magic {magic} "
                             f"(supported: {supported})", 5)
        self.magic = magic
        self.version = version
        self._version_bytes = (self._payload_version or version).to_bytes(2, "little")
        self._kinds = self._kind_table(magic, version)
        self._pos = 9
        log.debug("RDB header: %s version %d", magic, version)
        return True

    def _kind_table(self, magic: str, version: int) -> list[int]:
        kinds = [_K_UNKNOWN] * 256
        for t in _STRING_TYPES:
            kinds[t] = _K_STRING
        for t in _VALUE_TYPES:
            kinds[t] = _K_VALUE
        for t in _OPCODES:
            kinds[t] = _K_OPCODE
        unsupported = {
            6: "module value type 6 (pre-GA module format) cannot be delimited",
            OP_FUNCTION_PRE_GA: "opcode 246 (FUNCTION, Redis 7.0 release candidates) is not "
                                "supported",
        }
        if magic == "REDIS" and version >= 12:
            kinds[22] = kinds[24] = _K_VALUE  # hash with field TTLs, metadata form
            kinds[23] = _K_STRING  # hash listpack with TTLs, 7.4 release candidate
            kinds[25] = _K_VALUE  # min-expire + listpack
        if magic == "VALKEY":
            kinds[22] = _K_VALUE  # Valkey hash with field expiries
            kinds[OP_SLOT_IMPORT] = _K_OPCODE
            unsupported[23] = "Valkey value type 23 (path hash) is not supported"
            unsupported[OP_UPDATE] = "Valkey opcode 242 (UPDATE, forkless save) is not supported"
        for t in unsupported:
            kinds[t] = _K_UNSUPPORTED
        self._unsupported = unsupported
        return kinds

    def _parse(self, out: list[Record]) -> None:
        """Consume as many whole records as the buffer holds."""
        if not self.version and not self._header():
            return
        if self._gen is not None and not self._resume(out):
            return
        if self._big is not None and not self._run_big(out):
            return
        # Read from an immutable copy: slicing bytes costs one allocation, not two.
        # Parsing only starts once the bytes the last stop asked for are there, so
        # a large incomplete record is not copied over and over.
        data = bytes(self._buf)
        n = len(data)
        p = self._pos
        kinds = self._kinds
        want = self._want
        version_bytes = self._version_bytes
        type_byte = _TYPE_BYTE
        crc64 = _crc64
        pack_crc = _pack_crc
        new_record = self._new_record
        simple = _SIMPLE_ITEMS
        big = self._big_bytes or (1 << 62)
        big_value = min(_BIG_VALUE, big + 1)
        big_kinds = _BIG_KINDS
        k_string, k_value, k_opcode, k_unsupported = _K_STRING, _K_VALUE, _K_OPCODE, _K_UNSUPPORTED
        emit = out.append
        db = self._db
        expire = self._expire
        idle = self._idle
        freq = self._freq
        seen = 0
        need = 0
        at_eof = False
        try:
            while p < n:
                t = data[p]
                kind = kinds[t]
                if kind <= k_value:  # a key
                    # Key: almost always a short plain string.
                    q = p + 1
                    if q < n and data[q] < 0x40:
                        ks = q + 1
                        q = ks + data[q]
                        if q > n:
                            need = q + 1
                            break
                        key = data[ks:q]
                    else:
                        key, q = _read_string(data, q, n)
                    if kind == k_string:
                        if q + 2 >= n:
                            need = q + 3
                            break
                        b = data[q]
                        if b < 0x40:
                            e = q + 1 + b
                        elif b < 0x80:
                            e = q + 2 + (((b & 0x3F) << 8) | data[q + 1])
                        elif b == 0xC3 and data[q + 1] < 0x40 and data[q + 2] < 0x80:
                            # LZF: short compressed length, plain length, compressed bytes
                            e = q + (3 if data[q + 2] < 0x40 else 4) + data[q + 1]
                        else:
                            e = _string_end(data, q, n)
                        if e > n:
                            if t != 0 or e - q <= big:
                                need = e
                                break
                            e = -1  # a big string: streamed as it arrives
                    else:
                        item = simple.get(t)
                        e = -1
                        if item is not None:
                            try:
                                e = _skip_counted(item, data, q, n)
                            except _NeedMore:
                                pass
                        if e < 0:
                            # Incomplete or complex: parse with a generator that can
                            # stop and resume anywhere, so no byte is parsed twice.
                            wanted = want is None or want(db, key)
                            self._pending = (db, key, t, q, expire, idle, freq, wanted)
                            self._gen = self._value(t, q)
                            self.keys_seen += seen
                            seen = 0
                            self._pos = p
                            self._db = db
                            self._expire = -1
                            self._idle = self._freq = None
                            if not self._resume(out):
                                if self._gen is not None:
                                    self._detach()
                                return
                            p = self._pos
                            expire = -1
                            idle = freq = None
                            continue
                    if (e < 0 or e - q > big) and t in big_kinds:
                        wanted = want is None or want(db, key)
                        if e < 0 or wanted:
                            self.keys_seen += seen
                            seen = 0
                            if not self._begin_big(out, db, key, t, q, expire, idle, freq,
                                                   wanted):
                                return
                            p = self._pos
                            expire = -1
                            idle = freq = None
                            continue
                    seen += 1
                    if want is None or want(db, key):
                        if e - q < big_value:
                            body = type_byte[t] + data[q:e] + version_bytes
                            payload = body + pack_crc(crc64(body))
                        else:
                            payload = self._big_payload(t, q, e)
                        emit(new_record(db, key, t, payload, expire, idle, freq))
                    p = e
                    expire = -1
                    idle = freq = None
                elif kind == k_opcode:
                    if t == OP_EXPIRETIME_MS:
                        if p + 9 > n:
                            need = p + 9
                            break
                        expire = int.from_bytes(data[p + 1:p + 9], "little", signed=True)
                        p += 9
                    elif t == OP_SELECTDB:
                        db, p = _length(data, p + 1, n)
                    elif t == OP_EXPIRETIME:
                        if p + 5 > n:
                            need = p + 5
                            break
                        expire = int.from_bytes(data[p + 1:p + 5], "little", signed=True) * 1000
                        p += 5
                    elif t == OP_IDLE:
                        idle, p = _length(data, p + 1, n)
                    elif t == OP_FREQ:
                        if p + 2 > n:
                            need = p + 2
                            break
                        freq = data[p + 1]
                        p += 2
                    elif t == OP_EOF:
                        if p + 9 > n:
                            need = p + 9
                            break
                        self._check_crc(p)
                        p += 9
                        at_eof = True
                        break
                    else:
                        p = self._opcode(t, data, p, n, out)
                elif kind == k_unsupported:
                    raise _Corrupt(self._unsupported[t], p)
                else:
                    raise _Corrupt(f"unknown opcode or value type {t} (0x{t:02x})", p)
        except _NeedMore as exc:
            need = exc.need
        self.keys_seen += seen
        self._pos = p
        self._db = db
        self._expire = expire
        self._idle = idle
        self._freq = freq
        self._need = self._base + need
        if at_eof:
            self._end()
        else:
            self._update_crc(p)

    def _big_payload(self, t: int, start: int, end: int) -> bytes:
        """Build a DUMP payload from buf[start:end], copying the value bytes once."""
        head = _TYPE_BYTE[t]
        tail = self._version_bytes
        with memoryview(self._buf) as view:
            value = view[start:end]
            crc = _crc64(tail, _crc64(value, _crc64(head)))
            payload = b"".join((head, value, tail, crc.to_bytes(8, "little")))
            value.release()
        return payload

    def _resume(self, out: list[Record]) -> bool:
        """Run the suspended value parser; return True once its record is complete."""
        gen = self._gen
        pending = self._pending
        assert gen is not None and pending is not None
        try:
            need = next(gen)
        except StopIteration as stop:
            end: int = stop.value
        else:
            db, key, t, start, expire, idle, freq, wanted = pending
            if 0 < self._big_bytes < len(self._buf) - start and t in _BIG_KINDS:
                # Too big to buffer: decode it from its start instead, as it arrives.
                gen.close()
                self._gen = None
                self._pending = None
                return self._begin_big(out, db, key, t, start, expire, idle, freq, wanted)
            self._need = self._base + need
            return False
        db, key, t, start, expire, idle, freq, wanted = pending
        self._gen = None
        self._pending = None
        if wanted and 0 < self._big_bytes < end - start and t in _BIG_KINDS:
            return self._begin_big(out, db, key, t, start, expire, idle, freq, wanted)
        self.keys_seen += 1
        if wanted:
            if end - start < _BIG_VALUE:
                body = _TYPE_BYTE[t] + self._buf[start:end] + self._version_bytes
                payload = body + _crc64(body).to_bytes(8, "little")
            else:
                payload = self._big_payload(t, start, end)
            out.append(self._new_record(db, key, t, payload, expire, idle, freq))
        self._pos = end
        return True

    # --- big values: decoded from self._pos, which is all they keep between stops, so
    # the bytes they consumed can be dropped while they wait for more ---

    def _begin_big(self, out: list[Record], db: int, key: bytes, t: int, q: int, expire: int,
                   idle: int | None, freq: int | None, wanted: bool) -> bool:
        """Start decoding the big value of type t at buffer index q; return True when it
        is already complete."""
        self.keys_seen += 1
        self.big_values += 1
        self._pos = q
        self._db = db
        self._expire = -1
        self._idle = self._freq = None
        self._big_wanted = wanted
        size = 0
        if t == 0:
            buf = self._buf
            if buf[q] == 0xC3:
                size = _length(buf, _length(buf, q + 1, len(buf))[1], len(buf))[0]
            else:
                size = _length(buf, q, len(buf))[0]
        start = (BigValueStart(db, key, t, _BIG_KINDS[t], size, expire, idle, freq)
                 if wanted else None)
        log.debug("big value of type %d (key %r): decoded as it arrives", t, key[:64])
        self._big = self._big_value(t, start)
        return self._run_big(out)

    def _run_big(self, out: list[Record]) -> bool:
        """Run the big value's decoder; return True once the value is complete."""
        assert self._big is not None
        self._big_out = out
        self._big_paused = False
        try:
            need = next(self._big)
        except StopIteration:
            self._big = None
            self._big_out = []
            return True
        self._need = self._base + need
        return False

    def _pause(self) -> int:
        """Stop after this window although more bytes are buffered (see ``backlog``)."""
        self._big_paused = True
        return self._pos

    def _copy(self, start: int, size: int) -> bytes:
        with memoryview(self._buf) as view:
            part = view[start:start + size]
            data = bytes(part)
            part.release()
        return data

    def _big_value(self, t: int, start: BigValueStart | None) -> _Parse:
        if start is not None:
            self._big_out.append(start)
        meta = None
        if t == 0:
            yield from self._big_string()
        elif t in _BIG_ITEMS:
            yield from self._big_items(_BIG_ITEMS[t])
            if t in (15, 19, 21):
                meta = yield from self._big_stream_meta(t)
        else:
            yield from self._big_blob(_BLOB_DECODERS[t])
        if start is not None:
            self._big_out.append(BigValueEnd(meta))
        return self._pos

    def _big_string(self) -> _Parse:
        """Emit a string's bytes as they arrive (LZF ones expanded on the way)."""
        buf = self._buf
        p = self._pos
        lzf: _LzfStream | None = None
        if buf[p] == 0xC3:
            left, q = _length(buf, p + 1, len(buf))
            size, q = _length(buf, q, len(buf))
            if self._big_wanted:
                lzf = _LzfStream(size, p)
        else:
            left, q = _length(buf, p, len(buf))
        self._pos = q
        while True:
            p = self._pos
            avail = len(self._buf) - p
            take = min(avail, left, _BIG_PIECE)
            if take > 0:
                if self._big_wanted:
                    piece = self._copy(p, take)
                    if lzf is not None:
                        piece = lzf.feed(piece, p)
                    if piece:
                        self._big_out.append(BigValueChunk([piece]))
                self._pos = p + take
                left -= take
            if not left:
                break
            if take < avail:
                yield self._pause()
            else:
                yield self._pos + min(left, _BIG_PIECE)
        if lzf is not None:
            lzf.finish(self._pos)
        return self._pos

    def _big_items(self, read: Callable[[bytes, int, int, list[bytes]], int]) -> _Parse:
        """Emit a counted sequence's elements, a pass over the buffered bytes at a time."""
        while True:
            buf = self._buf
            try:
                count, self._pos = _length(buf, self._pos, len(buf))
                break
            except _NeedMore as exc:
                yield exc.need
        wanted = self._big_wanted
        more = 0  # bytes the next element needs from the pass's start
        while count:
            base = self._pos
            avail = len(self._buf) - base
            size = min(avail, max(_BIG_WINDOW, more))
            data = self._copy(base, size)
            items: list[bytes] = []
            p = 0
            need = -1
            try:
                while count:
                    p = read(data, p, size, items)
                    count -= 1
            except _NeedMore as exc:
                need = exc.need
            except _Corrupt as exc:
                raise _Corrupt(exc.what, base + exc.pos) from None
            self._pos = base + p
            if items and wanted:
                self._big_out.append(BigValueChunk(items))
            if need >= 0:
                more = need - p
                if size < avail and p:  # only the window ended: the rest next time
                    yield self._pause()
                elif size >= avail:
                    yield base + need
        return self._pos

    def _big_read(self, read: Callable[[Buffer, int, int], tuple[Any, int]]
                  ) -> Generator[int, None, Any]:
        """Read one primitive at self._pos, waiting for its bytes."""
        while True:
            buf = self._buf
            try:
                value, self._pos = read(buf, self._pos, len(buf))
                return value
            except _NeedMore as exc:
                yield exc.need

    def _big_stream_meta(self, t: int) -> Generator[int, None, StreamMeta]:
        """A stream's counters and consumer groups, after its nodes (rdbLoadObject).

        Each group's PEL (id, delivery time, count) and its consumers' PELs (ids) are
        joined into (id, consumer, time, count); held whole: PELs are small in practice.
        """
        length = _length
        yield from self._big_read(length)  # number of entries
        last = b"%d-%d" % ((yield from self._big_read(length)),
                           (yield from self._big_read(length)))
        meta = StreamMeta(last_id=last)
        if t >= 19:
            for _ in range(2):  # first id: recomputed by the target
                yield from self._big_read(length)
            meta.max_deleted_id = b"%d-%d" % ((yield from self._big_read(length)),
                                              (yield from self._big_read(length)))
            meta.entries_added = yield from self._big_read(length)
        groups = yield from self._big_read(length)
        for _ in range(groups):
            name = yield from self._big_read(_read_string)
            gid = b"%d-%d" % ((yield from self._big_read(length)),
                              (yield from self._big_read(length)))
            group = StreamGroup(name=name, last_id=gid)
            if t >= 19:
                read = yield from self._big_read(length)
                group.entries_read = None if read >= (1 << 63) else read
            pel: dict[bytes, tuple[int, int]] = {}
            for _ in range((yield from self._big_read(length))):
                raw = yield from self._big_read(_fixed_bytes(24))
                count = yield from self._big_read(length)
                pel[raw[:16]] = (int.from_bytes(raw[16:24], "little", signed=True), count)
            for _ in range((yield from self._big_read(length))):
                consumer = yield from self._big_read(_read_string)
                yield from self._big_read(_fixed_bytes(8 if t < 21 else 16))  # seen/active
                group.consumers.append(consumer)
                for _ in range((yield from self._big_read(length))):
                    raw = yield from self._big_read(_fixed_bytes(16))
                    delivered, count = pel.get(bytes(raw), (0, 0))
                    group.pending.append((_stream_id(raw), consumer, delivered, count))
            meta.groups.append(group)
        return meta

    def _big_blob(self, decode: Callable[[bytes, int], list[bytes]]) -> _Parse:
        """Decode a single-blob encoding (listpack, ziplist, intset) once it is whole."""
        while True:
            buf = self._buf
            try:
                blob, e = _read_string(buf, self._pos, len(buf))
                break
            except _NeedMore as exc:
                yield exc.need
        pos = self._pos
        self._pos = e
        if self._big_wanted:
            items = decode(blob, pos)
            del blob
            for i in range(0, len(items), 4096):
                self._big_out.append(BigValueChunk(items[i:i + 4096]))
        return e

    def _detach(self) -> None:
        """Drop the bytes before an incomplete composite value and restart its parser.

        The suspended parser holds buffer indexes, so the consumed bytes in front of its
        record could not be released until it completes. Parsing the value prefix again,
        once, lets the buffer hold only the incomplete record.
        """
        assert self._gen is not None and self._pending is not None
        self._gen.close()
        start = self._pos
        self._update_crc(start)
        del self._buf[:start]
        self._base += start
        self._crc_pos = self._pos = 0
        db, key, t, vstart, expire, idle, freq, wanted = self._pending
        self._pending = (db, key, t, vstart - start, expire, idle, freq, wanted)
        self._gen = self._value(t, vstart - start)

    def _opcode(self, t: int, buf: Buffer, p: int, n: int, out: list[Record]) -> int:
        """Consume a rare opcode at p; return the index after it."""
        if t == OP_AUX:
            name, q = _read_string(buf, p + 1, n)
            value, q = _read_string(buf, q, n)
            self.aux[name] = value
            return q
        if t == OP_RESIZEDB:
            return _skip_length(buf, _skip_length(buf, p + 1, n), n)
        if t == OP_SLOT_INFO:  # slot id, slot size, expires slot size
            return _skip_length(buf, _skip_length(buf, _skip_length(buf, p + 1, n), n), n)
        if t == OP_FUNCTION2:
            code, q = _read_string(buf, p + 1, n)
            out.append(FunctionRecord(code))
            return q
        if t == OP_MODULE_AUX:
            module_id, q = _length(buf, p + 1, n)
            when_opcode, q = _length(buf, q, n)
            if when_opcode != 2:
                raise _Corrupt(f"MODULE_AUX with bad when-opcode {when_opcode}", p)
            q = _skip_length(buf, q, n)
            while q >= 0:
                q = _skip_module_field(buf, q, n)
            log.debug("skipped module aux data of module id %d", module_id)
            return -1 - q
        if t == OP_SLOT_IMPORT:  # job name, count, (start slot, end slot) * count
            q = _skip_string(buf, p + 1, n)
            count, q = _length(buf, q, n)
            for _ in range(count):
                q = _skip_length(buf, _skip_length(buf, q, n), n)
            return q
        raise _Corrupt(f"unknown opcode {t}", p)

    def _check_crc(self, p: int) -> None:
        """Compare the checksum after the EOF opcode at p with the content's CRC64."""
        self._update_crc(p + 1)
        expected = int.from_bytes(self._buf[p + 1:p + 9], "little")
        if expected and expected != self._crc:  # zero: saved with rdbchecksum no
            raise self._fail(f"RDB checksum mismatch: file says {expected:016x}, "
                             f"content has {self._crc:016x}", p + 1)

    def _end(self) -> None:
        """Mark the RDB complete and keep the bytes that follow it."""
        buf = self._buf
        self._rest += buf[self._pos:]
        self._base += self._pos
        self._pos = self._crc_pos = self._need = 0
        buf.clear()
        self.done = True
        log.debug("RDB complete: %d bytes, %d keys", self._base, self.keys_seen)

    # --- composite values: generators yield the buffer index they need ---

    def _value(self, t: int, p: int) -> _Parse:
        """Return the end of the value of type t starting at p."""
        if t in (1, 2, 14):  # list, set, quicklist of ziplists: strings
            return (yield from self._repeat_counted(_skip_string, p))
        if t == 18:  # quicklist of listpacks: (container, string)
            return (yield from self._repeat_counted(_skip_quicklist2_node, p))
        if t == 4:
            return (yield from self._repeat_counted(_skip_2strings, p))
        if t == 3:
            return (yield from self._repeat_counted(_skip_zset_member, p))
        if t == 5:
            return (yield from self._repeat_counted(_skip_zset2_member, p))
        if t in (15, 19, 21):
            return (yield from self._stream(t, p))
        if t == 7:
            return (yield from self._module(p))
        if t == 22 and self.magic == "VALKEY":
            return (yield from self._repeat_counted(_skip_valkey_ttl_field, p))
        if t == 22:  # Redis 7.4 release candidate: absolute TTLs
            return (yield from self._repeat_counted(_skip_ttl_field, p))
        if t == 24:  # Redis 7.4: min expire, then fields with relative TTLs
            p = yield from self._fixed(p, 8)
            return (yield from self._repeat_counted(_skip_ttl_field, p))
        if t == 25:  # Redis 7.4: min expire, then a listpack
            p = yield from self._fixed(p, 8)
            return (yield from self._repeat(1, _skip_string, p))
        raise _Corrupt(f"no parser for value type {t}", p)

    def _fixed(self, p: int, size: int) -> _Parse:
        """Skip size raw bytes."""
        while p + size > len(self._buf):
            yield p + size
        return p + size

    def _count(self, p: int) -> Generator[int, None, tuple[int, int]]:
        """Read a length; return (value, end)."""
        buf = self._buf
        while True:
            try:
                return _length(buf, p, len(buf))
            except _NeedMore as exc:
                yield exc.need

    def _repeat(self, count: int, item: Callable[[Buffer, int, int], int], p: int) -> _Parse:
        """Skip count items; an item cut short is parsed again from its start."""
        buf = self._buf
        while count > 0:
            n = len(buf)
            try:
                while count > 0:
                    p = item(buf, p, n)
                    count -= 1
            except _NeedMore as exc:
                yield exc.need
        return p

    def _repeat_counted(self, item: Callable[[Buffer, int, int], int], p: int) -> _Parse:
        """Skip a length-prefixed sequence of items."""
        count, p = yield from self._count(p)
        return (yield from self._repeat(count, item, p))

    def _stream(self, t: int, p: int) -> _Parse:
        """Skip a stream: listpacks, metadata, consumer groups (rdbLoadObject)."""
        p = yield from self._repeat_counted(_skip_2strings, p)  # (master ID, listpack) nodes
        # length, last ID; from type 19 on also first ID, max deleted ID, entries added
        p = yield from self._repeat(3 if t == 15 else 8, _skip_length, p)
        groups, p = yield from self._count(p)
        consumer = _skip_consumer_v3 if t == 21 else _skip_consumer_v1
        for _ in range(groups):
            p = yield from self._repeat(1, _skip_string, p)  # group name
            # last ID; from type 19 on also the entries-read counter
            p = yield from self._repeat(2 if t == 15 else 3, _skip_length, p)
            p = yield from self._repeat_counted(_skip_nack, p)
            p = yield from self._repeat_counted(consumer, p)
        return p

    def _module(self, p: int) -> _Parse:
        """Skip a MODULE_2 value: module id, then (opcode, value) pairs up to opcode 0."""
        _, p = yield from self._count(p)
        buf = self._buf
        while True:
            n = len(buf)
            try:
                while True:
                    q = _skip_module_field(buf, p, n)
                    if q < 0:
                        return -1 - q
                    p = q
            except _NeedMore as exc:
                yield exc.need
