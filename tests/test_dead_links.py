"""A link that dies silently (packets dropped, no RST) is noticed, on the connection and by
a running task, and the task reconnects and converges once the link is back."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from cdcd.errors import EndpointError
from cdcd.resp import Connection, encode

from .compare import wait_same
from .daemon import Daemon
from .load import Load
from .proxy import Proxy
from .servers import RedisServer, wait_for

pytestmark = pytest.mark.timeout(120)


async def open_through(proxy: Proxy, io_timeout: float | None) -> Connection:
    conn = await Connection.open("127.0.0.1", proxy.port, role="target")
    conn.io_timeout = io_timeout   # set after open, as the task does
    assert await conn.call("PING") == b"PONG"
    return conn


# --- the connection ---------------------------------------------------------------------------

async def test_read_on_a_silent_link_fails_after_io_timeout(server: RedisServer,
                                                            proxy: Proxy) -> None:
    conn = await open_through(proxy, 2)
    try:
        proxy.hold()
        started = time.monotonic()
        conn.send(b"".join(encode(["SET", f"stale:{i}", i]) for i in range(100)))
        await conn.drain()
        with pytest.raises(EndpointError, match=r"no answer for 2s") as err:
            await conn.read_replies(100)
        assert 1.9 < time.monotonic() - started < 4
        assert err.value.message.startswith(f"target 127.0.0.1:{proxy.port}: ")
        assert "reconnecting" in err.value.message
    finally:
        await conn.aclose()
    # The connection was reset, not closed: the writes queued behind the partition are
    # dropped when it heals, never applied late after a reconnect has sent them again.
    proxy.release()
    wait_for(lambda: proxy.connections == 0, 10, what="the proxy to see the reset")
    assert server.client().exists(*[f"stale:{i}" for i in range(100)]) == 0


async def test_replies_flowing_slowly_do_not_time_out(server: RedisServer,
                                                      proxy: Proxy) -> None:
    """The timeout bounds the silence between bytes, not the whole read."""
    big = b"x" * (8 << 20)
    server.client().set("big", big)
    conn = await open_through(proxy, 1)
    try:
        conn.send(b"".join(encode(["GET", "big"]) for _ in range(4)))
        await conn.drain()
        assert await conn.read_replies(4) == [big] * 4
    finally:
        await conn.aclose()


async def test_drain_on_a_silent_link_fails_after_io_timeout(proxy: Proxy) -> None:
    conn = await open_through(proxy, 1)
    try:
        proxy.hold()
        started = time.monotonic()
        # More than the kernel buffers of both ends hold: drain has to wait.
        conn.send(encode(["SET", "huge", b"v" * (64 << 20)]))
        with pytest.raises(EndpointError, match=r"no answer for 1s while writing"):
            await conn.drain()
        assert 0.9 < time.monotonic() - started < 3
    finally:
        await conn.aclose()


async def test_a_slow_reader_is_not_a_dead_link() -> None:
    """The drain timeout bounds the time without progress, not the whole drain."""
    payload = 2 << 20
    received = bytearray()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 10)

    def slow_peer() -> None:   # reads 32 KiB every 20 ms: ~1.6 MB/s, 1.3 s for the payload
        peer, _ = listener.accept()
        with peer:
            while len(received) < payload:
                chunk = peer.recv(32 << 10)
                if not chunk:
                    return
                received.extend(chunk)
                time.sleep(0.02)

    thread = threading.Thread(target=slow_peer, daemon=True)
    thread.start()
    conn = await Connection.open("127.0.0.1", listener.getsockname()[1], role="target",
                                 io_timeout=0.5)
    try:
        sock = conn.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 << 10)
        started = time.monotonic()
        conn.send(b"x" * payload)
        await conn.drain()   # no EndpointError, though it takes longer than io_timeout
        assert time.monotonic() - started > 0.5
    finally:
        await conn.aclose()
        thread.join(10)
        listener.close()
    assert len(received) == payload


async def test_without_io_timeout_a_silent_link_just_waits(proxy: Proxy) -> None:
    conn = await open_through(proxy, None)
    try:
        proxy.hold()
        conn.send(encode(["PING"]))
        await conn.drain()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(1.5):
                await conn.read_replies(1)
    finally:
        conn.close()


async def test_every_connection_has_tcp_keepalive(proxy: Proxy) -> None:
    conn = await open_through(proxy, None)
    try:
        sock = conn.writer.get_extra_info("socket")
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) != 0
        expected = {"TCP_KEEPIDLE": 15, "TCP_KEEPALIVE": 15, "TCP_KEEPINTVL": 5,
                    "TCP_KEEPCNT": 3}
        present = {name: v for name, v in expected.items() if hasattr(socket, name)}
        assert present, "the platform has none of the keepalive options"
        for name, value in present.items():
            assert sock.getsockopt(socket.IPPROTO_TCP, getattr(socket, name)) == value, name
    finally:
        await conn.aclose()


# --- a running task ---------------------------------------------------------------------------

def test_task_notices_a_silent_target_link_and_converges(servers: Callable[..., RedisServer],
                                                         daemon: Daemon) -> None:
    """Needs the lead's wiring: ``target_conn.io_timeout = spec.link_timeout_s`` (task.py)."""
    # A backlog big enough for the whole hold: the reconnect is a partial resync.
    src = servers(args=["--repl-backlog-size", "64mb"])
    dst = servers()
    with Proxy(dst.port) as proxy:
        daemon.create({"task_id": "dead", "source": {"addrs": src.addr},
                       "target": {"addrs": proxy.addr},
                       "migration_method": "incremental_migration", "reader": "psync",
                       "link_timeout_s": 3})
        wait_for(lambda: daemon.task("dead")["phase"] == "incremental", 30,
                 what="the stream phase")
        with Load(src.client, dbs=(0,), kinds="counters+lists",
                  max_ops=4_000_000) as load:
            wait_for(lambda: daemon.task("dead")["progress"]["incremental"]["ops_applied"]
                     > 1000, 30, what="commands applied through the proxy")
            retries = daemon.task("dead")["progress"]["retries"]

            held = time.monotonic()
            proxy.hold()

            def noticed() -> dict[str, Any] | None:
                p = daemon.task("dead")["progress"]
                return p if p["retries"] > retries and "no answer" in p["last_error"] else None
            progress = wait_for(noticed, 10, 0.1, what="the task to notice the dead link")
            took = time.monotonic() - held
            assert 2.5 < took < 6.5, (took, progress["last_error"])
            assert progress["last_error"].startswith(f"target 127.0.0.1:{proxy.port}: "), \
                progress["last_error"]

            time.sleep(max(0.0, held + 8 - time.monotonic()))   # the partition lasts ~8 s
            proxy.release()
            ops = load.ops
            wait_for(lambda: load.ops > ops + 2000, 30, what="load after the release")
        view = daemon.wait_state("dead", "Running")
        assert view["state"] == "Running", view

        def caught_up() -> bool:
            # within a heartbeat or a master PING of the source's offset
            off = int(src.client().info("replication")["master_repl_offset"])
            inc = daemon.task("dead")["progress"]["incremental"]
            return bool(inc["applied_offset"] >= off - 200 and inc["lag_bytes"] < 200)
        wait_for(caught_up, 60, 0.1, what="the applied offset to reach the source's")
        wait_same(src.client(), dst.client(), timeout=30,
                  ignore=[b"cdcd:checkpoint:dead"])
        counters = [f"counter:{i}" for i in range(50)]
        assert src.client().mget(counters) == dst.client().mget(counters)
        for i in range(20):
            key = f"list:{i}"
            assert src.client().lrange(key, 0, -1) == dst.client().lrange(key, 0, -1), key
        assert load.ops > 0 and daemon.task("dead")["state"] == "Running"

