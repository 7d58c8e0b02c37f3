"""A small RESP client over asyncio streams, parsed by hiredis.

redis-py's per-command objects cost too much on the snapshot and replication hot paths;
here commands are encoded straight into one buffer and replies parsed in C.
Error replies come back as ``hiredis.ReplyError`` values (not raised) so a pipeline can
name the command that failed; ``call`` raises them as ``ServerReplyError``.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
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


class Connection:
    """One connection to one server: send raw RESP, read parsed replies."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 name: str) -> None:
        self.reader = reader
        self.writer = writer
        self.name = name
        self.parser = hiredis.Reader()
        self.db = 0

    @classmethod
    async def open(cls, host: str, port: int, *, role: str, ep: Endpoint | None = None,
                   timeout: float = CONNECT_TIMEOUT) -> Connection:
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
        conn = cls(reader, writer, name)
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
    async def open_endpoint(cls, ep: Endpoint, *, role: str, index: int = 0) -> Connection:
        host, port = ep.addrs[index]
        return await cls.open(host, port, role=role, ep=ep)

    def send(self, data: bytes | Iterable[bytes]) -> None:
        if isinstance(data, (bytes, bytearray, memoryview)):
            self.writer.write(data)
        else:
            self.writer.writelines(data)

    async def drain(self) -> None:
        try:
            await self.writer.drain()
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
        try:
            data = await self.reader.read(1 << 18)
        except (ConnectionError, OSError) as exc:
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
