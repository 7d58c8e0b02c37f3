"""The ``update`` request: a live task's bandwidth limit changes at once (no restart, even
mid-snapshot), its endpoints' addresses and host mapping from the next connection (a
partial resync from the checkpoint when the new address continues the stream)."""

from __future__ import annotations

import os
from typing import Any

from .cluster import running_cluster
from .compare import assert_same
from .daemon import Daemon
from .servers import wait_for
from .test_incremental import converge, spec, stats


def test_bandwidth_changes_at_once_without_a_restart(servers: Any, daemon: Daemon) -> None:
    src, dst = servers(), servers()
    c = src.client()
    for i in range(0, 8000, 500):          # 8 MB of random values: 8 s at 1 MB/s
        c.mset({b"k:%d" % j: os.urandom(1000) for j in range(i, i + 500)})
    daemon.ok("create", {**spec(src, dst, task_id="bw",
                                migration_method="full_amount_migration"),
                         "bandwidth_limit_mb": 1})
    wait_for(lambda: daemon.task("bw")["progress"]["snapshot"]["keys_done"] > 200, 30)
    out = daemon.ok("update", {"task_id": "bw", "bandwidth_limit_mb": None})
    assert out["spec"]["bandwidth_limit_mb"] is None
    view = daemon.wait_state("bw", "Succeeded", timeout=20)   # not 8 s at 1 MB/s
    assert view["progress"]["retries"] == 0 and view["progress"]["full_resyncs"] == 0
    assert_same(src.client(), dst.client())


def test_new_source_address_resumes_partially(servers: Any, daemon: Daemon) -> None:
    src, dst = servers(), servers()
    daemon.ok("create", spec(src, dst, task_id="addr"))
    wait_for(lambda: daemon.task("addr")["phase"] == "incremental", 30)
    src.client().incr("counter")
    before = stats(src)
    # the same server under a new name, as after a DNS change to the promoted replica
    daemon.ok("update", {"task_id": "addr", "source": {"addrs": f"localhost:{src.port}"}})
    assert daemon.task("addr")["spec"]["source"]["addrs"] == f"localhost:{src.port}"
    wait_for(lambda: stats(src)["sync_partial_ok"] > before["sync_partial_ok"], 30,
             what="a partial resync at the new address")
    src.client().incr("counter")
    converge(src, dst, daemon, "addr")
    assert stats(src)["sync_full"] == before["sync_full"]
    assert dst.client().get("counter") == b"2"


def test_update_refusals(servers: Any, daemon: Daemon) -> None:
    src, dst, other = servers(), servers(), servers()
    daemon.ok("create", spec(src, dst, task_id="a", filter={"dbs": [0]}))
    daemon.ok("create", spec(src, other, task_id="b"))
    for data, field in (({"task_id": "a", "name": "x"}, "request_data.name"),
                        ({"task_id": "a", "source": {"password": "pw"}},
                         "request_data.source.password"),
                        ({"task_id": "a", "bandwidth_limit_mb": 0},
                         "request_data.bandwidth_limit_mb"),
                        ({"task_id": "a", "target": {"addrs": "nowhere"}},
                         "request_data.target.addrs")):
        code, doc = daemon.api("update", data)
        assert code == 400 and field in doc["message"], (data, doc)
    code, doc = daemon.api("update", {"task_id": "nope", "bandwidth_limit_mb": 5})
    assert code == 404, doc
    # b would then write the target dbs a writes
    code, doc = daemon.api("update", {"task_id": "b", "target": {"addrs": dst.addr}})
    assert code == 409 and "task 'a'" in doc["message"], doc
    assert daemon.task("b")["spec"]["target"]["addrs"] == other.addr


def test_host_mapping_update_fixes_a_cluster_target(servers: Any, daemon: Daemon) -> None:
    src = servers()
    src.client().mset({f"k:{i}": i for i in range(500)})
    with running_cluster("redis7", replicas=0, announce_ip="127.0.0.2",
                         announce_port_base=1) as cluster:
        daemon.ok("create", {"task_id": "map", "source": {"addrs": src.addr},
                             "target": {"addrs": cluster.addrs}})
        view = daemon.wait_state("map", "Failed")
        assert "host_mapping" in view["reason"], view["reason"]
        mapping = {f"127.0.0.2:{i + 1}": n.addr for i, n in enumerate(cluster.masters)}
        daemon.ok("update", {"task_id": "map", "target": {"host_mapping": mapping}})
        daemon.ok("resume", {"task_id": "map"})
        daemon.wait_state("map", "Succeeded")
        assert_same(src.client(), cluster.client())
