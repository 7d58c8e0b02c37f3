"""A Redis Cluster as the target of an incremental task, against real clusters: the
command stream routed per slot with a marker per slot, commands whose keys span slots
applied exactly, and no loss or duplicate through a daemon kill -9, target failovers and
a resharding of the target under load."""

from __future__ import annotations

import time
from typing import Any

import pytest

from .cluster import running_cluster
from .compare import assert_counters_and_lists, assert_same, fill_mixed, wait_same
from .daemon import Daemon
from .load import Load
from .servers import wait_for

pytestmark = pytest.mark.timeout(240)

MARKERS = b"cdcd:checkpoint:*"


def inc_spec(src: Any, addrs: str, **kw: Any) -> dict[str, Any]:
    return {"source": {"addrs": src.addr}, "target": {"addrs": addrs},
            "migration_method": "incremental_migration", "reader": "psync", **kw}


def start(daemon: Daemon, spec: dict[str, Any]) -> None:
    """Create the task and wait until it streams."""
    daemon.ok("create", spec)
    wait_for(lambda: daemon.task(spec["task_id"])["phase"] == "incremental", 60,
             what="the stream phase")


def markers(cluster: Any) -> set[bytes]:
    return set(cluster.client().scan_iter(match=MARKERS, count=5000))


def same(src: Any, cluster: Any, timeout: float = 60) -> None:
    wait_same(src.client(), cluster.client(), timeout=timeout, ignore=markers(cluster))


def caught_up(daemon: Daemon, task_id: str, timeout: float = 60) -> None:
    def ok() -> bool:
        inc = daemon.task(task_id)["progress"]["incremental"]
        return bool(inc["lag_bytes"] == 0)
    wait_for(ok, timeout, what="the task catching up")


@pytest.mark.parametrize("flavour", ["redis7", "redis6", "valkey8"])
def test_incremental_into_a_cluster_with_cross_slot_commands(flavour: str, servers: Any,
                                                             daemon: Daemon) -> None:
    src = servers(flavour)
    fill_mixed(src.client(), big=False)
    with running_cluster(flavour, replicas=0) as cluster:
        start(daemon, inc_spec(src, cluster.addrs, task_id="inc"))
        Load(lambda db: src.client(), dbs=(0,), kinds="crossslot", max_ops=3000).run_all()
        Load(lambda db: src.client(), dbs=(0,), kinds="mixed", max_ops=2000, seed=3).run_all()
        caught_up(daemon, "inc")
        same(src, cluster)
        view = daemon.task("inc")
        assert view["state"] == "Running", view["reason"]
        assert len(markers(cluster)) == 16384
        assert "one per slot" in view["markers"][0]
        assert view["progress"]["full_resyncs"] == 0
        assert view["progress"]["incremental"]["ops_applied"] > 5000
        keys = set(cluster.client().scan_iter(count=5000))
        for family in (b"union:", b"zu:", b"hll:", b"bitor:", b"sorted:", b"geos:", b"zcopy:"):
            assert any(k.startswith(family) for k in keys), family
        # delete purge_markers: nothing of cdcd's stays
        daemon.ok("delete", {"task_id": "inc", "purge_markers": True})
        assert not markers(cluster)
        assert_same(src.client(), cluster.client())


def counters_exact(src: Any, cluster: Any) -> None:
    """Counters and lists: a command applied twice or lost shows as a difference."""
    same(src, cluster)
    assert_counters_and_lists(src.client(), cluster.client())


BACKLOG = ["--repl-backlog-size", "256mb"]


def test_daemon_kill_under_load_into_a_cluster(servers: Any, daemon: Daemon) -> None:
    src = servers(args=BACKLOG)
    with running_cluster("redis7", replicas=0) as cluster:
        start(daemon, inc_spec(src, cluster.addrs, task_id="kill"))
        with Load(lambda db: src.client(), dbs=(0,), kinds="counters+lists") as load:
            for _ in range(3):
                wait_for(lambda: daemon.task("kill")["progress"]["incremental"]
                         ["ops_applied"] > 2000, 30, what="the stream applying")
                daemon.kill()
                daemon.start()
        assert load.ops > 3000
        caught_up(daemon, "kill")
        counters_exact(src, cluster)
        view = daemon.task("kill")
        assert view["progress"]["full_resyncs"] == 0, view["reason"]
        assert view["state"] == "Running"


def test_target_failovers_under_load(servers: Any, daemon: Daemon) -> None:
    src = servers(args=BACKLOG)
    with running_cluster("redis7", replicas=1) as cluster:
        start(daemon, inc_spec(src, cluster.addrs, task_id="fo"))
        with Load(lambda db: src.client(), dbs=(0,), kinds="counters+lists") as load:
            time.sleep(1)
            # a graceful failover: the replica of master 0 takes over
            replica = cluster.replicas[0]
            replica.client().execute_command("CLUSTER", "FAILOVER")
            wait_for(lambda: replica.client().info("replication")["role"] == "master", 30,
                     what="the replica taking over")
            time.sleep(2)
            # a crash: master 1 killed, its replica promoted by the cluster
            cluster.masters[1].kill()
            promoted = cluster.replicas[1]
            wait_for(lambda: promoted.client().info("replication")["role"] == "master", 30,
                     what="the cluster promoting the replica")
            time.sleep(2)
        assert load.ops > 2000
        wait_for(lambda: daemon.task("fo")["progress"]["incremental"]["lag_bytes"] == 0 and
                 daemon.task("fo")["reason"].find("retrying") < 0, 90,
                 what="the task catching up after the failovers")
        counters_exact(src, cluster)
        view = daemon.task("fo")
        assert view["progress"]["full_resyncs"] == 0, view["reason"]
        nodes = {t["dial"] for t in view["target_topology"]}
        assert replica.addr in nodes and promoted.addr in nodes


def test_resharding_the_target_under_load(servers: Any, daemon: Daemon) -> None:
    src = servers(args=BACKLOG)
    fill_mixed(src.client(), big=False)
    with running_cluster("redis7", replicas=0) as cluster:
        start(daemon, inc_spec(src, cluster.addrs, task_id="rs"))
        with Load(lambda db: src.client(), dbs=(0,), kinds="counters+lists") as load:
            a, b = cluster.masters[0], cluster.masters[1]
            moved = cluster.move_slots(a, b, range(0, 2000))
            time.sleep(1)
            moved += cluster.move_slots(b, a, range(0, 500))
        assert moved > 100 and load.ops > 2000
        wait_for(lambda: daemon.task("rs")["progress"]["incremental"]["lag_bytes"] == 0 and
                 "retrying" not in daemon.task("rs")["reason"], 90,
                 what="the task catching up after the resharding")
        counters_exact(src, cluster)
        view = daemon.task("rs")
        assert view["progress"]["full_resyncs"] == 0, view["reason"]
        assert len(markers(cluster)) == 16384


def test_scan_reader_incremental_into_a_cluster(servers: Any, daemon: Daemon) -> None:
    """The scan reader (no PSYNC on the source) follows changes into a cluster too: it
    copies values, so its guarantees are its own (README), and it writes no markers."""
    src = servers(args=["--notify-keyspace-events", "KA"])
    fill_mixed(src.client(), big=False)
    with running_cluster("redis7", replicas=0) as cluster:
        start(daemon, inc_spec(src, cluster.addrs, task_id="scan", reader="scan"))
        Load(lambda db: src.client(), dbs=(0,), kinds="mixed", max_ops=2000).run_all()
        same(src, cluster)
        assert not markers(cluster)
