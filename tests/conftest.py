from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .daemon import Daemon
from .proxy import Proxy
from .servers import RedisServer


@pytest.fixture
def servers() -> Iterator[Callable[..., RedisServer]]:
    """Factory: ``servers("redis6", password="pw")`` starts a real server, stopped after."""
    started: list[RedisServer] = []

    def make(flavour: str = "redis7", **kw: Any) -> RedisServer:
        s = RedisServer(flavour, **kw)
        started.append(s)
        return s.start()

    yield make
    for s in started:
        s.cleanup()


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    made: list[Daemon] = []

    def make(**kw: Any) -> Daemon:
        d = Daemon(tmp_path / f"data{len(made)}", **kw)
        made.append(d)
        return d.start()

    yield make
    for d in made:
        try:
            d.stop(timeout=30)
        except Exception:
            d.kill()


@pytest.fixture
def daemon(daemon_factory: Callable[..., Daemon]) -> Daemon:
    return daemon_factory()


@pytest.fixture
def server(servers: Callable[..., RedisServer]) -> RedisServer:
    """One Redis 7 server (for tests that need just one)."""
    return servers()


@pytest.fixture
def proxy(server: RedisServer) -> Iterator[Proxy]:
    """A TCP proxy in front of ``server`` that can hold, drop or refuse its traffic."""
    with Proxy(server.port) as p:
        yield p
