"""The RDB's lengths and strings: (buffer, index, buffer length) -> value, new index;
they raise _NeedMore when the buffer ends first and _Corrupt on malformed bytes."""

from __future__ import annotations

import functools
from collections.abc import Callable

from .lzf import _lzf_decompress
from .records import Buffer, _Corrupt, _NeedMore


def _length(buf: Buffer, p: int, n: int) -> tuple[int, int]:
    """Read an RDB length; return (value, end)."""
    if p >= n:
        raise _NeedMore(p + 1)
    b = buf[p]
    if b < 0x40:
        return b, p + 1
    if b < 0x80:
        if p + 2 > n:
            raise _NeedMore(p + 2)
        return ((b & 0x3F) << 8) | buf[p + 1], p + 2
    if b == 0x80:
        if p + 5 > n:
            raise _NeedMore(p + 5)
        return int.from_bytes(buf[p + 1:p + 5], "big"), p + 5
    if b == 0x81:
        if p + 9 > n:
            raise _NeedMore(p + 9)
        return int.from_bytes(buf[p + 1:p + 9], "big"), p + 9
    raise _Corrupt(f"invalid length encoding 0x{b:02x}", p)


def _skip_length(buf: Buffer, p: int, n: int) -> int:
    return _length(buf, p, n)[1]


def _skip_string(buf: Buffer, p: int, n: int) -> int:
    """Return the end of the RDB string at p (plain, integer or LZF encoded)."""
    if p >= n:
        raise _NeedMore(p + 1)
    b = buf[p]
    if b < 0x40:
        e = p + 1 + b
    elif b < 0xC0:
        size, q = _length(buf, p, n)
        e = q + size
    elif b == 0xC0:
        e = p + 2
    elif b == 0xC1:
        e = p + 3
    elif b == 0xC2:
        e = p + 5
    elif b == 0xC3:
        clen, q = _length(buf, p + 1, n)
        e = _length(buf, q, n)[1] + clen
    else:
        raise _Corrupt(f"invalid string encoding 0x{b:02x}", p)
    if e > n:
        raise _NeedMore(e)
    return e


def _read_string(buf: Buffer, p: int, n: int) -> tuple[bytes, int]:
    """Decode the RDB string at p as Redis does: integers become decimal text."""
    if p >= n:
        raise _NeedMore(p + 1)
    b = buf[p]
    if b < 0xC0:
        size, q = _length(buf, p, n)
        e = q + size
        if e > n:
            raise _NeedMore(e)
        return bytes(buf[q:e]), e
    if b <= 0xC2:
        e = p + 1 + (1, 2, 4)[b - 0xC0]
        if e > n:
            raise _NeedMore(e)
        return str(int.from_bytes(buf[p + 1:e], "little", signed=True)).encode(), e
    if b == 0xC3:
        clen, q = _length(buf, p + 1, n)
        size, q = _length(buf, q, n)
        e = q + clen
        if e > n:
            raise _NeedMore(e)
        return _lzf_decompress(bytes(buf[q:e]), size, p), e
    raise _Corrupt(f"invalid string encoding 0x{b:02x}", p)

def _string_end(buf: Buffer, p: int, n: int) -> int:
    """Return the end of the RDB string at p, which may lie beyond n: only its header
    must be in the buffer."""
    if p >= n:
        raise _NeedMore(p + 1)
    b = buf[p]
    if b < 0x40:
        return p + 1 + b
    if b < 0xC0:
        size, q = _length(buf, p, n)
        return q + size
    if b <= 0xC2:
        return p + 1 + (1, 2, 4)[b - 0xC0]
    if b == 0xC3:
        clen, q = _length(buf, p + 1, n)
        return _length(buf, q, n)[1] + clen
    raise _Corrupt(f"invalid string encoding 0x{b:02x}", p)

@functools.cache
def _fixed_bytes(size: int) -> Callable[[Buffer, int, int], tuple[bytes, int]]:
    """A reader of ``size`` raw bytes."""
    def read(buf: Buffer, p: int, n: int) -> tuple[bytes, int]:
        e = p + size
        if e > n:
            raise _NeedMore(e)
        return bytes(buf[p:e]), e
    return read
