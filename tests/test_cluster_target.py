"""A Redis Cluster as the target of a full migration, against real clusters: every key
routed to the master of its slot, strings grouped per slot, big keys rebuilt in a
temporary key of their own slot, host mapping of announced addresses, the cluster
precheck, and an interrupted copy redone exact."""

from __future__ import annotations

import os
from typing import Any

import pytest

from .cluster import running_cluster
from .compare import assert_same, fill_bulk, fill_mixed
from .daemon import Daemon
from .servers import wait_for

pytestmark = pytest.mark.timeout(180)


def cluster_spec(src: Any, addrs: str, **kw: Any) -> dict[str, Any]:
    return {"source": {"addrs": src.addr}, "target": {"addrs": addrs},
            "migration_method": "full_amount_migration", **kw}


def big_list(c: Any, key: bytes = b"big:list") -> None:
    """A 9 MB list: over the 8 MiB big-value threshold, so it is rebuilt in chunks."""
    for i in range(0, 90_000, 10_000):
        c.rpush(key, *[os.urandom(100) for _ in range(10_000)])


@pytest.mark.parametrize("flavour", ["redis7", "redis6", "valkey8"])
def test_full_copy_into_a_cluster(flavour: str, servers: Any, daemon: Daemon) -> None:
    src = servers(flavour)
    fill_mixed(src.client(), big=False)
    fill_bulk(src.client(), 5000)                 # plain strings: MSET per slot
    with running_cluster(flavour, replicas=0) as cluster:
        daemon.ok("create", cluster_spec(src, cluster.addrs, task_id="psync",
                                         reader="psync"))
        view = daemon.wait_state("psync", "Succeeded", timeout=90)
        assert_same(src.client(), cluster.client())
        topo = view["target_topology"]
        assert len(topo) == 3 and {t["dial"] for t in topo} == {n.addr for n in
                                                                cluster.masters}
        assert all(n.client().dbsize() > 1000 for n in cluster.masters)
        assert {c["name"]: c["status"] for c in view["prechecks"]}["target.topology"] == "ok"


def test_scan_reader_big_keys_and_an_interrupted_copy(servers: Any,
                                                      daemon: Daemon) -> None:
    src = servers()
    fill_mixed(src.client(), big=False)
    big_list(src.client())
    fill_bulk(src.client(), 3000, value_size=1000)
    with running_cluster("redis7", replicas=0) as cluster:
        daemon.ok("create", cluster_spec(src, cluster.addrs, task_id="scan", reader="scan"))
        daemon.wait_state("scan", "Succeeded", timeout=90)
        assert_same(src.client(), cluster.client())
        assert not list(cluster.client().scan_iter(match="cdcd:*"))
        # a psync copy killed half way, the source changed meanwhile: redone exact
        c = src.client()
        c.delete(b"k:1", b"k:2")
        c.set(b"k:3", b"changed")
        daemon.ok("create", {**cluster_spec(src, cluster.addrs, task_id="again",
                                            reader="psync", shared_target=True),
                             "bandwidth_limit_mb": 2})
        wait_for(lambda: daemon.task("again")["progress"]["snapshot"]["keys_done"] > 100, 30)
        daemon.kill()
        c.delete(b"k:4")
        cluster.client().set(b"k:4", b"stale")       # as if copied before the crash
        daemon.start()
        view = daemon.wait_state("again", "Succeeded", timeout=120)
        assert view["progress"]["full_resyncs"] == 1
        assert_same(src.client(), cluster.client())


def test_cluster_precheck_refusals(servers: Any, daemon: Daemon) -> None:
    src = servers()
    src.client().set("a", 1)
    src.client(1).set("b", 2)
    with running_cluster("redis7", replicas=0) as cluster:
        daemon.ok("create", cluster_spec(src, cluster.addrs, task_id="inc",
                                         migration_method="incremental_migration"))
        view = daemon.wait_state("inc", "Failed")
        assert "source db 1" in view["reason"] and "db_mapping" in view["reason"], view
        daemon.ok("create", cluster_spec(src, cluster.addrs, task_id="dbs",
                                         shared_target=True))
        view = daemon.wait_state("dbs", "Failed")
        assert "source db 1" in view["reason"] and "db_mapping" in view["reason"], view
        daemon.ok("create", cluster_spec(src, cluster.addrs, task_id="mapped",
                                         shared_target=True, db_mapping={"1": 0}))
        daemon.wait_state("mapped", "Succeeded")
        rc = cluster.client()
        assert rc.get("a") == b"1" and rc.get("b") == b"2"


def test_host_mapping_of_announced_addresses(servers: Any, daemon: Daemon) -> None:
    src = servers()
    fill_bulk(src.client(), 2000)
    # every node announces 127.0.0.2:<1..3>, where nothing listens
    with running_cluster("redis7", replicas=0, announce_ip="127.0.0.2",
                         announce_port_base=1) as cluster:
        daemon.ok("create", cluster_spec(src, cluster.addrs, task_id="unmapped"))
        view = daemon.wait_state("unmapped", "Failed")
        assert "127.0.0.2:" in view["reason"] and "host_mapping" in view["reason"], view
        mapping = {f"127.0.0.2:{i + 1}": n.addr for i, n in enumerate(cluster.masters)}
        target = {"addrs": cluster.addrs, "host_mapping": mapping}
        daemon.ok("create", {**cluster_spec(src, cluster.addrs, task_id="mapped",
                                            shared_target=True), "target": target})
        view = daemon.wait_state("mapped", "Succeeded")
        assert view["spec"]["target"]["host_mapping"] == mapping
        assert_same(src.client(), cluster.client())
