"""The fault-injecting TCP proxy of the tests, checked against a real redis-server."""

from __future__ import annotations

import socket
import time

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .proxy import Proxy
from .servers import RedisServer, wait_for

pytestmark = pytest.mark.timeout(60)


def client(proxy: Proxy, timeout: float = 5) -> redis.Redis[bytes]:
    """A client through the proxy that never retries on its own (retries hide faults)."""
    return redis.Redis(host="127.0.0.1", port=proxy.port, socket_timeout=timeout,
                       socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0))


def raw(proxy: Proxy) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    return sock


def ping(sock: socket.socket) -> bytes:
    sock.sendall(b"PING\r\n")
    return sock.recv(100)


def clients_of(server: RedisServer) -> int:
    """Clients connected to the server, our own INFO connection left out."""
    return int(server.client().info("clients")["connected_clients"]) - 1


def test_forwards_both_ways(server: RedisServer, proxy: Proxy) -> None:
    c = client(proxy)
    assert c.ping()
    c.set("k", b"v" * 3_000_000)   # bigger than the proxy's buffer, both ways
    assert c.get("k") == b"v" * 3_000_000
    assert server.client().strlen("k") == 3_000_000
    assert proxy.addr == f"127.0.0.1:{proxy.port}"
    assert proxy.connections == 1


def test_hold_is_silent_and_release_resumes(proxy: Proxy) -> None:
    c = client(proxy, timeout=1)
    assert c.ping()
    waiting = raw(proxy)
    assert ping(waiting) == b"+PONG\r\n"
    proxy.hold()
    started = time.monotonic()
    with pytest.raises(redis.TimeoutError):
        c.ping()
    assert 0.9 < time.monotonic() - started < 3
    # A command sent during the hold is neither answered nor refused: it waits.
    waiting.sendall(b"PING\r\n")
    waiting.settimeout(0.5)
    with pytest.raises(TimeoutError):
        waiting.recv(100)
    # A new connection is not refused either; it waits in the backlog.
    fresh = client(proxy, timeout=0.5)
    with pytest.raises(redis.TimeoutError):
        fresh.ping()
    proxy.release()
    waiting.settimeout(5)
    assert waiting.recv(100) == b"+PONG\r\n"   # what piled up is delivered
    assert client(proxy).ping()
    assert c.ping()   # redis-py reconnects after the timeout


def test_drop_resets_both_sides(server: RedisServer, proxy: Proxy) -> None:
    sock = raw(proxy)
    assert ping(sock) == b"+PONG\r\n"
    wait_for(lambda: clients_of(server) == 1, 5, what="the proxied client on the server")
    proxy.drop()
    with pytest.raises(ConnectionResetError):
        sock.recv(100)
    sock.close()
    wait_for(lambda: clients_of(server) == 0, 5, what="the server to see the reset")
    assert proxy.connections == 0
    c = client(proxy)
    assert c.ping()   # new connections still work


def test_drop_during_a_hold_resets_too(proxy: Proxy) -> None:
    before = raw(proxy)
    assert ping(before) == b"+PONG\r\n"
    proxy.hold()
    during = raw(proxy)   # waits in the backlog
    proxy.drop()
    for sock in (before, during):
        with pytest.raises(ConnectionResetError):
            sock.sendall(b"PING\r\n")
            sock.recv(100)
    proxy.release()
    assert client(proxy).ping()


def test_refuse_and_accept(proxy: Proxy) -> None:
    open_before = raw(proxy)
    assert ping(open_before) == b"+PONG\r\n"
    proxy.refuse()
    sock = raw(proxy)   # the kernel accepts; the proxy closes it at once
    assert sock.recv(100) == b""
    with pytest.raises(redis.ConnectionError):
        client(proxy).ping()
    assert ping(open_before) == b"+PONG\r\n"   # connections made before are untouched
    proxy.accept()
    assert client(proxy).ping()


def test_eof_is_passed_on(server: RedisServer, proxy: Proxy) -> None:
    sock = raw(proxy)
    assert ping(sock) == b"+PONG\r\n"
    wait_for(lambda: clients_of(server) == 1, 5, what="the proxied client on the server")
    sock.close()
    wait_for(lambda: clients_of(server) == 0, 5, what="the server to see the close")
    wait_for(lambda: proxy.connections == 0, 5, what="the proxy to forget the link")
    sock = raw(proxy)
    assert ping(sock) == b"+PONG\r\n"
    server.client().execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
    assert sock.recv(100) == b""


def test_close_resets_and_stops_listening(server: RedisServer) -> None:
    proxy = Proxy(server.port)
    sock = raw(proxy)
    assert ping(sock) == b"+PONG\r\n"
    proxy.close()
    with pytest.raises(ConnectionResetError):
        sock.recv(100)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=2)
