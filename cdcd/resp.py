"""A small RESP client over asyncio streams, parsed by hiredis.

redis-py's per-command objects cost too much on the snapshot and replication hot paths;
here commands are encoded straight into one buffer and replies parsed in C.
Error replies come back as ``hiredis.ReplyError`` values (not raised) so a pipeline can
name the command that failed; ``call`` raises them as ``ServerReplyError``.
"""

from __future__ import annotations

import asyncio
import logging
import re
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
MAX_TLS_FILE = 16 << 20    # a CA bundle, certificate or key file
_SSL_NOISE = re.compile(r"^\[[^\]]*\]|\(_ssl\.c:\d+\)$")


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


class _EncryptedKey(Exception):
    """The key file asks for a passphrase (OpenSSL would otherwise prompt on the tty)."""


def _no_passphrase() -> bytes:
    raise _EncryptedKey


def _read_tls_file(path: str, field: str, what: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_TLS_FILE + 1)
    except OSError as exc:
        raise EndpointError(f"{what}: cannot read {field} {path}: "
                            f"{exc.strerror or type(exc).__name__}") from None
    if len(data) > MAX_TLS_FILE:
        raise EndpointError(f"{what}: {field} {path} is larger than {MAX_TLS_FILE} bytes")
    return data


def ssl_reason(exc: BaseException) -> str:
    """Say why an SSL call failed, without OpenSSL's '[SSL: X]' and '(_ssl.c:N)' noise."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    text = _SSL_NOISE.sub("", text).strip()
    return text or type(exc).__name__


def tls_context(ep: Endpoint, role: str) -> ssl.SSLContext:
    """Build the client SSL context of ``ep``, reading its files now (so replaced files
    are used at the next connect); errors name the file."""
    what = f"{role} TLS"
    if ep.tls_skip_verify:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif ep.tls_ca_file:
        data = _read_tls_file(ep.tls_ca_file, "tls_ca_file", what)
        # PEM text (comments may hold non-ASCII names) or DER bytes.
        cadata: str | bytes = data.decode("ascii", "ignore") if b"-----BEGIN" in data else data
        try:
            ctx = ssl.create_default_context(cadata=cadata)
        except (ssl.SSLError, ValueError) as exc:
            raise EndpointError(f"{what}: cannot load tls_ca_file {ep.tls_ca_file}: "
                                f"{ssl_reason(exc)}") from None
    else:
        ctx = ssl.create_default_context()
    if ep.tls_cert_file:
        _read_tls_file(ep.tls_cert_file, "tls_cert_file", what)
        _read_tls_file(ep.tls_key_file, "tls_key_file", what)
        try:
            ctx.load_cert_chain(ep.tls_cert_file, ep.tls_key_file, password=_no_passphrase)
        except _EncryptedKey:
            raise EndpointError(f"{what}: tls_key_file {ep.tls_key_file} is encrypted; give "
                                f"a key without a passphrase") from None
        except (ssl.SSLError, OSError) as exc:
            reason = ssl_reason(exc)
            if reason == "PEM lib":
                reason = "not a PEM certificate and private key"
            raise EndpointError(f"{what}: cannot load tls_cert_file {ep.tls_cert_file} with "
                                f"tls_key_file {ep.tls_key_file}: {reason}") from None
    return ctx


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
        # Said when the link fails before the server's first byte (a TLS server that wants
        # a client certificate it did not get drops the link only then, under TLS 1.3).
        self.early_hint = ""
        self.received = False
        set_keepalive(writer)

    @classmethod
    async def open(cls, host: str, port: int, *, role: str, ep: Endpoint | None = None,
                   timeout: float = CONNECT_TIMEOUT,
                   io_timeout: float | None = None) -> Connection:
        """Connect and authenticate; ``role`` ('source'/'target') prefixes every error."""
        name = f"{role} {host}:{port}" if ":" not in host else f"{role} [{host}]:{port}"
        # Secrets and TLS files are read at every connect: a rotated one is picked up.
        password = ep.password_bytes(role) if ep and ep.password else b""
        ctx = tls_context(ep, role) if ep and ep.tls else None
        server_name = (ep.tls_server_name or host) if ep and ctx else None
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation
            # that races with completion, and a paused task would then never stop.
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(
                    host, port, ssl=ctx, server_hostname=server_name, limit=1 << 20)
        except TimeoutError:
            if ctx is not None:
                raise EndpointError(f"{name}: connect or TLS handshake timed out after "
                                    f"{timeout:g}s (does the server speak TLS on this "
                                    f"port?)") from None
            raise EndpointError(f"{name}: connect timed out after {timeout:g}s") from None
        except ssl.SSLError as exc:
            raise EndpointError(f"{name}: TLS handshake failed: {ssl_reason(exc)}") from None
        except OSError as exc:
            raise EndpointError(f"{name}: cannot connect: {exc.strerror or exc}") from exc
        conn = cls(reader, writer, name, io_timeout=io_timeout)
        if ctx is None:
            conn.early_hint = "; if the server speaks TLS only, set tls: true"
        elif ep and not ep.tls_cert_file:
            conn.early_hint = ("; if the server requires a client certificate "
                               "(tls-auth-clients yes), set tls_cert_file and tls_key_file")
        try:
            if password:
                auth: list[Arg] = ["AUTH", ep.username, password] if ep and ep.username else \
                    ["AUTH", password]
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
        """Connect to ``ep.addrs[index]``; with several addresses (a cluster's seeds), to
        the first of them, from ``index`` on, that answers."""
        errors: list[EndpointError] = []
        for host, port in ep.addrs[index:] if len(ep.addrs) > 1 else ep.addrs[index:index + 1]:
            try:
                return await cls.open(host, port, role=role, ep=ep, io_timeout=io_timeout)
            except EndpointError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise EndpointError(f"no {role} seed answered: " + "; ".join(e.message for e in errors))

    @property
    def tls(self) -> str:
        """The TLS version and cipher of the link ('TLSv1.3 TLS_AES_256_GCM_SHA384'), or
        '' on a plain TCP link."""
        obj = self.writer.get_extra_info("ssl_object")
        if obj is None:
            return ""
        cipher = obj.cipher()
        return f"{obj.version()} {cipher[0]}" if cipher else str(obj.version())

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
            hint = "" if self.received else self.early_hint
            if isinstance(exc, ssl.SSLError):
                raise EndpointError(f"{self.name}: TLS error: {ssl_reason(exc)}{hint}") from exc
            raise EndpointError(f"{self.name}: connection lost: {exc}{hint}") from exc
        if not data:
            hint = "" if self.received else self.early_hint
            raise EndpointError(f"{self.name}: connection closed by the server{hint}")
        self.received = True
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
