"""Read from a Redis Cluster target key by key: one connection per master, every read
routed to the master serving its key's slot, MOVED and ASK followed once.

Used by ``verify`` to compare a source with a cluster target; the slot map itself comes
from cdcd.topology (the one place that knows a cluster's shape).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import EndpointError, FatalTaskError
from .resp import Arg, Connection, ReplyError, encode
from .spec import Endpoint
from .topology import (
    Addr,
    HostMapping,
    Node,
    Topology,
    check_reachable,
    discover,
)

log = logging.getLogger("cdcd.verify")


def key_of(cmd: Sequence[Arg]) -> bytes:
    """The one key of a per-key read (XINFO names it after its subcommand)."""
    key = cmd[2] if cmd[0] == "XINFO" else cmd[1]
    return key if isinstance(key, bytes) else str(key).encode()


def redirect_of(reply: Any) -> str:
    """'MOVED' or 'ASK' when a cluster node sends a command elsewhere, else ''."""
    if isinstance(reply, ReplyError):
        kind = str(reply).partition(" ")[0]
        if kind in ("MOVED", "ASK"):
            return kind
    return ""


_ASKING = encode(["ASKING"])
_Part = tuple[Connection, list[int], frozenset[int]]   # a node, its commands, those ASKed


class ClusterTarget:
    """A Redis Cluster target: one connection per master, every read routed by slot.

    ``send`` splits a pipeline of per-key reads by the master serving each key's slot and
    writes each part to its node; ``collect`` reads the parts back into the pipeline's
    order. All parts are written before any is read, so the masters work at once.
    """

    def __init__(self, ep: Endpoint, mapping: HostMapping) -> None:
        self.ep = ep
        self.mapping = mapping
        self.name = f"target cluster {ep.display}"
        self.topology: Topology | None = None
        self.conns: dict[Addr, Connection] = {}      # by dial address

    async def refresh(self) -> None:
        """Learn the slot map (again) and connect to every master not connected yet."""
        self.topology = await discover(self.ep, self.mapping, role="target")
        for node in self.topology.masters:
            await self.ensure(node)

    async def ensure(self, node: Node) -> Connection:
        conn = self.conns.get(node.dial)
        if conn is None:
            try:
                conn = await Connection.open(*node.dial, role="target", ep=self.ep)
            except EndpointError:
                # names the announced address that failed and how to map it
                assert self.topology is not None
                await check_reachable(self.topology, self.ep, role="target", nodes=[node])
                raise
            self.conns[node.dial] = conn
        return conn

    async def ensure_ask(self, reply: Any, key: bytes) -> Addr:
        """Connect to the node an ``ASK <slot> <host:port>`` reply names; return its dial
        address (an empty host is the redirecting node's own)."""
        host, _, port = str(reply).split(" ", 2)[2].rpartition(":")
        host = host.strip("[]")
        if host in ("", "?"):
            host = self.master(key).announced[0]
        announced = (host, int(port))
        dial = self.mapping.dial(announced)
        await self.ensure(Node(node_id="", announced=announced, dial=dial, role="master"))
        return dial

    def master(self, key: bytes) -> Node:
        assert self.topology is not None
        return self.topology.master_for_key(key)

    def masters(self) -> list[Connection]:
        assert self.topology is not None
        return [self.conns[n.dial] for n in self.topology.masters]

    async def select(self, db: int) -> None:
        if db != 0:
            raise FatalTaskError(f"{self.name}: a cluster has db 0 only, not db {db}")

    def send(self, cmds: Sequence[Sequence[Arg]],
             asking: Mapping[int, Addr] | None = None) -> list[_Part]:
        """Write each command to the master of its key's slot, or (``asking``: index ->
        node) to the node importing it, after ASKING; return who got which."""
        assert self.topology is not None
        owner = self.topology.master_for_key
        groups: dict[Addr, list[int]] = {}
        for i, cmd in enumerate(cmds):
            addr = asking[i] if asking and i in asking else owner(key_of(cmd)).dial
            groups.setdefault(addr, []).append(i)
        parts: list[_Part] = []
        for addr, idx in groups.items():
            asked = frozenset(i for i in idx if asking and i in asking)
            conn = self.conns[addr]
            conn.send(b"".join(_ASKING + encode(cmds[i]) if i in asked else encode(cmds[i])
                               for i in idx))
            parts.append((conn, idx, asked))
        return parts

    async def collect(self, parts: list[_Part], n: int) -> list[Any]:
        """Read the replies of ``send``'s parts back into the order of its commands."""
        out: list[Any] = [None] * n
        for conn, _, _ in parts:
            await conn.drain()
        for conn, idx, asked in parts:
            replies = await conn.read_replies(len(idx) + len(asked))
            if asked:
                it = iter(replies)
                kept = []
                for i in idx:
                    if i in asked:
                        next(it)        # ASKING's +OK
                    kept.append(next(it))
                replies = kept
            for i, reply in zip(idx, replies):
                out[i] = reply
        return out

    async def aclose(self) -> None:
        conns, self.conns = list(self.conns.values()), {}
        for conn in conns:
            await conn.aclose()
