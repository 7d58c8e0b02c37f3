"""Start and stop real Redis Clusters for the tests (3 masters + 3 replicas by default).

Every node listens on a free loopback port whose cluster bus port (port + 10000) is free
too. The cluster is built with plain commands (CLUSTER MEET, ADDSLOTS, REPLICATE), so it
works on every flavour of tests/servers.py (redis-cli is not needed). ``announce`` makes
every node announce another address for its clients (e.g. 127.0.0.2 and a port where
nothing listens) while the bus keeps working: what cloud proxies and containers do, and
what ``host_mapping`` is for.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from typing import Any

import redis

from .servers import RedisServer, wait_for

SLOTS = 16384


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_cluster_port() -> int:
    """A free port below 55535 whose bus port (port + 10000) is free as well."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port != 6379 and port + 10000 < 65536 and _free(port + 10000):
            return port
        if port >= 55535:
            # the kernel handed out a high port: pick one in the lower range ourselves
            for candidate in range(20000 + port % 1000, 55535, 997):
                if _free(candidate) and _free(candidate + 10000):
                    return candidate


class Cluster:
    """A real cluster; ``masters`` and ``replicas`` are RedisServer objects."""

    def __init__(self, flavour: str = "redis7", *, masters: int = 3, replicas: int = 1,
                 announce_ip: str | None = None, announce_port_base: int | None = None,
                 args: list[str] | None = None) -> None:
        self.flavour = flavour
        self.n_masters = masters
        self.n_replicas = replicas
        self.announce_ip = announce_ip
        self.announce_port_base = announce_port_base
        self.args = list(args or [])
        self.nodes: list[RedisServer] = []

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> Cluster:
        total = self.n_masters * (1 + self.n_replicas)
        for i in range(total):
            node = RedisServer(self.flavour, args=self._node_args(i))
            node.port = free_cluster_port()
            if self.announce_ip is not None:
                # the bus must stay reachable at the announced ip with the real bus port
                node.extra += ["--bind", "127.0.0.1", self.announce_ip,
                               "--cluster-announce-ip", self.announce_ip,
                               "--cluster-announce-bus-port", str(node.port + 10000)]
                if self.announce_port_base is not None:
                    node.extra += ["--cluster-announce-port",
                                   str(self.announce_port_base + i)]
            self.nodes.append(node)
            node.start()
        self._form()
        return self

    def _node_args(self, i: int) -> list[str]:
        return ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", "2000", "--appendonly", "no", *self.args]

    def _form(self) -> None:
        first = self.nodes[0]
        ip = self.announce_ip or "127.0.0.1"
        for node in self.nodes[1:]:
            bus = [node.port + 10000] if self.flavour != "redis6" else []   # 7.0+ takes it
            first.client().execute_command("CLUSTER", "MEET", ip, node.port, *bus)
        per = SLOTS // self.n_masters
        for i, node in enumerate(self.masters):
            start = i * per
            end = SLOTS - 1 if i == self.n_masters - 1 else start + per - 1
            node.client().execute_command("CLUSTER", "ADDSLOTS", *range(start, end + 1))
        wait_for(lambda: all(len(self._known(n)) == len(self.nodes) for n in self.nodes), 30,
                 what="every node meeting every other")
        for i, node in enumerate(self.replicas):
            master = self.masters[i % self.n_masters]
            mid = master.client().execute_command("CLUSTER", "MYID")
            wait_for(lambda n=node, m=mid: self._replicate(n, m), 30,  # type: ignore[misc]
                     what="a replica attaching to its master")
        self.wait_ok()

    def _known(self, node: RedisServer) -> list[str]:
        raw = node.client().execute_command("CLUSTER", "NODES")
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        return [line for line in text.splitlines() if line.strip()]

    @staticmethod
    def _replicate(node: RedisServer, master_id: Any) -> bool:
        try:
            node.client().execute_command("CLUSTER", "REPLICATE", master_id)
            return True
        except redis.ResponseError:
            return False    # the node does not know the master yet

    def wait_ok(self, timeout: float = 30) -> None:
        """Wait until every live node says cluster_state:ok and every replica is in sync."""
        def ok() -> bool:
            for node in self.nodes:
                if node.proc is None or node.proc.poll() is not None:
                    continue
                info = node.client().info("cluster")
                state = node.client().execute_command("CLUSTER", "INFO")
                text = state.decode() if isinstance(state, bytes) else str(state)
                if "cluster_state:ok" not in text or not info.get("cluster_enabled"):
                    return False
                repl = node.client().info("replication")
                if repl["role"] == "slave" and repl.get("master_link_status") != "up":
                    return False
                # every node has heard of every replica (gossip), so any seed tells all
                live_replicas = sum(1 for r in self.replicas
                                    if r.proc is not None and r.proc.poll() is None)
                flags = [line.split()[2].split(",") for line in self._known(node)]
                if sum("slave" in f for f in flags) < live_replicas:
                    return False
            return True
        wait_for(ok, timeout, 0.1, what="cluster_state:ok on every node")

    def stop(self) -> None:
        for node in self.nodes:
            node.cleanup()

    # --- views ----------------------------------------------------------------------------

    @property
    def masters(self) -> list[RedisServer]:
        return self.nodes[:self.n_masters]

    @property
    def replicas(self) -> list[RedisServer]:
        return self.nodes[self.n_masters:]

    @property
    def addrs(self) -> str:
        """Seed addresses as a task spec takes them (the masters)."""
        return ",".join(n.addr for n in self.masters)

    def client(self, **kw: Any) -> redis.RedisCluster:
        """A redis-py cluster client that follows MOVED/ASK (dialling the real ports)."""
        node = self.masters[0]
        mapping = None
        if self.announce_ip is not None:
            ports = {self._announced_port(i): n.port for i, n in enumerate(self.nodes)}

            def mapping(addr: tuple[str, int]) -> tuple[str, int]:
                return ("127.0.0.1", ports.get(addr[1], addr[1]))
        return redis.RedisCluster(host="127.0.0.1", port=node.port,
                                  address_remap=mapping, socket_timeout=30, **kw)

    def _announced_port(self, i: int) -> int:
        if self.announce_port_base is None:
            return self.nodes[i].port
        return self.announce_port_base + i

    def owner(self, slot: int) -> RedisServer:
        """The master serving ``slot`` now (asking the first live master)."""
        for node in self.masters + self.replicas:
            if node.proc is None or node.proc.poll() is not None:
                continue
            for start, end, master, *_ in node.client().execute_command("CLUSTER", "SLOTS"):
                if start <= slot <= end:
                    port = int(master[1])
                    for n in self.nodes:
                        if n.port == port or self._announced_port(self.nodes.index(n)) == port:
                            return n
        raise LookupError(f"no node serves slot {slot}")


    def add_master(self) -> RedisServer:
        """Start one more node, empty, and have it join the cluster as a master without
        slots (as ``redis-cli --cluster add-node`` does)."""
        node = RedisServer(self.flavour, args=self._node_args(len(self.nodes)))
        node.port = free_cluster_port()
        node.start()
        self.nodes.insert(self.n_masters, node)
        self.n_masters += 1
        bus = [node.port + 10000] if self.flavour != "redis6" else []
        self.nodes[0].client().execute_command("CLUSTER", "MEET", "127.0.0.1", node.port, *bus)
        wait_for(lambda: all(len(self._known(n)) == len(self.nodes) for n in self.nodes), 30,
                 what="every node meeting the new master")
        return node

    def remove_master(self, node: RedisServer) -> None:
        """A master without slots leaves (as ``redis-cli --cluster del-node`` does: every
        other node forgets it, then it shuts down)."""
        gone = self.node_id(node)
        self.nodes.remove(node)
        self.n_masters -= 1
        for other in self.nodes:
            if other.proc is not None and other.proc.poll() is None:
                other.client().execute_command("CLUSTER", "FORGET", gone)
        node.cleanup()

    def node_id(self, node: RedisServer) -> str:
        raw = node.client().execute_command("CLUSTER", "MYID")
        return raw.decode() if isinstance(raw, bytes) else str(raw)

    def move_slots(self, source: RedisServer, dest: RedisServer, slots: range,
                   on_slot: Any = None) -> int:
        """Reshard by hand, as redis-cli --cluster reshard does: per slot IMPORTING /
        MIGRATING, MIGRATE its keys in groups, then SETSLOT NODE on every master.
        Return how many keys moved."""
        src_id, dst_id = self.node_id(source), self.node_id(dest)
        sc, dc = source.client(), dest.client()
        moved = 0
        for slot in slots:
            dc.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
            sc.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
            while True:
                keys = sc.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 50)
                if not keys:
                    break
                sc.execute_command("MIGRATE", "127.0.0.1", dest.port, "", 0, 5000,
                                   "REPLACE", "KEYS", *keys)
                moved += len(keys)
            for node in self.masters:
                if node.proc is not None and node.proc.poll() is None:
                    try:
                        node.client().execute_command("CLUSTER", "SETSLOT", slot, "NODE",
                                                      dst_id)
                    except redis.ResponseError:
                        pass    # a replica promoted meanwhile, or not a master any more
            if on_slot is not None:
                on_slot(slot)
        return moved


@contextlib.contextmanager
def running_cluster(flavour: str = "redis7", **kw: Any) -> Iterator[Cluster]:
    cluster = Cluster(flavour, **kw)
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def settle(seconds: float = 0.2) -> None:
    """A short pause for gossip to spread after a topology change (never for data)."""
    time.sleep(seconds)
