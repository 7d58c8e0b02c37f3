"""A small RESP client over asyncio streams, parsed by hiredis.

redis-py's per-command objects cost too much on the snapshot and replication hot paths;
here commands are encoded straight into one buffer and replies parsed in C.
Error replies come back as ``hiredis.ReplyError`` values (not raised) so a pipeline can
name the command that failed; ``call`` raises them as ``ServerReplyError``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import struct
from collections.abc import Iterable, Sequence
from typing import Any

import hiredis

from .errors import EndpointError
from .spec import Endpoint

log = logging.getLogger("cdcd.resp")

Arg = bytes | str | int | float
ReplyError = hiredis.ReplyError
pack = hiredis.pack_command
CONNECT_TIMEOUT = 10.0
# TCP keepalive: a peer gone silent (packets dropped, no RST) is noticed by the kernel in
# about 15 + 3 * 5 = 30 s instead of the ~15 min of retransmissions it allows by default.
# Each option is set where the platform has it (TCP_KEEPALIVE is macOS's TCP_KEEPIDLE).
KEEPALIVE = (("TCP_KEEPIDLE", 15), ("TCP_KEEPALIVE", 15), ("TCP_KEEPINTVL", 5),
             ("TCP_KEEPCNT", 3))


class ServerReplyError(EndpointError):
    """The server answered a command with an error reply."""

    def __init__(self, message: str, reply: str) -> None:
        super().__init__(message)
        self.reply = reply


def _b(arg: Arg) -> bytes:
    if isinstance(arg, bytes):
        return arg
    if isinstance(arg, str):
        return arg.encode()
    if isinstance(arg, (bytearray, memoryview)):
        return bytes(arg)
    return str(arg).encode()


def encode(args: Sequence[Arg]) -> bytes:
    """Encode one command as a RESP array of bulk strings (in C, by hiredis)."""
    try:
        data: bytes = pack(tuple(args))  # type: ignore[arg-type]
    except TypeError:   # bytearray, memoryview, bool: hiredis takes str/int/float/bytes only
        data = pack(tuple(_b(a) for a in args))  # type: ignore[arg-type]
    return data


def encode_into(out: list[bytes], args: Sequence[bytes]) -> int:
    """Append one command's RESP encoding to ``out``; return its size."""
    data = encode(args)
    out.append(data)
    return len(data)


def tls_context() -> ssl.SSLContext:
    return ssl.create_default_context()


def set_keepalive(writer: asyncio.StreamWriter) -> None:
    """Turn on TCP keepalive with short probes, where the platform has the options."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in KEEPALIVE:
            opt = getattr(socket, name, None)
            if opt is not None:
                sock.setsockopt(socket.IPPROTO_TCP, opt, value)
    except OSError as exc:   # not a TCP socket (a Unix socket), or refused by the platform
        log.debug("keepalive not set on %s: %s", writer.get_extra_info("peername"), exc)


class Connection:
    """One connection to one server: send raw RESP, read parsed replies.

    ``io_timeout`` (seconds, None for none) bounds every wait on the peer: a read for a
    reply that gets no byte for that long, or a drain that cannot hand data to a peer that
    stopped reading, raises EndpointError. With TCP keepalive it is what notices a link
    that died silently (packets dropped, no RST), which nothing else would for minutes.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 name: str, *, io_timeout: float | None = None) -> None:
        self.reader = reader
        self.writer = writer
        self.name = name
        self.parser = hiredis.Reader()
        self.db = 0
        self.io_timeout = io_timeout
        set_keepalive(writer)

    @classmethod
    async def open(cls, host: str, port: int, *, role: str, ep: Endpoint | None = None,
                   timeout: float = CONNECT_TIMEOUT,
                   io_timeout: float | None = None) -> Connection:
        """Connect and authenticate; ``role`` ('source'/'target') prefixes every error."""
        name = f"{role} {host}:{port}"
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation
            # that races with completion, and a paused task would then never stop.
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(
                    host, port, ssl=tls_context() if ep and ep.tls else None, limit=1 << 20)
        except TimeoutError:
            raise EndpointError(f"{name}: connect timed out after {timeout:g}s") from None
        except OSError as exc:
            raise EndpointError(f"{name}: cannot connect: {exc.strerror or exc}") from exc
        conn = cls(reader, writer, name, io_timeout=io_timeout)
        try:
            if ep and ep.password:
                auth: list[Arg] = ["AUTH", ep.username, ep.password] if ep.username else \
                    ["AUTH", ep.password]
                try:
                    await conn.call(*auth, timeout=timeout)
                except ServerReplyError as exc:
                    raise EndpointError(f"{name}: authentication failed: {exc.reply}") from None
        except BaseException:
            conn.close()
            raise
        return conn

    @classmethod
    async def open_endpoint(cls, ep: Endpoint, *, role: str, index: int = 0,
                            io_timeout: float | None = None) -> Connection:
        host, port = ep.addrs[index]
        return await cls.open(host, port, role=role, ep=ep, io_timeout=io_timeout)

    def send(self, data: bytes | Iterable[bytes]) -> None:
        if isinstance(data, (bytes, bytearray, memoryview)):
            self.writer.write(data)
        else:
            self.writer.writelines(data)

    async def drain(self) -> None:
        """Wait until the transport's buffer is low; with io_timeout, fail when the peer
        accepts no byte for that long (a slow but live peer only has to keep reading)."""
        limit = self.io_timeout
        transport = self.writer.transport
        try:
            # Nothing left in the transport's buffer: drain cannot wait, so skip the timer.
            if limit is None or not transport.get_write_buffer_size():
                await self.writer.drain()
                return
            while True:
                size = transport.get_write_buffer_size()
                deadline = asyncio.timeout(limit)
                try:
                    async with deadline:
                        await self.writer.drain()
                    return
                except TimeoutError:
                    if not deadline.expired():
                        raise   # the kernel's ETIMEDOUT, an OSError like any other
                    if transport.get_write_buffer_size() >= size:
                        self.abort()
                        raise EndpointError(
                            f"{self.name}: no answer for {limit:g}s while writing "
                            f"(link dead or server not reading); reconnecting") from None
        except (ConnectionError, OSError) as exc:
            raise EndpointError(f"{self.name}: connection lost while writing: {exc}") from exc

    async def read_reply(self) -> Any:
        """Return the next reply; error replies are returned as ReplyError values."""
        while True:
            reply = self.parser.gets()
            if reply is not False:
                return reply
            await self._fill()

    async def _fill(self) -> None:
        """Wait for the next bytes (one socket read, at most io_timeout) and parse them."""
        limit = self.io_timeout
        deadline: asyncio.Timeout | None = None
        try:
            if limit is None:
                data = await self.reader.read(1 << 18)
            else:
                # Per socket read, not per reply: replies already buffered need no timer.
                deadline = asyncio.timeout(limit)
                async with deadline:
                    data = await self.reader.read(1 << 18)
        except (ConnectionError, OSError) as exc:   # TimeoutError is an OSError
            if deadline is not None and deadline.expired():
                self.abort()
                raise EndpointError(f"{self.name}: no answer for {limit:g}s "
                                    f"(link dead or server stuck); reconnecting") from None
            raise EndpointError(f"{self.name}: connection lost: {exc}") from exc
        if not data:
            raise EndpointError(f"{self.name}: connection closed by the server")
        self.parser.feed(data)

    async def read_replies(self, n: int) -> list[Any]:
        out: list[Any] = []
        gets = self.parser.gets
        while len(out) < n:
            reply = gets()
            if reply is False:
                await self._fill()
                continue
            out.append(reply)
        return out

    async def call(self, *args: Arg, timeout: float | None = 60.0) -> Any:
        """Send one command and return its reply; raise ServerReplyError on an error reply."""
        self.send(encode(args))
        try:
            await self.drain()
            async with asyncio.timeout(timeout):
                reply = await self.read_reply()
        except TimeoutError:
            raise EndpointError(f"{self.name}: no reply to {_b(args[0]).decode()} "
                                f"within {timeout:g}s") from None
        if isinstance(reply, ReplyError):
            cmd = _b(args[0]).decode(errors="replace").upper()
            raise ServerReplyError(f"{self.name}: {cmd} failed: {reply}", str(reply))
        return reply

    async def pipeline(self, commands: Sequence[Sequence[Arg]]) -> list[Any]:
        """Send commands at once; return their replies (errors as ReplyError values)."""
        self.send(b"".join(encode(c) for c in commands))
        await self.drain()
        return await self.read_replies(len(commands))

    async def select(self, db: int) -> None:
        if db != self.db:
            await self.call("SELECT", db)
            self.db = db

    def close(self) -> None:
        try:
            self.writer.close()
        except RuntimeError:  # loop already closed
            pass

    def abort(self) -> None:
        """Drop the link at once with a RST (SO_LINGER 0).

        Writes still queued in asyncio or the kernel are discarded: when a silent link
        heals, they are never delivered late, after a reconnect has sent them again.
        """
        sock = self.writer.get_extra_info("socket")
        try:
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        try:
            self.writer.transport.abort()
        except RuntimeError:  # loop already closed
            pass

    async def aclose(self) -> None:
        self.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass


def parse_info(raw: bytes | str) -> dict[str, str]:
    """Parse an INFO reply into a flat dict."""
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
    out: dict[str, str] = {}
    for line in text.splitlines():
        if not line or line.startswith("#") or ":" not in line:
            continue
        k, _, v = line.partition(":")
        out[k.strip()] = v.strip()
    return out


def keyspace(info: dict[str, str], field: str = "keys") -> dict[int, int]:
    """Return {db: keys} (or another counter: "expires") from a parsed INFO keyspace."""
    out: dict[int, int] = {}
    for k, v in info.items():
        if k.startswith("db") and k[2:].isdigit():
            fields = dict(p.split("=", 1) for p in v.split(",") if "=" in p)
            out[int(k[2:])] = int(fields.get(field, "0"))
    return out
