"""The compact single-blob encodings, decoded into their elements (Redis renders integers
as text): listpack (Redis 7.0+), ziplist (before 7.0), intset."""

from __future__ import annotations

from collections.abc import Callable

from .records import _Corrupt


def _listpack_items(blob: bytes, pos: int) -> list[bytes]:
    """The entries of a listpack (t_listpack.c): header, entries with back-lengths, 0xFF."""
    out: list[bytes] = []
    append = out.append
    n = len(blob)
    p = 6
    try:
        while True:
            b = blob[p]
            if b < 0x80:
                append(b"%d" % b)
                size = 1
            elif b < 0xC0:
                size = 1 + (b & 0x3F)
                append(blob[p + 1:p + size])
            elif b < 0xE0:
                v = ((b & 0x1F) << 8) | blob[p + 1]
                append(b"%d" % (v - 8192 if v >= 4096 else v))
                size = 2
            elif b < 0xF0:
                size = 2 + (((b & 0x0F) << 8) | blob[p + 1])
                append(blob[p + 2:p + size])
            elif b == 0xF0:
                size = 5 + int.from_bytes(blob[p + 1:p + 5], "little")
                append(blob[p + 5:p + size])
            elif 0xF1 <= b <= 0xF4:
                width = (2, 3, 4, 8)[b - 0xF1]
                size = 1 + width
                append(b"%d" % int.from_bytes(blob[p + 1:p + size], "little", signed=True))
            elif b == 0xFF:
                break
            else:
                raise _Corrupt(f"invalid listpack entry encoding 0x{b:02x}", pos)
            # back-length: 1..5 bytes, by the entry's size
            p += size + (1 if size < 128 else 2 if size < 16383 else 3 if size < 2097151
                         else 4 if size < 268435455 else 5)
            if p >= n:
                raise _Corrupt("listpack without its end byte", pos)
    except IndexError:
        raise _Corrupt("truncated listpack", pos) from None
    return out


_ZIPLIST_INTS = {0xC0: 2, 0xD0: 4, 0xE0: 8, 0xF0: 3, 0xFE: 1}


def _ziplist_items(blob: bytes, pos: int) -> list[bytes]:
    """The entries of a ziplist (ziplist.c, Redis < 7): header, entries, 0xFF."""
    out: list[bytes] = []
    append = out.append
    p = 10
    try:
        while blob[p] != 0xFF:
            p += 1 if blob[p] < 254 else 5  # previous entry's length
            b = blob[p]
            top = b >> 6
            if top == 0:
                e = p + 1 + (b & 0x3F)
                append(blob[p + 1:e])
            elif top == 1:
                e = p + 2 + (((b & 0x3F) << 8) | blob[p + 1])
                append(blob[p + 2:e])
            elif top == 2:
                e = p + 5 + int.from_bytes(blob[p + 1:p + 5], "big")
                append(blob[p + 5:e])
            elif b in _ZIPLIST_INTS:
                e = p + 1 + _ZIPLIST_INTS[b]
                append(b"%d" % int.from_bytes(blob[p + 1:e], "little", signed=True))
            elif 0xF1 <= b <= 0xFD:
                e = p + 1
                append(b"%d" % ((b & 0x0F) - 1))
            else:
                raise _Corrupt(f"invalid ziplist entry encoding 0x{b:02x}", pos)
            if e > len(blob):
                raise IndexError
            p = e
    except IndexError:
        raise _Corrupt("truncated ziplist", pos) from None
    return out


def _intset_items(blob: bytes, pos: int) -> list[bytes]:
    """The members of an intset: width, count, little-endian integers."""
    width = int.from_bytes(blob[0:4], "little")
    count = int.from_bytes(blob[4:8], "little")
    if width not in (2, 4, 8) or len(blob) < 8 + width * count:
        raise _Corrupt("malformed intset", pos)
    return [b"%d" % int.from_bytes(blob[i:i + width], "little", signed=True)
            for i in range(8, 8 + width * count, width)]


_BLOB_DECODERS: dict[int, Callable[[bytes, int], list[bytes]]] = {
    10: _ziplist_items, 12: _ziplist_items, 13: _ziplist_items,
    16: _listpack_items, 17: _listpack_items, 20: _listpack_items, 11: _intset_items,
}
