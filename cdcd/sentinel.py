"""Endpoints managed by Sentinel: where their master is now.

An endpoint with ``sentinel`` has no fixed address: at every connect cdcd asks the
sentinels, in turn, for the master's address (``SENTINEL get-master-addr-by-name``), and
while a task runs it asks again every second, so a failover (``+switch-master``) is
followed within a second even when the old master stays up. Sentinels are dialled with
the endpoint's TLS settings and the sentinel's own username/password.
"""

from __future__ import annotations

import asyncio
import dataclasses

from .errors import EndpointError
from .resp import Connection
from .spec import Endpoint, TaskSpec

TIMEOUT = 5.0
WATCH_EVERY = 1.0


async def master_of(ep: Endpoint, role: str) -> tuple[str, int]:
    """Ask the endpoint's sentinels where its master is."""
    s = ep.sentinel
    assert s is not None
    sep = dataclasses.replace(ep, addrs=s.addrs, username=s.username, password=s.password,
                              sentinel=None, host_mapping={})
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
    while True:
        await asyncio.sleep(WATCH_EVERY)
        for ep, role in sides:
            try:
                now = await master_of(ep, role)
            except EndpointError:
                continue        # sentinels unreachable: the links themselves will tell
            if ep.addrs and now != ep.addrs[0]:
                raise EndpointError(f"{role}: sentinel says master {ep.sentinel.master_name!r} "  # type: ignore[union-attr]
                                    f"is now {now[0]}:{now[1]} (was {ep.addrs[0][0]}:"
                                    f"{ep.addrs[0][1]}): reconnecting to it")
