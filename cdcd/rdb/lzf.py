"""Expand LZF-compressed RDB strings (liblzf's format): whole, or streamed with a window."""

from __future__ import annotations

from .records import _Corrupt

try:   # liblzf in C (python-lzf, the optional extra "lzf"): ~12x the pure-Python expansion
    import lzf as _clzf
except ImportError:  # pragma: no cover - depends on the installation
    _clzf = None

_LZF_WINDOW = 8192  # an LZF back reference reaches at most this far back

def _lzf_decompress(src: bytes, size: int, pos: int) -> bytes:
    """Expand an LZF block (liblzf format) to exactly ``size`` bytes."""
    if _clzf is not None and size:
        try:
            out: bytes | None = _clzf.decompress(src, size)
        except ValueError:
            out = None
        if out is not None and len(out) == size:
            return out
    return _lzf_decompress_py(src, size, pos)    # also says what is wrong with a bad block


def _lzf_decompress_py(src: bytes, size: int, pos: int) -> bytes:
    """Expand an LZF block in Python (see _lzf_decompress)."""
    out = bytearray()
    i = 0
    n = len(src)
    try:
        while i < n:
            ctrl = src[i]
            if ctrl < 32:  # literal run of ctrl + 1 bytes
                e = i + 2 + ctrl
                if e > n:
                    raise _Corrupt("truncated LZF literal", pos)
                out += src[i + 1:e]
                i = e
                continue
            run = ctrl >> 5
            i += 1
            if run == 7:
                run += src[i]
                i += 1
            ref = len(out) - ((ctrl & 0x1F) << 8) - src[i] - 1
            i += 1
            run += 2
            if ref < 0:
                raise _Corrupt("LZF back reference before the start", pos)
            if ref + run <= len(out):
                out += out[ref:ref + run]
            else:  # overlapping copy: the last (len - ref) bytes repeat
                period = out[ref:]
                out += (period * (run // len(period) + 1))[:run]
    except IndexError:
        raise _Corrupt("truncated LZF back reference", pos) from None
    if len(out) != size:
        raise _Corrupt(f"LZF string expands to {len(out)} bytes, expected {size}", pos)
    return bytes(out)

class _LzfStream:
    """Expand an LZF block fed in pieces, keeping only the last 8 KiB of output (the
    farthest an LZF back reference reaches), so a huge compressed string streams."""

    __slots__ = ("_rest", "_window", "produced", "size")

    def __init__(self, size: int, pos: int) -> None:
        self.size = size
        self.produced = 0
        self._window = b""
        self._rest = b""

    def feed(self, data: bytes, pos: int) -> bytes:
        """Consume compressed bytes (at buffer index pos); return the output they
        complete."""
        src = self._rest + data if self._rest else data
        out = bytearray(self._window)
        start = len(out)
        i = 0
        n = len(src)
        while i < n:
            ctrl = src[i]
            if ctrl < 32:  # literal run of ctrl + 1 bytes
                e = i + 2 + ctrl
                if e > n:
                    break
                out += src[i + 1:e]
                i = e
                continue
            run = ctrl >> 5
            j = i + 1
            if run == 7:
                if j >= n:
                    break
                run += src[j]
                j += 1
            if j >= n:
                break
            ref = len(out) - ((ctrl & 0x1F) << 8) - src[j] - 1
            run += 2
            if ref < 0:
                raise _Corrupt("LZF back reference before the start", pos)
            if ref + run <= len(out):
                out += out[ref:ref + run]
            else:  # overlapping copy: the last (len - ref) bytes repeat
                period = bytes(out[ref:])
                out += (period * (run // len(period) + 1))[:run]
            i = j + 1
        self._rest = bytes(src[i:])
        produced = bytes(out[start:])
        self._window = bytes(out[-_LZF_WINDOW:])
        self.produced += len(produced)
        if self.produced > self.size:
            raise _Corrupt(f"LZF string expands beyond {self.size} bytes", pos)
        return produced

    def finish(self, pos: int) -> None:
        if self._rest or self.produced != self.size:
            raise _Corrupt(f"LZF string expands to {self.produced} bytes, expected "
                           f"{self.size}", pos)
