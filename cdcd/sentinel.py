"""Endpoints managed by Sentinel: where their master is now.

An endpoint with ``sentinel`` has no fixed address: at every connect cdcd asks the
sentinels, in turn, for the master's address (``SENTINEL get-master-addr-by-name``).
While a task runs it listens to a sentinel's ``+switch-master`` announcements, so a
failover is followed the moment it is decided, even when the old master stays up; and it
asks again every second, in case the subscription itself was cut. Sentinels are dialled
with the endpoint's TLS settings and the sentinel's own username/password.
"""

from __future__ import annotations

import asyncio
import dataclasses

from .errors import EndpointError
from .resp import Connection, encode
from .spec import Endpoint, TaskSpec

TIMEOUT = 5.0
WATCH_EVERY = 1.0


def _sentinels(ep: Endpoint) -> Endpoint:
    """How the sentinels themselves are dialled."""
    s = ep.sentinel
    assert s is not None
    return dataclasses.replace(ep, addrs=s.addrs, username=s.username, password=s.password,
                               sentinel=None, host_mapping={})


async def master_of(ep: Endpoint, role: str) -> tuple[str, int]:
    """Ask the endpoint's sentinels where its master is."""
    s = ep.sentinel
    assert s is not None
    sep = _sentinels(ep)
    errors: list[str] = []
    for host, port in s.addrs:
        try:
            conn = await Connection.open(host, port, role=f"{role} sentinel", ep=sep,
                                         timeout=TIMEOUT)
        except EndpointError as exc:
            errors.append(exc.message)
            continue
        try:
            reply = await conn.call("SENTINEL", "get-master-addr-by-name", s.master_name,
                                    timeout=TIMEOUT)
        except EndpointError as exc:    # an error reply (ServerReplyError) or a lost link
            errors.append(exc.message)
            continue
        finally:
            conn.close()
        if not reply:
            errors.append(f"{role} sentinel {host}:{port} knows no master named "
                          f"{s.master_name!r}")
            continue
        return reply[0].decode(errors="replace"), int(reply[1])
    raise EndpointError(f"{role}: no sentinel said where master {s.master_name!r} is: "
                        + "; ".join(errors))


async def resolve(ep: Endpoint, role: str) -> Endpoint:
    """The endpoint with ``addrs`` set to its master's address now (as is without
    sentinel)."""
    if ep.sentinel is None:
        return ep
    host, port = await master_of(ep, role)
    return dataclasses.replace(ep, addrs=((host, port),))


async def resolve_spec(spec: TaskSpec) -> TaskSpec:
    if spec.source.sentinel is None and spec.target.sentinel is None:
        return spec
    return dataclasses.replace(spec, source=await resolve(spec.source, "source"),
                               target=await resolve(spec.target, "target"))


async def watch(spec: TaskSpec) -> None:
    """Raise EndpointError as soon as a sentinel names another master than the one the
    pipeline is connected to (a failover): the task then reconnects to the new one."""
    sides = [(ep, role) for ep, role in ((spec.source, "source"), (spec.target, "target"))
             if ep.sentinel is not None]
    if not sides:
        return
    async with asyncio.TaskGroup() as tg:
        for ep, role in sides:
            tg.create_task(_listen(ep, role))
        tg.create_task(_poll(sides))


class MasterSwitched(EndpointError):
    """A sentinel names another master than the one the pipeline is connected to."""


def _switched(ep: Endpoint, role: str, now: tuple[str, int], how: str) -> MasterSwitched:
    assert ep.sentinel is not None
    return MasterSwitched(f"{role}: {how} master {ep.sentinel.master_name!r} is now "
                         f"{now[0]}:{now[1]} (was {ep.addrs[0][0]}:{ep.addrs[0][1]}): "
                         f"reconnecting to it")


async def _poll(sides: list[tuple[Endpoint, str]]) -> None:
    while True:
        await asyncio.sleep(WATCH_EVERY)
        for ep, role in sides:
            try:
                now = await master_of(ep, role)
            except EndpointError:
                continue        # sentinels unreachable: the links themselves will tell
            if ep.addrs and now != ep.addrs[0]:
                raise _switched(ep, role, now, "sentinel says")


async def _listen(ep: Endpoint, role: str) -> None:
    """Follow ``+switch-master`` on one sentinel after another (a cut subscription is
    tried again a second later; the poll covers the gap)."""
    s = ep.sentinel
    assert s is not None
    sep = _sentinels(ep)
    name = s.master_name.encode()
    while True:
        for host, port in s.addrs:
            try:
                conn = await Connection.open(host, port, role=f"{role} sentinel", ep=sep,
                                             timeout=TIMEOUT)
            except EndpointError:
                continue
            try:
                conn.send(encode(["SUBSCRIBE", "+switch-master"]))
                await conn.drain()
                while True:
                    msg = await conn.read_reply()
                    # ["message", "+switch-master", "<name> <old ip> <old port> <new ip>
                    # <new port>"]
                    if not isinstance(msg, list) or len(msg) != 3 or msg[0] != b"message":
                        continue
                    parts = msg[2].split()
                    if len(parts) == 5 and parts[0] == name:
                        now = (parts[3].decode(errors="replace"), int(parts[4]))
                        if ep.addrs and now != ep.addrs[0]:
                            raise _switched(ep, role, now, "sentinel announced "
                                                           "+switch-master:")
            except MasterSwitched:
                raise
            except (ConnectionError, OSError, EndpointError):
                pass            # this sentinel is gone: the next one, or a second later
            finally:
                conn.close()
        await asyncio.sleep(WATCH_EVERY)
