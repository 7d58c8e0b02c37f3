"""Sentinel-managed sources and targets, against a real master, replica and sentinel:
the master is asked for at every connect and followed through SENTINEL FAILOVER under
load, with a partial resync on the source side and no duplicate on the target side."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from cdcd import sentinel
from cdcd.spec import Endpoint, Sentinel

from .compare import assert_counters_and_lists, assert_same, diff
from .daemon import Daemon
from .load import Load
from .sentinel import NAME, sentinel_group
from .servers import wait_for

pytestmark = pytest.mark.timeout(180)

BACKLOG = ["--repl-backlog-size", "256mb"]


def counters_exact(a: Any, b: Any) -> None:
    assert_same(a.client(), b.client())
    assert_counters_and_lists(a.client(), b.client())


def caught_up(daemon: Daemon, task_id: str, source: Any) -> None:
    """Wait until the task applied everything the (current) source master has."""
    def ok() -> bool:
        end = int(source.client().info("replication")["master_repl_offset"])
        view = daemon.task(task_id)
        return bool(view["progress"]["incremental"]["applied_offset"] >= end - 100 and
                    "retrying" not in view["reason"])
    wait_for(ok, 60, 0.2, what="the task catching up")


def test_source_failover_continues_with_a_partial_resync(servers: Any, daemon: Daemon) -> None:
    dst = servers()
    with sentinel_group() as g:
        daemon.ok("create", {"task_id": "s", "source": g.spec(), "target": {"addrs": dst.addr},
                             "migration_method": "incremental_migration", "reader": "psync"})
        wait_for(lambda: daemon.task("s")["phase"] == "incremental", 60, what="streaming")
        view = daemon.task("s")
        assert view["spec"]["source"]["sentinel"]["master_name"] == NAME
        assert "addrs" not in view["spec"]["source"]
        Load(lambda db: g.master.client(), dbs=(0,), kinds="counters+lists",
             max_ops=4000).run_all()
        new = g.failover()
        assert new is g.replica
        Load(lambda db: new.client(), dbs=(0,), kinds="counters+lists", max_ops=4000,
             seed=9).run_all()
        caught_up(daemon, "s", new)
        counters_exact(new, dst)
        view = daemon.task("s")
        assert view["progress"]["full_resyncs"] == 0, view["reason"]
        stats = new.client().info("stats")
        assert stats["sync_full"] == 0 and stats["sync_partial_ok"] >= 1, stats


def test_target_failover_under_load_is_exact(servers: Any, daemon: Daemon) -> None:
    src = servers(args=BACKLOG)
    with sentinel_group() as g:
        daemon.ok("create", {"task_id": "t", "source": {"addrs": src.addr}, "target": g.spec(),
                             "migration_method": "incremental_migration", "reader": "psync"})
        wait_for(lambda: daemon.task("t")["phase"] == "incremental", 60, what="streaming")
        with Load(lambda db: src.client(), dbs=(0,), kinds="counters+lists") as load:
            wait_for(lambda: load.ops > 2000, 30, what="some load")
            new = g.failover()
            wait_for(lambda: load.ops > 8000, 60, what="more load after the failover")
        # cdcd may still write to the old master for up to a second (the sentinel's poll);
        # what it wrote there is lost when that node becomes a replica, and the marker the
        # new master holds says where to resume from
        wait_for(lambda: daemon.task("t")["progress"]["retries"] >= 1, 30,
                 what="the task following the failover")
        caught_up(daemon, "t", src)
        wait_for(lambda: not diff(src.client(), new.client()), 60, 0.5,
                 what="the target equal to the source")
        counters_exact(src, new)
        view = daemon.task("t")
        assert view["progress"]["full_resyncs"] == 0, view["reason"]
        error = view["progress"]["last_error"]
        assert "sentinel" in error and "is now" in error, view["progress"]


def test_sentinel_spec_errors(servers: Any, daemon: Daemon) -> None:
    src = servers()
    with sentinel_group() as g:
        code, doc = daemon.api("create", {"source": {"addrs": src.addr, **g.spec()},
                                          "target": {"addrs": src.addr}})
        assert code == 400 and "addrs or sentinel" in doc["message"], doc
        code, doc = daemon.api("create", {"source": {"sentinel": {"addrs": g.addrs}},
                                          "target": {"addrs": src.addr}})
        assert code == 400 and "master_name: required" in doc["message"], doc
        dst = servers()
        daemon.ok("create", {"task_id": "nope", "target": {"addrs": dst.addr},
                             "source": {"sentinel": {"addrs": g.addrs,
                                                     "master_name": "other"}}})
        view = daemon.wait_state("nope", "Failed")
        assert "knows no master named 'other'" in view["reason"], view["reason"]
        code, doc = daemon.api("precheck", {"source": g.spec(), "target": {"addrs": dst.addr}})
        assert code == 200, doc
        checks = {c["name"]: c["status"] for c in doc["data"]["checks"]}
        assert checks["source.connection"] == "ok", doc


async def test_a_switch_master_announcement_is_followed_at_once(monkeypatch: Any) -> None:
    """A sentinel's +switch-master reaches the task's watcher the moment the failover is
    decided, without waiting for the once-a-second question (put out of the way here)."""
    monkeypatch.setattr(sentinel, "WATCH_EVERY", 3600.0)
    with sentinel_group() as group:
        ep = Endpoint(addrs=(("127.0.0.1", group.master.port),),
                      sentinel=Sentinel(addrs=(("127.0.0.1", group.port),),
                                        master_name=NAME))
        listen = asyncio.create_task(sentinel._listen(ep, "source"))
        await asyncio.sleep(0.5)            # subscribed
        failover = asyncio.create_task(asyncio.to_thread(group.failover))
        with pytest.raises(sentinel.MasterSwitched, match=r"announced \+switch-master"):
            await asyncio.wait_for(listen, 30)
        await failover
