"""A Sentinel-managed master for the tests: a master, a replica and one sentinel (quorum
1), real processes on free loopback ports. ``failover()`` runs SENTINEL FAILOVER and waits
until the replica is the master everyone is told about."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator

import redis

from .servers import RedisServer, free_port, require, wait_for

NAME = "mymaster"


class SentinelGroup:
    def __init__(self, flavour: str = "redis7") -> None:
        self.flavour = flavour
        self.master = RedisServer(flavour)
        self.replica = RedisServer(flavour)
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> SentinelGroup:
        self.master.start()
        self.replica.start()
        self.replica.client().execute_command("REPLICAOF", "127.0.0.1", self.master.port)
        wait_for(lambda: self.replica.client().info("replication")["master_link_status"]
                 == "up", 30, what="the replica's link")
        self.port = free_port()
        conf = self.master.dir / "sentinel.conf"
        conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {self.master.dir}\n"
            f"sentinel monitor {NAME} 127.0.0.1 {self.master.port} 1\n"
            f"sentinel down-after-milliseconds {NAME} 1000\n"
            f"sentinel failover-timeout {NAME} 10000\n"
            f"sentinel parallel-syncs {NAME} 1\n")
        self.proc = subprocess.Popen([require(self.flavour), str(conf), "--sentinel",
                                      "--logfile", str(self.master.dir / "sentinel.log")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self._knows_replica, 30, 0.1, what="the sentinel discovering the replica")
        return self

    def sentinel(self) -> redis.Redis[bytes]:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=10)

    def _knows_replica(self) -> bool:
        try:
            return bool(self.sentinel().execute_command("SENTINEL", "REPLICAS", NAME))
        except redis.ConnectionError:
            return False

    @property
    def addrs(self) -> str:
        return f"127.0.0.1:{self.port}"

    def spec(self) -> dict[str, object]:
        return {"sentinel": {"addrs": self.addrs, "master_name": NAME}}

    def current(self) -> RedisServer:
        host, port = self.sentinel().execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME",
                                                     NAME)
        return self.master if int(port) == self.master.port else self.replica

    def failover(self) -> RedisServer:
        """SENTINEL FAILOVER; return the new master once it is one and announced."""
        old = self.current()
        new = self.replica if old is self.master else self.master
        self.sentinel().execute_command("SENTINEL", "FAILOVER", NAME)
        wait_for(lambda: self.current() is new and
                 new.client().info("replication")["role"] == "master", 30, 0.1,
                 what="the sentinel failing over")
        return new

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.replica.cleanup()
        self.master.cleanup()


@contextlib.contextmanager
def sentinel_group(flavour: str = "redis7") -> Iterator[SentinelGroup]:
    group = SentinelGroup(flavour)
    try:
        yield group.start()
    finally:
        group.stop()


def settle(seconds: float = 0.5) -> None:
    time.sleep(seconds)
