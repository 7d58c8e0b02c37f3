"""A Redis Cluster as the source, against real clusters: one psync link per master shard
into a standalone target, full and incremental, each shard resuming on its own after a
daemon kill -9 and continuing with a partial resync after a shard's failover."""

from __future__ import annotations

import os
import urllib.request
from typing import Any

import pytest

from cdcd.markers import slot_tags

from .cluster import running_cluster
from .compare import assert_counters_and_lists, assert_same, diff
from .daemon import Daemon
from .load import Load
from .servers import wait_for

pytestmark = pytest.mark.timeout(240)

BACKLOG = ["--repl-backlog-size", "256mb"]


def fill_cluster(c: Any, n: int = 3000, pad: int = 0) -> None:
    """``n`` keys of every type, and ``pad`` strings of 1 kB (a snapshot that lasts)."""
    pipe = c.pipeline(transaction=False)
    for i in range(pad):
        pipe.set(f"pad:{i}", os.urandom(1000))
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
    try:
        wait_for(lambda: not diff(cluster.client(), dst.client(), ignore=ignore), 60, 0.5,
                 what="the target equal to the source")
    except AssertionError:
        raise AssertionError("\n".join(diff(cluster.client(), dst.client(),
                                            ignore=ignore))) from None
    assert_counters_and_lists(cluster.client(), dst.client())


def exact_into_cluster(daemon: Daemon, task_id: str, src: Any, dst: Any) -> None:
    """Every shard caught up, a marker in every slot of the target cluster, the data
    equal, no snapshot redone."""
    caught_up(daemon, task_id, src)
    marks = set(dst.client().scan_iter(match="cdcd:checkpoint:*", count=5000))
    assert len(marks) == 16384
    exact(src, dst, ignore=marks)
    view = daemon.task(task_id)
    assert view["progress"]["full_resyncs"] == 0, view["reason"]


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
    with running_cluster("redis7", replicas=1) as cluster:
        spec = {**inc_spec(cluster, dst, task_id="scan"), "reader": "scan"}
        spec["source"]["read_from"] = "replica"
        daemon.ok("create", spec)
        view = daemon.wait_state("scan", "Failed")
        assert "read_from: replica is for the psync reader" in view["reason"], view["reason"]
        # the scan reader's feed needs keyspace notifications on every master
        daemon.ok("delete", {"task_id": "scan"})
        daemon.ok("create", {**inc_spec(cluster, dst, task_id="quiet"), "reader": "scan"})
        view = daemon.wait_state("quiet", "Failed")
        assert "keyspace notifications are off" in view["reason"], view["reason"]


@pytest.mark.parametrize("flavour", ["redis7", "valkey8"])
def test_incremental_from_a_cluster_with_the_scan_reader(flavour: str, servers: Any,
                                                        daemon: Daemon) -> None:
    """reader scan on a cluster source: every master scanned, then every master's
    keyspace notifications followed (best effort), through slots migrating meanwhile."""
    dst = servers(flavour)
    with running_cluster(flavour, replicas=0,
                         args=["--notify-keyspace-events", "KA"]) as cluster:
        fill_cluster(cluster.client(), 1000)
        daemon.ok("create", {**inc_spec(cluster, dst, task_id="si"), "reader": "scan"})
        wait_for(lambda: daemon.task("si")["phase"] == "incremental", 60, what="streaming")
        with Load(lambda db: cluster.client(), dbs=(0,), kinds="counters+lists") as load:
            wait_for(lambda: load.ops > 2000, 30, what="some load")
            cluster.move_slots(cluster.masters[0], cluster.masters[1], range(0, 300))
            wait_for(lambda: load.ops > 6000, 60, what="more load")
        exact(cluster, dst)
        view = daemon.task("si")
        assert "best effort" in view["reason"], view["reason"]
        assert len(view["progress"]["shards"]) == 3
        assert view["state"] == "Running"


@pytest.mark.parametrize("flavour", ["redis7", "valkey8"])
def test_full_copy_of_a_cluster_with_the_scan_reader(flavour: str, servers: Any,
                                                    daemon: Daemon) -> None:
    """A cluster whose masters refuse PSYNC (managed services): reader scan copies it
    with one SCAN + DUMP reader per master; a daemon kill -9 half way resumes each
    master's scan from its cursor."""
    dst = servers(flavour)
    with running_cluster(flavour, replicas=0) as cluster:
        fill_cluster(cluster.client(), 3000, pad=3000)
        daemon.ok("create", {"task_id": "sc", "source": {"addrs": cluster.addrs},
                             "target": {"addrs": dst.addr}, "reader": "scan",
                             "bandwidth_limit_mb": 1,
                             "migration_method": "full_amount_migration"})
        wait_for(lambda: daemon.task("sc")["progress"]["snapshot"]["keys_done"] > 200, 60,
                 what="the scan under way")
        daemon.kill()
        daemon.start()
        daemon.ok("update", {"task_id": "sc", "bandwidth_limit_mb": 10240})
        view = daemon.wait_state("sc", "Succeeded", timeout=90)
        assert_same(cluster.client(), dst.client())
        assert len(view["progress"]["shards"]) == 3
        checks = {c["name"]: c for c in view["prechecks"]}
        assert "one SCAN reader each" in checks["source.topology"]["message"]


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


def kill_at(daemon: Daemon, slot: int, at: int) -> None:
    """A daemon kill -9 and restart when the resharding reaches slot ``at``."""
    if slot == at:
        daemon.kill()
        daemon.start()


def reshard(cluster: Any, on_slot: Any = None, scale: float = 1.0) -> int:
    """Slots both ways between the first two masters, and from the third to the first
    (2,077 slots; ``scale`` fewer for the other flavours, to keep the suite short)."""
    a, b, c = cluster.masters[:3]
    moved = cluster.move_slots(a, b, range(0, int(1200 * scale)), on_slot=on_slot)
    moved += cluster.move_slots(b, a, range(0, int(400 * scale)))
    moved += cluster.move_slots(c, a, range(10923, 10923 + int(477 * scale)))
    return moved


@pytest.mark.parametrize("flavour", ["redis7", "redis6"])
def test_resharding_the_source_under_load_with_a_daemon_kill(flavour: str, servers: Any,
                                                              daemon: Daemon) -> None:
    """Slots migrate between source masters (MIGRATE: a RESTORE in one shard's stream, a
    DEL in another's) while counters and lists are written, some of them during their
    slot's migration, and the daemon is killed half way: the target stays exact, no
    shard copies its snapshot again."""
    dst = servers(flavour)
    with running_cluster(flavour, replicas=0, args=BACKLOG) as cluster:
        fill_cluster(cluster.client(), 2000)
        daemon.ok("create", inc_spec(cluster, dst, task_id="rs"))
        wait_for(lambda: daemon.task("rs")["phase"] == "incremental", 60, what="streaming")

        with Load(lambda db: cluster.client(), dbs=(0,), kinds="counters+lists") as load:
            wait_for(lambda: load.ops > 1000, 30, what="some load")
            moved = reshard(cluster, lambda slot: kill_at(daemon, slot, 300),
                            1.0 if flavour == "redis7" else 0.4)
            wait_for(lambda: load.ops > 10000, 60, what="more load after the resharding")
        assert moved > 100
        caught_up(daemon, "rs", cluster)
        exact(cluster, dst)
        view = daemon.task("rs")
        assert view["progress"]["full_resyncs"] == 0, view["reason"]
        assert view["state"] == "Running", view["reason"]
        by_node = {sh["node"].partition(" ")[0]: sh["slots"] for sh in view["progress"]["shards"]}
        assert by_node[cluster.masters[1].addr].startswith(
            "400-1199" if flavour == "redis7" else "160-479"), by_node
        # a restart after the resharding resumes every shard where it was
        daemon.kill()
        daemon.start()
        Load(lambda db: cluster.client(), dbs=(0,), kinds="counters+lists", max_ops=2000,
             seed=3).run_all()
        caught_up(daemon, "rs", cluster)
        exact(cluster, dst)
        assert daemon.task("rs")["progress"]["full_resyncs"] == 0


@pytest.mark.parametrize("flavour", ["redis7", "valkey8"])
def test_resharding_the_source_into_a_cluster_target(flavour: str, daemon: Daemon) -> None:
    """The same into a cluster target of two masters, whose slot markers name the source
    shard whose stream wrote them; a daemon kill -9 during the resharding and one after
    resume exactly."""
    with running_cluster(flavour, replicas=0, args=BACKLOG) as src, \
            running_cluster(flavour, masters=2, replicas=0) as dst:
        fill_cluster(src.client(), 2000)
        daemon.ok("create", {"task_id": "rsc", "source": {"addrs": src.addrs},
                             "target": {"addrs": dst.addrs},
                             "migration_method": "incremental_migration"})
        wait_for(lambda: daemon.task("rsc")["phase"] == "incremental", 60, what="streaming")
        with Load(lambda db: src.client(), dbs=(0,), kinds="counters+lists") as load:
            wait_for(lambda: load.ops > 1000, 30, what="some load")
            reshard(src, lambda slot: kill_at(daemon, slot, 300), 0.4)   # 830 slots
            daemon.kill()
            daemon.start()
            wait_for(lambda: load.ops > 10000, 60, what="more load")
        exact_into_cluster(daemon, "rsc", src, dst)


def test_a_master_added_to_the_source_gets_its_own_reader(servers: Any,
                                                         daemon: Daemon) -> None:
    """redis-cli --cluster add-node, then slots moved to the new master under load: the
    task starts a reader for it (its first sync is not a resync) and stays exact. Then the
    slots back and the master removed (del-node): its reader is retired."""
    dst = servers()
    with running_cluster("redis7", replicas=0, args=BACKLOG) as cluster:
        fill_cluster(cluster.client(), 2000)
        daemon.ok("create", inc_spec(cluster, dst, task_id="add"))
        wait_for(lambda: daemon.task("add")["phase"] == "incremental", 60, what="streaming")
        # (resilient: redis-py's cluster client fails on a master that joins under it)
        with Load(lambda db: cluster.client(), dbs=(0,), kinds="counters+lists",
                  resilient=True) as load:
            wait_for(lambda: load.ops > 1000, 30, what="some load")
            new = cluster.add_master()
            cluster.wait_ok()
            cluster.move_slots(cluster.masters[0], new, range(0, 300))
            cluster.move_slots(cluster.masters[1], new, range(5461, 5661))
            wait_for(lambda: load.ops > 8000, 60, what="more load")
        caught_up(daemon, "add", cluster)
        exact(cluster, dst)
        # the view follows the slot map within a second or so
        wait_for(lambda: any(sh["node"].startswith(new.addr) and
                             sh["slots"] == "0-299,5461-5660"
                             for sh in daemon.task("add")["progress"]["shards"]), 10, 0.2,
                 what="the new master's shard in the view with its slots")
        view = daemon.task("add")
        assert len(view["progress"]["shards"]) == 4
        assert view["progress"]["full_resyncs"] == 0, view["reason"]
        with Load(lambda db: cluster.client(), dbs=(0,), kinds="counters+lists",
                  resilient=True, seed=9) as load:
            wait_for(lambda: load.ops > 1000, 30, what="some load")
            cluster.move_slots(new, cluster.masters[0], range(0, 300))
            cluster.move_slots(new, cluster.masters[1], range(5461, 5661))
            cluster.remove_master(new)
            cluster.wait_ok()
            wait_for(lambda: load.ops > 8000, 60, what="more load")
        caught_up(daemon, "add", cluster)
        exact(cluster, dst)
        view = daemon.task("add")
        assert not any(sh["node"].startswith(new.addr) for sh in view["progress"]["shards"])
        assert view["progress"]["full_resyncs"] == 0, view["reason"]
        assert "serves no slots any more" in daemon.log.read_text()


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
        exact_into_cluster(daemon, "inc", src, dst)


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
        fill_cluster(c, 3000, pad=3000)
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


def test_flushall_on_a_source_shard_stops_the_task(servers: Any, daemon: Daemon) -> None:
    """FLUSHALL on one source master empties only its slots; applied on a standalone
    target it would empty every shard's keys: the task stops, saying so, and the target
    keeps the other shards' keys."""
    dst = servers()
    with running_cluster("redis7", replicas=0, args=BACKLOG) as cluster:
        fill_cluster(cluster.client(), 1000)
        daemon.ok("create", inc_spec(cluster, dst, task_id="fl"))
        wait_for(lambda: daemon.task("fl")["phase"] == "incremental", 60, what="streaming")
        caught_up(daemon, "fl", cluster)
        held = dst.client().dbsize()
        cluster.masters[0].client().flushall()
        view = daemon.wait_state("fl", "Failed", timeout=30)
        assert "FLUSHALL on one shard" in view["reason"], view["reason"]
        assert dst.client().dbsize() == held


def test_full_copy_of_a_cluster_resharded_meanwhile(servers: Any, daemon: Daemon) -> None:
    """Slots moving while the shards' snapshots are read (each taken at its own moment):
    the copy starts again, and ends equal to the source."""
    dst = servers()
    with running_cluster("redis7", replicas=0) as cluster:
        fill_cluster(cluster.client(), 1000, pad=8000)
        daemon.ok("create", {"task_id": "fr", "source": {"addrs": cluster.addrs},
                             "target": {"addrs": dst.addr}, "bandwidth_limit_mb": 1,
                             "migration_method": "full_amount_migration"})
        wait_for(lambda: daemon.task("fr")["phase"] == "snapshot", 60,
                 what="the snapshot under way")
        cluster.move_slots(cluster.masters[0], cluster.masters[1], range(0, 200))
        assert daemon.task("fr")["state"] == "Running"
        wait_for(lambda: "resharded while its snapshot was read" in daemon.log.read_text(),
                 30, 0.1, what="the resharding seen")
        daemon.ok("update", {"task_id": "fr", "bandwidth_limit_mb": 10240})
        daemon.wait_state("fr", "Succeeded", timeout=90)
        assert_same(cluster.client(), dst.client())


def test_a_cluster_refusing_psync_is_copied_with_scan(servers: Any, daemon: Daemon) -> None:
    """reader auto: the masters refuse PSYNC (renamed away, as on managed services), so a
    full copy falls back to one SCAN reader per master, and says so."""
    dst = servers()
    with running_cluster("redis7", replicas=0,
                         args=["--rename-command", "PSYNC", ""]) as cluster:
        fill_cluster(cluster.client(), 1000)
        daemon.ok("create", {"task_id": "auto", "source": {"addrs": cluster.addrs},
                             "target": {"addrs": dst.addr}, "reader": "auto",
                             "migration_method": "full_amount_migration"})
        view = daemon.wait_state("auto", "Succeeded", timeout=90)
        assert_same(cluster.client(), dst.client())
        assert "fell back to scan" in view["reason"], view["reason"]


def test_a_valkey_cluster_into_an_older_redis(servers: Any, daemon: Daemon) -> None:
    """Valkey 8.1 shards into Redis 6.2 (which refuses their DUMP payloads): write_mode
    auto rewrites the values as commands, in the snapshot and in the stream."""
    dst = servers("redis6")
    with running_cluster("valkey8", replicas=0, args=BACKLOG) as cluster:
        fill_cluster(cluster.client(), 1000)
        daemon.ok("create", inc_spec(cluster, dst, task_id="down"))
        wait_for(lambda: daemon.task("down")["phase"] == "incremental", 60, what="streaming")
        Load(lambda db: cluster.client(), dbs=(0,), kinds="counters+lists",
             max_ops=3000).run_all()
        caught_up(daemon, "down", cluster)
        exact(cluster, dst)
        view = daemon.task("down")
        assert view["write_mode"]["mode"] == "rewrite", view["write_mode"]


def test_a_transaction_in_a_slot_being_imported(servers: Any, daemon: Daemon) -> None:
    """A MULTI/EXEC on the master importing a slot (ASKING first): held whole until the
    slot's owner is ahead of it; the shards' bytes, forwarded raw until then, are parsed
    command by command from then on."""
    dst = servers()
    with running_cluster("redis7", replicas=0, args=BACKLOG) as cluster:
        fill_cluster(cluster.client(), 1000)
        daemon.ok("create", inc_spec(cluster, dst, task_id="tx"))
        wait_for(lambda: daemon.task("tx")["phase"] == "incremental", 60, what="streaming")
        a, b = cluster.masters[0], cluster.masters[1]
        slot = 10
        key = b"{" + slot_tags()[slot] + b"}:tx"
        b.client().execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", cluster.node_id(a))
        a.client().execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", cluster.node_id(b))
        conn = b.client().connection_pool.get_connection()
        for i in range(5):
            for cmd in (["ASKING"], ["MULTI"], ["SET", key, i], ["APPEND", key, "+"],
                        ["EXEC"]):
                conn.send_command(*cmd)
                conn.read_response()
        cluster.move_slots(a, b, range(slot, slot + 1))
        Load(lambda db: cluster.client(), dbs=(0,), kinds="counters+lists",
             max_ops=2000).run_all()
        caught_up(daemon, "tx", cluster)
        exact(cluster, dst)
        assert dst.client().get(key) == b"4+"
        assert "command by command" in daemon.log.read_text()
