"""Tell servers apart by what they are, not by how they are written down.

``127.0.0.1:6379`` and ``localhost:6379`` are one server; so are two names of one host. A
server says who it is with its ``run_id`` (INFO server, new at every start); its address
says where it is. Two endpoints are the same server when their run_ids are equal or when
their addresses resolve to a common IP and port.

``target_run_id`` asks a server its run_id; ``find_conflict`` says whether a new task would
write keys another task of this daemon already writes on the same target server.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable
from typing import Any, Protocol

import hiredis

from .errors import CdcdError
from .resp import Connection, parse_info
from .scope import conflicts
from .spec import Endpoint, TaskSpec

Addr = tuple[str, int]


async def target_run_id(endpoint: Endpoint, timeout: float = 3.0) -> str | None:
    """Return the run_id (INFO server) of the endpoint's first address, or None when it
    cannot be had within ``timeout`` seconds (unreachable, wrong password, INFO refused)."""
    conn: Connection | None = None
    try:
        async with asyncio.timeout(timeout):
            if endpoint.sentinel is not None:
                from .sentinel import resolve
                endpoint = await resolve(endpoint, "target")
            host, port = endpoint.addrs[0]
            conn = await Connection.open(host, port, role="target", ep=endpoint,
                                         timeout=timeout)
            info = parse_info(await conn.call("INFO", "server", timeout=timeout))
    except (TimeoutError, CdcdError, OSError, hiredis.ProtocolError):
        return None
    finally:
        if conn is not None:
            await conn.aclose()
    return info.get("run_id") or None


def _ip(text: str) -> str:
    """Normalise an IP literal (IPv4-mapped IPv6 becomes IPv4, zone ids go)."""
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return text.lower()
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def _from_infos(host: str, port: int, infos: Iterable[tuple[Any, ...]]) -> set[Addr]:
    out = {(_ip(str(info[4][0])), port) for info in infos}
    return out or {(host.lower(), port)}


def resolve(addrs: Iterable[Addr]) -> frozenset[Addr]:
    """Return every (IP, port) the addresses reach; a name that does not resolve stands
    for itself. Blocks on name resolution (getaddrinfo) for host names."""
    out: set[Addr] = set()
    for host, port in addrs:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError, OSError):
            out.add((_ip(host), port))
            continue
        out |= _from_infos(host, port, infos)
    return frozenset(out)


async def resolve_async(addrs: Iterable[Addr], timeout: float = 5.0) -> frozenset[Addr]:
    """``resolve`` without blocking the event loop; a name that does not resolve within
    ``timeout`` seconds stands for itself too."""
    loop = asyncio.get_running_loop()
    out: set[Addr] = set()
    for host, port in addrs:
        try:
            async with asyncio.timeout(timeout):
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError, OSError, TimeoutError):
            out.add((_ip(host), port))
            continue
        out |= _from_infos(host, port, infos)
    return frozenset(out)


def same_server(a: Endpoint, a_run_id: str | None, b: Endpoint, b_run_id: str | None) -> bool:
    """Say whether two endpoints are one server: run_ids both known and equal, or
    addresses resolving to a common IP:port (blocking getaddrinfo for host names, done
    only when the run_ids do not already say yes)."""
    if a_run_id is not None and a_run_id == b_run_id:
        return True
    return bool(resolve(a.addrs) & resolve(b.addrs))


class TaskLike(Protocol):
    """What ``find_conflict`` reads of a task (cdcd.task.Task has these)."""

    @property
    def spec(self) -> TaskSpec: ...

    @property
    def state(self) -> str: ...          # a cdcd.task.State (a str enum)

    @property
    def target_run_id(self) -> str | None: ...


def find_conflict(spec: TaskSpec, target_run_id: str | None,
                  tasks: Iterable[TaskLike]) -> str | None:
    """Return a sentence naming the first task that already writes target dbs/keys ``spec``
    would write on the same target server, or None when there is none.

    ``target_run_id`` is the run_id of ``spec``'s target (``await target_run_id(spec.target)``;
    None when unknown). A task counts unless it has Succeeded or is ``spec``'s own task_id.
    Same server: both run_ids known and equal, or the target addresses resolve to a common
    IP:port (so ``localhost`` is ``127.0.0.1``, and a target restarted since the other task
    learned its run_id is still the same place). Tasks whose key scopes cannot meet
    (``scope.disjoint``), or where either says ``shared_target: true``, never conflict.
    Host names are resolved (blocking getaddrinfo) only for tasks whose scopes meet and
    whose run_id does not already settle it.
    """
    for task in tasks:
        if task.state == "Succeeded" or task.spec.task_id == spec.task_id:
            continue
        found = conflicts(spec, [task.spec])
        if found and same_server(spec.target, target_run_id, task.spec.target,
                                 task.target_run_id):
            return found[0].describe(spec)
    return None
