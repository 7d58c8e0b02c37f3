"""The one place that knows a Redis Cluster's shape: masters, replicas, slot ranges, which
address to dial for each node (host mapping), and how to learn all that again.

Nothing else parses ``CLUSTER SHARDS`` / ``CLUSTER SLOTS`` replies: readers, writers and
the precheck ask a ``Topology``. ``CLUSTER SHARDS`` (Redis 7.0+, Valkey) is asked first;
``CLUSTER SLOTS`` (every version) when a server does not know it.
"""

from __future__ import annotations

import logging
from binascii import crc_hqx
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.crc import key_slot as _key_slot

from .errors import EndpointError
from .resp import Connection, ServerReplyError, parse_info
from .spec import Endpoint

log = logging.getLogger("cdcd.topology")

SLOTS = 16384
Addr = tuple[str, int]


def key_slot(key: bytes) -> int:
    """The cluster slot of a key: CRC16 of the key or of its {hash tag}, mod 16384.

    redis-py's implementation (the same CRC16 as redis-py's cluster client uses); a key
    without '{' (most keys) takes the same CRC in C without the tag search.
    """
    if b"{" not in key:
        return crc_hqx(key, 0) & 16383
    return int(_key_slot(key))


def show_addr(addr: Addr) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class HostMapping:
    """Where to dial a node that announces an address cdcd cannot reach (NAT, containers,
    cloud proxies): ``{"announced host:port": "dial host:port"}`` or ``{"host": "host"}``
    (the port is kept)."""

    def __init__(self, mapping: Mapping[str, str] | None = None) -> None:
        self.by_addr: dict[Addr, Addr] = {}
        self.by_host: dict[str, str] = {}
        for announced, dial in (mapping or {}).items():
            a_host, a_sep, a_port = announced.rpartition(":")
            d_host, d_sep, d_port = dial.rpartition(":")
            if a_sep and a_port.isdigit() and d_sep and d_port.isdigit():
                self.by_addr[(a_host.strip("[]"), int(a_port))] = (d_host.strip("[]"),
                                                                   int(d_port))
            elif not a_sep and not d_sep:
                self.by_host[announced] = dial
            else:
                raise ValueError(f"host_mapping {announced!r}: {dial!r}: map host:port to "
                                 f"host:port, or a host to a host")

    def dial(self, addr: Addr) -> Addr:
        if addr in self.by_addr:
            return self.by_addr[addr]
        host = self.by_host.get(addr[0])
        return (host, addr[1]) if host is not None else addr

    def __bool__(self) -> bool:
        return bool(self.by_addr or self.by_host)


@dataclass(frozen=True, kw_only=True)
class Node:
    node_id: str
    announced: Addr          # what the cluster says
    dial: Addr               # where cdcd connects (after host mapping)
    role: str                # master | replica
    healthy: bool = True

    @property
    def name(self) -> str:
        if self.dial == self.announced:
            return show_addr(self.announced)
        return f"{show_addr(self.announced)} (dialled at {show_addr(self.dial)})"


@dataclass(kw_only=True)
class Shard:
    master: Node
    replicas: list[Node] = field(default_factory=list)
    ranges: list[tuple[int, int]] = field(default_factory=list)

    def slots_text(self) -> str:
        return ",".join(f"{a}-{b}" if a != b else str(a) for a, b in self.ranges)


class Topology:
    """Masters with their slot ranges and replicas, and the owner of every slot."""

    def __init__(self, shards: Sequence[Shard]) -> None:
        self.shards = list(shards)
        self.owner: list[int] = [-1] * SLOTS      # slot -> index in shards
        for i, shard in enumerate(self.shards):
            for a, b in shard.ranges:
                for slot in range(a, b + 1):
                    self.owner[slot] = i

    def master_for_slot(self, slot: int) -> Node:
        i = self.owner[slot]
        if i < 0:
            raise EndpointError(f"cluster slot {slot} is not served by any master "
                                f"(cluster_state fail?)")
        return self.shards[i].master

    def master_for_key(self, key: bytes) -> Node:
        return self.master_for_slot(key_slot(key))

    @property
    def masters(self) -> list[Node]:
        return [s.master for s in self.shards]

    def uncovered(self) -> list[tuple[int, int]]:
        """Slot ranges no master serves."""
        out: list[tuple[int, int]] = []
        start = -1
        for slot, i in enumerate(self.owner + [0]):
            if i < 0 and start < 0:
                start = slot
            elif i >= 0 and start >= 0:
                out.append((start, slot - 1))
                start = -1
        return out

    def view(self) -> list[dict[str, Any]]:
        """What the task view shows: each master, where it is dialled, slots, replicas."""
        return [{"node": show_addr(s.master.announced), "dial": show_addr(s.master.dial),
                 "id": s.master.node_id, "slots": s.slots_text(),
                 "replicas": [show_addr(r.announced) for r in s.replicas]}
                for s in self.shards]


# --- parsing --------------------------------------------------------------------------------

def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _pairs(flat: Any) -> dict[str, Any]:
    """A RESP2 flat [name, value, ...] list (or a RESP3 map) as a dict with str keys."""
    if isinstance(flat, dict):
        return {_text(k): v for k, v in flat.items()}
    it = iter(flat)
    return {_text(k): v for k, v in zip(it, it)}


def parse_shards(reply: Any, mapping: HostMapping, seed: Addr) -> list[Shard]:
    """Parse ``CLUSTER SHARDS`` (7.0+): one entry per shard with its slots and nodes."""
    shards: list[Shard] = []
    for raw in reply:
        entry = _pairs(raw)
        slots = [int(x) for x in entry.get("slots", [])]
        ranges = [(slots[i], slots[i + 1]) for i in range(0, len(slots) - 1, 2)]
        master: Node | None = None
        replicas: list[Node] = []
        for raw_node in entry.get("nodes", []):
            n = _pairs(raw_node)
            host = _text(n.get("endpoint") or n.get("ip") or "")
            if host in ("", "?"):
                host = _text(n.get("ip") or seed[0])
            port = int(n.get("port") or n.get("tls-port") or 0)
            announced = (host, port)
            node = Node(node_id=_text(n.get("id", "")), announced=announced,
                        dial=mapping.dial(announced),
                        role="master" if _text(n.get("role")) == "master" else "replica",
                        # "loading" also means "offset 0 so far" (7.0): usable
                        healthy=_text(n.get("health", "online")) in ("online", "loading"))
            if node.role == "master":
                master = node
            else:
                replicas.append(node)
        if master is None or not ranges:
            continue      # a shard with no master or no slots serves nothing
        shards.append(Shard(master=master, replicas=replicas, ranges=ranges))
    return shards


def parse_slots(reply: Any, mapping: HostMapping, seed: Addr) -> list[Shard]:
    """Parse ``CLUSTER SLOTS`` (every version): one entry per slot range."""
    by_master: dict[str, Shard] = {}
    for entry in reply:
        start, end = int(entry[0]), int(entry[1])
        nodes = []
        for raw in entry[2:]:
            host = _text(raw[0]) or seed[0]
            announced = (host if host != "?" else seed[0], int(raw[1]))
            nodes.append((_text(raw[2]) if len(raw) > 2 else show_addr(announced), announced))
        if not nodes:
            continue
        mid, maddr = nodes[0]
        shard = by_master.get(mid)
        if shard is None:
            shard = by_master[mid] = Shard(master=Node(node_id=mid, announced=maddr,
                                                       dial=mapping.dial(maddr),
                                                       role="master"))
            shard.replicas = [Node(node_id=rid, announced=raddr, dial=mapping.dial(raddr),
                                   role="replica") for rid, raddr in nodes[1:]]
        shard.ranges.append((start, end))
    for shard in by_master.values():
        shard.ranges.sort()
    return list(by_master.values())


# --- discovery ------------------------------------------------------------------------------

async def is_cluster(conn: Connection) -> bool:
    """Say whether a connected node runs in cluster mode (INFO cluster)."""
    info = parse_info(await conn.call("INFO", "cluster"))
    return info.get("cluster_enabled") == "1"


async def read_topology(conn: Connection, mapping: HostMapping) -> Topology:
    """Ask one connected node for the cluster's shape."""
    seed = _peer(conn)
    try:
        reply = await conn.call("CLUSTER", "SHARDS")
        shards = parse_shards(reply, mapping, seed)
    except ServerReplyError as exc:
        if "unknown" not in exc.reply.lower() and "syntax" not in exc.reply.lower():
            raise
        shards = parse_slots(await conn.call("CLUSTER", "SLOTS"), mapping, seed)
    if not shards:
        raise EndpointError(f"{conn.name}: the cluster has no master serving slots")
    return Topology(shards)


def _peer(conn: Connection) -> Addr:
    peer = conn.writer.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return (str(peer[0]), int(peer[1]))
    return ("127.0.0.1", 0)


async def discover(ep: Endpoint, mapping: HostMapping, *, role: str,
                   timeout: float = 10.0) -> Topology:
    """Learn the topology from the first seed of ``ep.addrs`` that answers."""
    errors: list[str] = []
    for seed in ep.addrs:
        host, port = mapping.dial(seed)
        try:
            conn = await Connection.open(host, port, role=role, ep=ep, timeout=timeout)
        except EndpointError as exc:
            errors.append(exc.message)
            continue
        try:
            return await read_topology(conn, mapping)
        except EndpointError as exc:
            errors.append(exc.message)
        finally:
            conn.close()
    raise EndpointError(f"{role} cluster: no seed node answered: " + "; ".join(errors))


async def check_reachable(topology: Topology, ep: Endpoint, *, role: str,
                          nodes: Iterable[Node] | None = None,
                          timeout: float = 5.0) -> None:
    """Connect to every master (or ``nodes``); an announced address that cannot be dialled
    gets an error naming it and saying how to map it."""
    for node in nodes if nodes is not None else topology.masters:
        try:
            conn = await Connection.open(*node.dial, role=role, ep=ep, timeout=timeout)
        except EndpointError as exc:
            hint = ""
            if node.dial == node.announced:
                hint = (f"; if that is an address only the cluster's own network can reach, "
                        f"map it with {role}.host_mapping: "
                        f"{{\"{show_addr(node.announced)}\": \"<host:port cdcd can dial>\"}}")
            raise EndpointError(f"{role} cluster node {node.name} ({node.role}, announced "
                                 f"by the cluster) cannot be reached: {exc.message}"
                                 f"{hint}") from None
        conn.close()
