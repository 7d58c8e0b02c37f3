"""The fault suite: targets that restart empty or roll back, daemon crashes during the
first snapshot and during a big-key rebuild, a restarting source, an evicting target, and
the operator's recovery levers (resync, continuous_verify). Every scenario ends with a
key-by-key comparison (counters and lists are the sharpest test of exactly-once) and a
look at what the task view said."""

from __future__ import annotations

import os
import urllib.request
from typing import Any

from .compare import assert_same, fill_bulk
from .daemon import Daemon
from .load import Load
from .servers import RedisServer, wait_for
from .test_incremental import converge, spec, stats


def progress(daemon: Daemon, task_id: str) -> dict[str, Any]:
    return dict(daemon.task(task_id)["progress"])


def metrics_text(daemon: Daemon) -> str:
    with urllib.request.urlopen(daemon.url + "/metrics", timeout=10) as r:
        return str(r.read().decode())


def streaming(daemon: Daemon, task_id: str, timeout: float = 30) -> None:
    wait_for(lambda: daemon.task(task_id)["phase"] == "incremental", timeout,
             what="stream phase")


def marker(daemon: Daemon, task_id: str, dst: RedisServer) -> bytes | None:
    """The task's marker value, read in the db the task view names for it."""
    where, _, key = daemon.task(task_id)["markers"][0].partition(": ")
    return dst.client(int(where.split()[1])).get(key)


def fill_random(c: Any, n: int, size: int) -> None:
    """n string keys k:<i> of ``size`` random bytes: nothing compresses, so a bandwidth
    limit slows the copy down predictably."""
    pipe = c.pipeline(transaction=False)
    for i in range(0, n, 500):
        pipe.mset({b"k:%d" % j: os.urandom(size) for j in range(i, min(n, i + 500))})
    pipe.execute()


def no_cdcd_tmp_keys(server: RedisServer, dbs: tuple[int, ...] = (0,)) -> None:
    for db in dbs:
        assert list(server.client(db).scan_iter(match="cdcd:tmp:*")) == [], db


# --- the target loses data ------------------------------------------------------------------

def test_target_restarting_empty_gets_a_full_resync(servers: Any, daemon: Daemon) -> None:
    src, dst = servers(args=["--repl-backlog-size", "64mb"]), servers()
    src.client().rpush("before:list", *range(500))
    daemon.ok("create", spec(src, dst, task_id="empty"))
    streaming(daemon, "empty")
    with Load(src.client, dbs=(0, 1, 2), max_ops=300_000, seed=11) as load:
        wait_for(lambda: load.ops > 3000, 30, what="load")
        dst.kill()           # no persistence: it comes back empty
        dst.start()
        wait_for(lambda: progress(daemon, "empty")["target_resets"] >= 1, 60,
                 what="the task noticing the empty target")
        start = load.ops
        wait_for(lambda: load.ops > start + 2000, 30, what="load after the restart")
    converge(src, dst, daemon, "empty")
    view = daemon.task("empty")
    assert view["state"] == "Running"
    assert view["progress"]["full_resyncs"] >= 1
    assert "no longer holds the checkpoint marker" in view["reason"], view["reason"]
    assert not view["reason"].startswith("retrying")


def test_target_rolled_back_to_an_older_snapshot_resumes_from_its_marker(
        servers: Any, daemon: Daemon) -> None:
    src, dst = servers(args=["--repl-backlog-size", "256mb"]), servers()
    daemon.ok("create", spec(src, dst, task_id="rb"))
    streaming(daemon, "rb")
    with Load(src.client, dbs=(0,), kinds="counters+lists", max_ops=2_000_000) as load:
        wait_for(lambda: load.ops > 5000, 30, what="load")
        dst.client().save()                        # the snapshot it will go back to
        saved = int((marker(daemon, "rb", dst) or b"? 0").split()[1])
        wait_for(lambda: progress(daemon, "rb")["incremental"]["applied_offset"]
                 > saved + 100_000, 30, what="the stream going past the snapshot")
        before = stats(src)
        dst.kill()
        dst.start()                                # loads the older dump.rdb
        wait_for(lambda: progress(daemon, "rb")["target_resets"] >= 1, 60,
                 what="the task noticing the rollback")
        start = load.ops
        wait_for(lambda: load.ops > start + 2000, 30, what="load after the restart")
    converge(src, dst, daemon, "rb")
    view = daemon.task("rb")
    assert "went back to offset" in view["reason"], view["reason"]
    after = stats(src)
    assert after["sync_full"] == before["sync_full"], "a rollback within the backlog " \
        "must resume partially"
    assert view["progress"]["full_resyncs"] == 0


# --- daemon crashes during the first snapshot -----------------------------------------------

def _crash_during_first_snapshot(servers: Any, daemon: Daemon, **kw: Any) -> tuple[Any, Any]:
    src, dst = servers(), servers()
    fill_random(src.client(), 6000, 1000)       # ~6 MB at 2 MB/s: ~3 s
    src.client().rpush("list", *range(100))
    task = {"task_id": "first", "bandwidth_limit_mb": 2, **kw}
    daemon.ok("create", {**spec(src, dst, reader="psync"), **task})
    wait_for(lambda: progress(daemon, "first")["snapshot"]["keys_done"] > 500, 30,
             what="part of the snapshot on the target")
    view = daemon.task("first")
    snap = view["progress"]["snapshot"]
    # truthful progress during a psync snapshot: the total is known, the ETA too
    assert snap["keys_total"] >= 6000 and snap["percent"] < 99 and snap["eta_s"] is not None
    daemon.kill()
    assert dst.client().dbsize() > 0
    # the source changes while the daemon is down: deletions, updates, a counter
    c = src.client()
    c.delete(*[b"k:%d" % i for i in range(0, 6000, 7)])
    c.set(b"k:1", b"changed")
    c.rpush("list", "after")
    daemon.start()
    return src, dst


def test_kill_during_first_snapshot_existing_keys_fail(servers: Any, daemon: Daemon) -> None:
    src, dst = _crash_during_first_snapshot(servers, daemon, existing_keys="fail",
                                            migration_method="full_amount_migration")
    view = daemon.wait_state("first", "Succeeded", timeout=90)
    assert_same(src.client(), dst.client())
    assert view["progress"]["full_resyncs"] == 1
    assert "interrupted" in view["reason"], view["reason"]


def test_kill_during_first_snapshot_existing_keys_skip(servers: Any, daemon: Daemon) -> None:
    src, dst = _crash_during_first_snapshot(servers, daemon, existing_keys="skip",
                                            migration_method="incremental_migration")
    streaming(daemon, "first", timeout=90)
    src.client().incr("counter")
    converge(src, dst, daemon, "first")
    assert dst.client().get(b"k:1") == b"changed"


def test_kill_during_big_key_rebuild(servers: Any, daemon: Daemon) -> None:
    src, dst = servers(), servers()
    c = src.client()
    # a 12 MB list (over the 8 MiB big-value threshold) copied at 3 MB/s: ~4 s
    for i in range(0, 120_000, 10_000):
        c.rpush("big", *[os.urandom(100) for j in range(i, i + 10_000)])
    c.set("small", "x")
    daemon.ok("create", {**spec(src, dst, reader="psync", task_id="big",
                                migration_method="full_amount_migration"),
                         "bandwidth_limit_mb": 3})
    wait_for(lambda: any(dst.client().scan_iter(match="cdcd:tmp:*")), 30,
             what="the big key being rebuilt in its temporary key")
    daemon.kill()
    c.rpush("big", "tail")
    daemon.start()
    daemon.wait_state("big", "Succeeded", timeout=90)
    assert_same(src.client(), dst.client())
    no_cdcd_tmp_keys(dst)


# --- the source restarts ----------------------------------------------------------------------

def test_source_restart_resets_offsets_and_lag(servers: Any, daemon: Daemon) -> None:
    src, dst = servers(), servers()
    daemon.ok("create", spec(src, dst, task_id="srcrestart"))
    streaming(daemon, "srcrestart")
    fill_bulk(src.client(), 20_000, value_size=100)    # move the offset well past 1 MB
    wait_for(lambda: progress(daemon, "srcrestart")["incremental"]["lag_bytes"] < 100, 30)
    src.kill()
    src.start()                                        # empty, new replication id
    src.client().set("after", "restart")
    wait_for(lambda: dst.client().get("after") == b"restart", 60, what="the copy resuming")
    inc = progress(daemon, "srcrestart")["incremental"]
    assert inc["lag_bytes"] < 10_000, inc
    # 'after' may come in the new RDB, before the resync's stale-key cleanup has finished
    wait_for(lambda: dst.client().dbsize() == 1, 30, what="the old keys being removed")
    assert dst.client().keys() == [b"after"]


# --- the target evicts ------------------------------------------------------------------------

def test_evicting_target_is_reported_and_can_fail_the_task(servers: Any,
                                                           daemon: Daemon) -> None:
    src = servers()
    # room for a few queued transactions of the stream (MB each), not for the data
    warn = servers(args=["--maxmemory", "16mb", "--maxmemory-policy", "allkeys-lru"])
    fail = servers(args=["--maxmemory", "16mb", "--maxmemory-policy", "allkeys-lru"])
    daemon.ok("create", spec(src, warn, task_id="warn"))
    daemon.ok("create", spec(src, fail, task_id="fail", on_target_eviction="fail"))
    streaming(daemon, "warn")
    streaming(daemon, "fail")
    c = src.client()
    for i in range(0, 30_000, 100):                    # 30 MB into 16 MB
        pipe = c.pipeline(transaction=False)
        for j in range(i, i + 100):
            pipe.set(b"k:%d" % j, os.urandom(1000))
        pipe.execute()
    wait_for(lambda: progress(daemon, "warn")["target_eviction"]["evicted_keys"] > 0, 30,
             what="evictions reported")
    view = daemon.wait_state("fail", "Failed", timeout=30)
    assert "evicted" in view["reason"] and "allkeys-lru" in view["reason"], view["reason"]
    warned = daemon.task("warn")
    assert warned["state"] == "Running"
    assert warned["progress"]["target_eviction"]["maxmemory_policy"] == "allkeys-lru"
    assert "evicted" in warned["progress"]["last_error"]
    assert 'cdcd_target_evicted_keys_total{task_id="warn"}' in metrics_text(daemon)


# --- the operator's levers --------------------------------------------------------------------

def test_resync_redoes_the_snapshot_and_removes_stale_keys(servers: Any,
                                                           daemon: Daemon) -> None:
    src, dst = servers(), servers()
    fill_bulk(src.client(), 2000)
    src.client().rpush("list", *range(50))
    daemon.ok("create", spec(src, dst, task_id="rs"))
    streaming(daemon, "rs")
    # the target drifts behind cdcd's back
    d = dst.client()
    d.delete(b"k:1", b"k:2")
    d.set(b"k:3", b"wrong")
    d.set(b"extra", b"only on the target")
    before = progress(daemon, "rs")["full_resyncs"]
    assert daemon.ok("resync", {"task_id": "rs"})["state"] == "Running"
    wait_for(lambda: progress(daemon, "rs")["full_resyncs"] == before + 1, 30,
             what="the resync counted")
    streaming(daemon, "rs")
    src.client().incr("counter")
    converge(src, dst, daemon, "rs")
    assert d.get(b"extra") is None
    view = daemon.task("rs")
    assert "requested" in view["reason"], view["reason"]
    code, doc = daemon.api("resync", {"task_id": "nope"})
    assert code == 404, doc


def test_resync_of_a_succeeded_scan_task(servers: Any, daemon: Daemon) -> None:
    src, dst = servers(), servers()
    fill_bulk(src.client(), 1000)
    daemon.ok("create", spec(src, dst, task_id="scan", reader="scan",
                             migration_method="full_amount_migration"))
    daemon.wait_state("scan", "Succeeded")
    src.client().delete(b"k:5")
    src.client().set(b"k:6", b"new")
    dst.client().set(b"stray", b"x")
    daemon.ok("resync", {"task_id": "scan"})
    wait_for(lambda: daemon.task("scan")["progress"]["full_resyncs"] == 1, 30)
    daemon.wait_state("scan", "Succeeded")
    assert_same(src.client(), dst.client())


def test_continuous_verify_reports_drift(servers: Any, daemon: Daemon) -> None:
    src, dst = servers(), servers()
    fill_bulk(src.client(), 50)
    daemon.ok("create", spec(src, dst, task_id="cv",
                             continuous_verify={"sample": 50, "every_s": 10}))
    streaming(daemon, "cv")
    dst.client().set(b"k:7", b"drifted")
    dst.client().delete(b"k:8")
    def drift() -> Any:
        cv = progress(daemon, "cv")["continuous_verify"]
        return cv if cv["runs"] >= 1 else None
    cv = wait_for(drift, 40, 0.5, what="a continuous_verify round")
    assert cv["drift"] == 2, cv
    assert cv["sampled"] == 50
    assert 'cdcd_verify_drift_keys{task_id="cv"} 2.0' in metrics_text(daemon)


def test_view_says_the_task_waits_for_the_sources_delayed_rdb(servers: Any,
                                                               daemon: Daemon) -> None:
    src, dst = servers(args=["--repl-diskless-sync", "yes",
                             "--repl-diskless-sync-delay", "4"]), servers()
    fill_bulk(src.client(), 100)
    daemon.ok("create", spec(src, dst, task_id="wait"))
    view = wait_for(lambda: (v := daemon.task("wait"))["progress"]["status"].startswith(
        "waiting for the source to answer PSYNC") and v, 10, what="the waiting status")
    assert view["phase"] == "snapshot", view
    streaming(daemon, "wait")
    assert daemon.task("wait")["progress"]["status"] == "streaming"


def test_target_restarting_empty_during_a_scan_snapshot_starts_it_over(
        servers: Any, daemon: Daemon) -> None:
    src, dst = servers(), servers()
    fill_random(src.client(), 6000, 1000)               # ~6 MB at 2 MB/s: ~3 s
    daemon.ok("create", {**spec(src, dst, reader="scan", task_id="scan",
                                migration_method="full_amount_migration"),
                         "bandwidth_limit_mb": 2})
    wait_for(lambda: progress(daemon, "scan")["snapshot"]["keys_done"] > 1000, 30,
             what="part of the snapshot on the target")
    dst.kill()
    dst.start()                                         # empty, a new run_id
    view = daemon.wait_state("scan", "Succeeded", timeout=90)
    assert_same(src.client(), dst.client())
    assert view["progress"]["target_resets"] == 1
    assert "restarted during the snapshot" in view["reason"], view["reason"]


def test_delete_with_purge_markers_removes_the_marker(servers: Any, daemon: Daemon) -> None:
    src, dst = servers(), servers()
    src.client().set("k", "v")
    daemon.ok("create", spec(src, dst, task_id="purge"))
    streaming(daemon, "purge")
    assert daemon.task("purge")["markers"] == ["db 15: cdcd:checkpoint:purge"]
    wait_for(lambda: marker(daemon, "purge", dst), 10)
    # an unreachable target: 502, nothing deleted, the task goes on
    dst.stop()
    code, doc = daemon.api("delete", {"task_id": "purge", "purge_markers": True})
    assert code == 502 and "not deleted" in doc["message"], doc
    assert daemon.task("purge")["state"] == "Running"
    dst.start()
    wait_for(lambda: daemon.task("purge")["phase"] == "incremental"
             and marker(daemon, "purge", dst), 60, what="the task resuming")
    assert daemon.ok("delete", {"task_id": "purge", "purge_markers": True}) == \
        {"task_id": "purge"}
    assert dst.client().keys("*") == [b"k"] and dst.client(15).dbsize() == 0
