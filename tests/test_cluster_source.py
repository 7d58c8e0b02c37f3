"""A Redis Cluster as the source, against real clusters: one psync link per master shard
into a standalone target, full and incremental, each shard resuming on its own after a
daemon kill -9 and continuing with a partial resync after a shard's failover."""

from __future__ import annotations

import os
import urllib.request
from typing import Any

import pytest

from .cluster import running_cluster
from .compare import assert_counters_and_lists, assert_same, diff
from .daemon import Daemon
from .load import Load
from .servers import wait_for

pytestmark = pytest.mark.timeout(240)

BACKLOG = ["--repl-backlog-size", "256mb"]


def fill_cluster(c: Any, n: int = 3000) -> None:
    pipe = c.pipeline(transaction=False)
    for i in range(n):
        pipe.set(f"k:{i}", os.urandom(20))
        if i % 10 == 0:
            pipe.hset(f"h:{i}", mapping={"a": i, "b": "x" * 20})
            pipe.rpush(f"l:{i}", *range(5))
            pipe.zadd(f"z:{i}", {"m": i})
            pipe.set(f"ttl:{i}", i, px=600_000)
    pipe.execute()


def inc_spec(cluster: Any, dst: Any, **kw: Any) -> dict[str, Any]:
    return {"source": {"addrs": cluster.addrs}, "target": {"addrs": dst.addr},
            "migration_method": "incremental_migration", "reader": "psync", **kw}


def caught_up(daemon: Daemon, task_id: str, cluster: Any) -> None:
    def ok() -> bool:
        view = daemon.task(task_id)
        shards = view["progress"].get("shards") or []
        if "retrying" in view["reason"] or len(shards) != len(cluster.masters):
            return False
        for sh in shards:
            host, _, port = sh["node"].partition(" ")[0].rpartition(":")
            node = next(n for n in cluster.nodes if n.port == int(port))
            end = int(node.client().info("replication")["master_repl_offset"])
            if sh["applied_offset"] < end - 200:
                return False
        return True
    wait_for(ok, 90, 0.2, what="every shard caught up")


def exact(cluster: Any, dst: Any, ignore: Any = ()) -> None:
    wait_for(lambda: not diff(cluster.client(), dst.client(), ignore=ignore), 60, 0.5,
             what="the target equal to the source")
    assert_counters_and_lists(cluster.client(), dst.client())


@pytest.mark.parametrize("flavour", ["redis7", "redis6", "valkey8"])
def test_full_copy_of_a_cluster(flavour: str, servers: Any, daemon: Daemon) -> None:
    dst = servers(flavour)
    with running_cluster(flavour, replicas=0) as cluster:
        fill_cluster(cluster.client())
        daemon.ok("create", {"task_id": "full", "source": {"addrs": cluster.addrs},
                             "target": {"addrs": dst.addr},
                             "migration_method": "full_amount_migration"})
        view = daemon.wait_state("full", "Succeeded", timeout=90)
        assert_same(cluster.client(), dst.client())
        assert len(view["progress"]["shards"]) == 3
        checks = {c["name"]: c for c in view["prechecks"]}
        assert "one psync link each" in checks["source.topology"]["message"]


@pytest.mark.parametrize("flavour", ["redis7", "redis6", "valkey8"])
def test_incremental_from_a_cluster_through_daemon_kills(flavour: str, servers: Any,
                                                        daemon: Daemon) -> None:
    dst = servers(flavour)
    with running_cluster(flavour, replicas=0, args=BACKLOG) as cluster:
        fill_cluster(cluster.client(), 1000)
        daemon.ok("create", inc_spec(cluster, dst, task_id="inc"))
        wait_for(lambda: daemon.task("inc")["phase"] == "incremental", 60, what="streaming")
        with Load(lambda db: cluster.client(), dbs=(0,), kinds="counters+lists") as load:
            for _ in range(2):
                wait_for(lambda: load.ops > 3000, 30, what="some load")
                daemon.kill()
                daemon.start()
                load.ops = 0
        caught_up(daemon, "inc", cluster)
        exact(cluster, dst)
        view = daemon.task("inc")
        assert view["progress"]["full_resyncs"] == 0, view["reason"]
        assert {sh["phase"] for sh in view["progress"]["shards"]} == {"incremental"}
        with urllib.request.urlopen(daemon.url + "/metrics", timeout=10) as r:
            text = r.read().decode()
        assert text.count('cdcd_shard_lag_bytes{node=') == 3, text[:2000]
        # one marker per shard, in the marker db
        marker_db = int(view["markers"][0].split(":")[0].split()[1])
        assert len(list(dst.client(marker_db).scan_iter(match="cdcd:checkpoint:inc:*"))) == 3
        daemon.ok("delete", {"task_id": "inc", "purge_markers": True})
        assert not list(dst.client(marker_db).scan_iter(match="cdcd:*"))


def shard_failover(daemon: Daemon, dst: Any, cluster: Any, task_id: str, heir: Any,
                   fail: Any) -> None:
    """Stream a load, fail a shard over with ``fail()`` (``heir`` its new master), stream
    more: the shard must continue with a partial resync and the target end exact."""
    daemon.ok("create", inc_spec(cluster, dst, task_id=task_id))
    wait_for(lambda: daemon.task(task_id)["phase"] == "incremental", 60, what="streaming")
    Load(lambda db: cluster.client(), dbs=(0,), kinds="counters+lists",
         max_ops=4000).run_all()
    fail()
    wait_for(lambda: heir.client().info("replication")["role"] == "master", 30,
             what="the replica taking over")
    live = [n for n in cluster.nodes if n.proc is not None and n.proc.poll() is None]
    wait_for(lambda: all(b"cluster_state:ok" in n.client().execute_command(
        "CLUSTER", "INFO") for n in live), 30, what="cluster_state:ok everywhere")
    Load(lambda db: cluster.client(), dbs=(0,), kinds="counters+lists", max_ops=4000,
         seed=5).run_all()
    caught_up(daemon, task_id, cluster)
    exact(cluster, dst)
    view = daemon.task(task_id)
    assert view["progress"]["full_resyncs"] == 0, view["reason"]
    stats = heir.client().info("stats")
    assert stats["sync_full"] == 0 and stats["sync_partial_ok"] >= 1, stats
    assert any(sh["node"].startswith(heir.addr) for sh in view["progress"]["shards"])


def test_a_source_shard_fails_over_with_a_partial_resync(servers: Any,
                                                         daemon: Daemon) -> None:
    with running_cluster("redis7", replicas=1, args=BACKLOG) as cluster:
        replica = cluster.replicas[0]
        shard_failover(daemon, servers(), cluster, "fo", replica,
                       lambda: replica.client().execute_command("CLUSTER", "FAILOVER"))


def test_cluster_source_refusals(servers: Any, daemon: Daemon) -> None:
    dst = servers()
    with running_cluster("redis7", replicas=0) as cluster:
        daemon.ok("create", {**inc_spec(cluster, dst, task_id="scan"), "reader": "scan"})
        view = daemon.wait_state("scan", "Failed")
        assert "psync reader only" in view["reason"], view["reason"]


def test_read_from_replicas_keeps_the_masters_free(servers: Any, daemon: Daemon) -> None:
    dst = servers()
    with running_cluster("redis7", replicas=1, args=BACKLOG) as cluster:
        fill_cluster(cluster.client(), 1000)
        before = {m.port: m.client().info("stats")["sync_full"] for m in cluster.masters}
        spec = inc_spec(cluster, dst, task_id="rep")
        spec["source"]["read_from"] = "replica"
        daemon.ok("create", spec)
        wait_for(lambda: daemon.task("rep")["phase"] == "incremental", 60, what="streaming")
        Load(lambda db: cluster.client(), dbs=(0,), kinds="counters+lists",
             max_ops=3000).run_all()
        caught_up(daemon, "rep", cluster)
        exact(cluster, dst)
        view = daemon.task("rep")
        assert {sh["role"] for sh in view["progress"]["shards"]} == {"replica"}
        assert view["spec"]["source"]["read_from"] == "replica"
        after = {m.port: m.client().info("stats")["sync_full"] for m in cluster.masters}
        assert after == before          # no fork, no RDB on any master
        assert all(r.client().info("stats")["sync_full"] >= 1 for r in cluster.replicas)
        # a standalone source has no shards to read from replicas
        code, doc = daemon.api("precheck", {"source": {"addrs": dst.addr,
                                                       "read_from": "replica"},
                                            "target": {"addrs": servers().addr}})
        checks = {c["name"]: c for c in doc["data"]["checks"]}
        assert checks["source.topology"]["status"] == "error"


def test_resharding_the_source_stops_the_task_until_a_resync(servers: Any,
                                                            daemon: Daemon) -> None:
    dst = servers()
    with running_cluster("redis7", replicas=0, args=BACKLOG) as cluster:
        fill_cluster(cluster.client(), 2000)
        daemon.ok("create", inc_spec(cluster, dst, task_id="rs"))
        wait_for(lambda: daemon.task("rs")["phase"] == "incremental", 60, what="streaming")
        cluster.move_slots(cluster.masters[0], cluster.masters[1], range(0, 300))
        view = daemon.wait_state("rs", "Failed", timeout=30)
        assert "resharded" in view["reason"] or "slots moved" in view["reason"], view
        daemon.ok("resync", {"task_id": "rs"})
        wait_for(lambda: daemon.task("rs")["phase"] == "incremental", 60, what="streaming")
        Load(lambda db: cluster.client(), dbs=(0,), kinds="counters+lists",
             max_ops=2000).run_all()
        caught_up(daemon, "rs", cluster)
        exact(cluster, dst)
        # the resync is done: a restart resumes every shard, no new snapshot
        resyncs = daemon.task("rs")["progress"]["full_resyncs"]
        daemon.kill()
        daemon.start()
        Load(lambda db: cluster.client(), dbs=(0,), kinds="counters+lists", max_ops=1000,
             seed=3).run_all()
        caught_up(daemon, "rs", cluster)
        exact(cluster, dst)
        assert daemon.task("rs")["progress"]["full_resyncs"] == resyncs


def test_cluster_to_a_cluster_of_two_masters(servers: Any, daemon: Daemon) -> None:
    """3 source shards into 2 target masters: each slot's marker on the target holds the
    position of the source shard that owns the slot; a daemon kill -9 resumes each shard."""
    with running_cluster("redis7", replicas=0, args=BACKLOG) as src, \
            running_cluster("redis7", masters=2, replicas=0) as dst:
        fill_cluster(src.client(), 2000)
        daemon.ok("create", {"task_id": "full", "source": {"addrs": src.addrs},
                             "target": {"addrs": dst.addrs},
                             "migration_method": "full_amount_migration"})
        daemon.wait_state("full", "Succeeded", timeout=90)
        assert_same(src.client(), dst.client())
        daemon.ok("create", {"task_id": "inc", "source": {"addrs": src.addrs},
                             "target": {"addrs": dst.addrs}, "shared_target": True,
                             "migration_method": "incremental_migration"})
        wait_for(lambda: daemon.task("inc")["phase"] == "incremental", 60, what="streaming")
        with Load(lambda db: src.client(), dbs=(0,), kinds="counters+lists") as load:
            wait_for(lambda: load.ops > 3000, 30, what="some load")
            daemon.kill()
            daemon.start()
            wait_for(lambda: load.ops > 8000, 60, what="more load")
        caught_up(daemon, "inc", src)
        marks = set(dst.client().scan_iter(match="cdcd:checkpoint:*", count=5000))
        assert len(marks) == 16384
        exact(src, dst, ignore=marks)
        view = daemon.task("inc")
        assert view["progress"]["full_resyncs"] == 0, view["reason"]


def test_a_source_master_killed_and_its_replica_promoted(servers: Any,
                                                          daemon: Daemon) -> None:
    with running_cluster("redis7", replicas=1, args=BACKLOG) as cluster:
        victim, heir = cluster.masters[1], cluster.replicas[1]

        def kill() -> None:
            wait_for(lambda: heir.client().info("replication")["slave_repl_offset"] >=
                     victim.client().info("replication")["master_repl_offset"], 30,
                     what="the replica in sync")
            victim.kill()
        shard_failover(daemon, servers(), cluster, "k9", heir, kill)


def test_daemon_killed_during_a_three_shard_snapshot(servers: Any, daemon: Daemon) -> None:
    dst = servers()
    with running_cluster("redis7", replicas=0, args=BACKLOG) as cluster:
        c = cluster.client()
        fill_cluster(c, 3000)
        pipe = c.pipeline(transaction=False)
        for i in range(3000):
            pipe.set(f"big:{i}", os.urandom(1000))
        pipe.execute()
        daemon.ok("create", {**inc_spec(cluster, dst, task_id="snap"),
                             "bandwidth_limit_mb": 1})
        wait_for(lambda: daemon.task("snap")["progress"]["snapshot"]["keys_done"] > 500, 60,
                 what="the snapshot under way")
        daemon.kill()
        c.delete(*[f"k:{i}" for i in range(100)])      # deleted meanwhile: must not stay
        c.set("new-key", "x")
        daemon.start()
        daemon.ok("update", {"task_id": "snap", "bandwidth_limit_mb": 10240})
        wait_for(lambda: daemon.task("snap")["phase"] == "incremental", 90, what="streaming")
        Load(lambda db: cluster.client(), dbs=(0,), kinds="counters+lists",
             max_ops=2000).run_all()
        caught_up(daemon, "snap", cluster)
        exact(cluster, dst)
