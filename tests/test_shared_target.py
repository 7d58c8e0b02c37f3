"""Operator mistakes around one target: a second task writing the same target dbs is
refused (409 naming the first), unless the scopes are provably disjoint or the spec says
``shared_target``; a resync of one task never deletes another task's keys."""

from __future__ import annotations

from typing import Any

from .daemon import Daemon
from .servers import wait_for
from .test_incremental import spec


def test_second_writer_of_the_same_target_is_refused(servers: Any, daemon: Daemon) -> None:
    src, src2, dst = servers(), servers(), servers()
    daemon.ok("create", spec(src, dst, task_id="first", filter={"dbs": [0, 1]}))
    # the same source and target under another name: every change would be applied twice
    same = spec(src, dst, task_id="second", filter={"dbs": [0, 1]})
    same["target"] = {"addrs": f"localhost:{dst.port}"}
    code, doc = daemon.api("create", same)
    assert code == 409, doc
    assert "task 'first'" in doc["message"] and "shared_target" in doc["message"], doc
    # another source into every db (0 and 1 included): refused too
    code, doc = daemon.api("create", spec(src2, dst, task_id="third"))
    assert code == 409 and "task 'first'" in doc["message"], doc
    # provably disjoint: other target dbs
    daemon.ok("create", spec(src2, dst, task_id="db5", filter={"dbs": [0]},
                             db_mapping={"0": 5}))
    # the operator vouches for sharing
    daemon.ok("create", spec(src2, dst, task_id="shared", shared_target=True,
                             filter={"dbs": [1]}))
    # provably disjoint keys in a shared db
    daemon.ok("create", spec(src, dst, task_id="x", filter={"dbs": [3],
                                                             "include_prefixes": ["x:"]}))
    daemon.ok("create", spec(src2, dst, task_id="y", filter={"dbs": [3],
                                                              "include_prefixes": ["y:"]}))
    assert {t["task_id"] for t in daemon.ok("list")["tasks"]} == {"first", "db5", "shared",
                                                                       "x", "y"}


def test_resync_spares_keys_of_a_task_sharing_the_target(servers: Any,
                                                         daemon: Daemon) -> None:
    a, b, dst = servers(), servers(), servers()
    a.client().mset({f"a:{i}": i for i in range(100)})
    b.client().mset({f"b:{i}": i for i in range(100)})
    daemon.ok("create", spec(a, dst, task_id="a", shared_target=True))
    daemon.ok("create", spec(b, dst, task_id="b", shared_target=True,
                             filter={"include_prefixes": ["b:"]}))
    for tid in ("a", "b"):
        wait_for(lambda tid=tid: daemon.task(tid)["phase"] == "incremental", 30)  # type: ignore[misc]
    wait_for(lambda: dst.client().dbsize() >= 200, 30, what="both copies")
    a.client().delete("a:1")
    a.client().set("a:new", 1)
    daemon.ok("resync", {"task_id": "a"})
    wait_for(lambda: daemon.task("a")["progress"]["full_resyncs"] == 1, 30)
    wait_for(lambda: dst.client().get("a:new") == b"1", 30, what="the resync")
    wait_for(lambda: dst.client().get("a:1") is None, 30, what="a stale key removed")
    # task b's keys are in a's scope (a copies every key) but b owns them: kept
    assert all(dst.client().get(f"b:{i}") == str(i).encode() for i in range(100))
    assert dst.client(15).exists("cdcd:checkpoint:b")
