"""Incremental CDC through the psync reader, end to end against real servers."""

from __future__ import annotations

import time
from typing import Any

import pytest

from .compare import wait_same
from .daemon import Daemon
from .load import Load
from .servers import RedisServer, wait_for

DBS = (0, 1, 2)


def spec(src: RedisServer, dst: RedisServer, **kw: Any) -> dict[str, Any]:
    out = {"source": {"addrs": src.addr}, "target": {"addrs": dst.addr},
           "migration_method": "incremental_migration", "reader": "psync"}
    out.update(kw)
    return out


def stats(server: RedisServer) -> dict[str, int]:
    info = server.client().info("stats")
    return {k: int(info[k]) for k in ("sync_full", "sync_partial_ok", "sync_partial_err")}


def converge(src: RedisServer, dst: RedisServer, daemon: Daemon, task_id: str,
             timeout: float = 60) -> None:
    """Wait until the task applied everything the source has, then compare every db."""
    def caught_up() -> bool:
        inc = daemon.task(task_id)["progress"].get("incremental") or {}
        off = int(src.client().info("replication")["master_repl_offset"])
        return bool(inc.get("applied_offset", -1) >= off - 200 and inc.get("lag_bytes", 1) < 200)
    wait_for(caught_up, timeout, 0.1, what="applied offset reaching the source's")
    for db in DBS:
        wait_same(src.client(db), dst.client(db), timeout=timeout,
                  ignore=[b"cdcd:checkpoint:" + task_id.encode()])


@pytest.mark.parametrize("flavour", ["redis7", "redis6", "valkey8"])
def test_incremental_converges_under_mixed_load(servers: Any, daemon: Daemon,
                                                flavour: str) -> None:
    src, dst = servers(flavour), servers(flavour)
    src.client().set("before", "snapshot", ex=3600)
    src.client(1).rpush("before:list", *range(1000))
    daemon.ok("create", spec(src, dst, task_id="inc"))
    with Load(src.client, dbs=DBS, max_ops=500_000) as load:
        daemon.wait_state("inc", "Running")
        wait_for(lambda: daemon.task("inc")["phase"] == "incremental", 30, what="stream phase")
        start = load.ops
        wait_for(lambda: load.ops > start + 3000, 30, what="load during the stream phase")
    converge(src, dst, daemon, "inc")
    view = daemon.task("inc")
    inc = view["progress"]["incremental"]
    assert inc["ops_applied"] > 0
    assert inc["lag_ms"] is not None and inc["lag_ms"] >= 0
    assert view["progress"]["snapshot"]["percent"] == 100.0


def test_sigkill_under_load_resumes_partially_without_duplicates(servers: Any,
                                                                 daemon_factory: Any) -> None:
    # The counter load writes megabytes per second: give the backlog room for the restarts.
    src, dst = servers(args=["--repl-backlog-size", "256mb"]), servers()
    daemon = daemon_factory()
    daemon.ok("create", spec(src, dst, task_id="k"))
    wait_for(lambda: daemon.task("k")["phase"] == "incremental", 30, what="stream phase")
    before = stats(src)
    with Load(src.client, dbs=(0,), kinds="counters", max_ops=2_000_000):
        for _ in range(3):
            wait_for(lambda: daemon.task("k")["progress"]["incremental"]["ops_applied"] > 0, 30)
            time.sleep(0.7)
            daemon.kill()
            time.sleep(0.3)
            daemon.start()
            daemon.wait_state("k", "Running")
    converge(src, dst, daemon, "k")
    after = stats(src)
    assert after["sync_full"] == before["sync_full"], (before, after)
    assert after["sync_partial_ok"] >= before["sync_partial_ok"] + 3, (before, after)
    s, d = src.client(), dst.client()
    for i in range(50):
        assert s.get(f"counter:{i}") == d.get(f"counter:{i}"), i


def test_pause_write_resume_is_partial_and_exact(servers: Any, daemon: Daemon) -> None:
    src, dst = servers(), servers()
    daemon.ok("create", spec(src, dst, task_id="p"))
    wait_for(lambda: daemon.task("p")["phase"] == "incremental", 30, what="stream phase")
    src.client().set("a", 1)
    converge(src, dst, daemon, "p")
    assert daemon.ok("pause", {"task_id": "p"})["state"] == "Paused"
    before = stats(src)
    for i in range(500):
        src.client().incr("paused:counter")
        src.client(2).hset("paused:h", str(i), i)
    assert dst.client().get("paused:counter") is None
    daemon.restart()
    assert daemon.task("p")["state"] == "Paused"
    assert daemon.ok("resume", {"task_id": "p"})["state"] == "Running"
    converge(src, dst, daemon, "p")
    after = stats(src)
    assert after["sync_full"] == before["sync_full"]
    assert after["sync_partial_ok"] == before["sync_partial_ok"] + 1
    assert dst.client().get("paused:counter") == b"500"


def test_client_kill_replica_repeatedly_stays_exact(servers: Any, daemon: Daemon) -> None:
    src, dst = servers(), servers()
    daemon.ok("create", spec(src, dst, task_id="ck"))
    wait_for(lambda: daemon.task("ck")["phase"] == "incremental", 30, what="stream phase")
    with Load(src.client, dbs=DBS, max_ops=500_000):
        for _ in range(5):
            time.sleep(0.4)
            src.client().client_kill_filter(_type="replica")
    converge(src, dst, daemon, "ck")
    view = daemon.task("ck")
    assert view["progress"]["retries"] >= 1
    assert view["state"] == "Running"


def test_backlog_overrun_triggers_reported_full_resync(servers: Any, daemon: Daemon) -> None:
    src = servers(args=["--repl-backlog-size", "16kb"])
    dst = servers()
    daemon.ok("create", spec(src, dst, task_id="b"))
    wait_for(lambda: daemon.task("b")["phase"] == "incremental", 30, what="stream phase")
    c = src.client()
    for i in range(50):
        c.set(f"old:{i}", i)
    converge(src, dst, daemon, "b")
    daemon.ok("pause", {"task_id": "b"})
    for i in range(2000):
        c.set(f"gap:{i}", "x" * 50)
    c.delete("gap:0", *[f"old:{i}" for i in range(25)])   # deletions the resync cannot see
    daemon.ok("resume", {"task_id": "b"})
    converge(src, dst, daemon, "b")
    view = daemon.task("b")
    assert view["progress"]["full_resyncs"] == 1
    assert "full resync" in view["reason"]
    assert dst.client().exists(*[f"old:{i}" for i in range(25)]) == 0


def test_manual_mode_fails_then_resumes_from_checkpoint(servers: Any, daemon: Daemon) -> None:
    src, dst = servers(), servers()
    daemon.ok("create", spec(src, dst, task_id="m", resume_mode="manual"))
    wait_for(lambda: daemon.task("m")["phase"] == "incremental", 30, what="stream phase")
    src.client().set("x", 1)
    converge(src, dst, daemon, "m")
    before = stats(src)
    src.client().client_kill_filter(_type="replica")
    failed = daemon.wait_state("m", "Failed")
    assert "source" in failed["reason"]
    src.client().set("y", 2)
    daemon.ok("resume", {"task_id": "m"})
    converge(src, dst, daemon, "m")
    assert stats(src)["sync_full"] == before["sync_full"]


def test_scan_reader_follows_keyspace_notifications(servers: Any, daemon: Daemon) -> None:
    src = servers(args=["--notify-keyspace-events", "KA"])
    dst = servers()
    src.client().set("before", 1)
    daemon.ok("create", spec(src, dst, task_id="n", reader="scan"))
    wait_for(lambda: daemon.task("n")["phase"] == "incremental", 30, what="stream phase")
    c = src.client()
    c.set("after", 2, px=600_000)
    c.hset("h", mapping={"a": 1, "b": 2})
    c.delete("before")
    c.rpush("l", *range(100))
    src.client(1).incr("counter")
    for db in DBS:
        wait_same(src.client(db), dst.client(db), timeout=30)
    view = daemon.task("n")
    assert view["state"] == "Running"
    assert "best effort" in view["reason"]
    assert view["progress"]["reader"] == "scan"


def test_scan_reader_without_notifications_fails_clearly(servers: Any, daemon: Daemon) -> None:
    src, dst = servers(), servers()
    daemon.ok("create", spec(src, dst, task_id="nn", reader="scan"))
    failed = daemon.wait_state("nn", "Failed")
    assert "notify-keyspace-events" in failed["reason"]


def test_auto_reader_falls_back_to_scan_when_psync_is_refused(servers: Any,
                                                              daemon: Daemon) -> None:
    src = servers(password="pw")
    src.client().execute_command("ACL", "SETUSER", "nopsync", "on", ">pw2", "~*", "&*", "+@all",
                                 "-psync", "-sync")
    dst = servers()
    src.client().set("k", "v")
    daemon.ok("create", {"task_id": "fb", "source": {"addrs": src.addr, "username": "nopsync",
                                                     "password": "pw2"},
                         "target": {"addrs": dst.addr}})
    view = daemon.wait_state("fb", "Succeeded")
    assert view["progress"]["reader"] == "scan"
    assert "fell back to scan" in view["reason"]
    assert dst.client().get("k") == b"v"


def test_lag_is_measured_by_heartbeats_that_leave_nothing_behind(servers: Any,
                                                                 daemon: Daemon) -> None:
    src, dst = servers(), servers()
    src.client().set("k", 1)
    daemon.ok("create", spec(src, dst, task_id="hb"))
    wait_for(lambda: daemon.task("hb")["phase"] == "incremental", 30, what="stream phase")
    # A heartbeat goes out every second; once one came back through the target, lag_ms
    # is a measurement (small on an idle loopback link).
    lag = wait_for(lambda: daemon.task("hb")["progress"]["incremental"]["lag_ms"], 15,
                   what="a measured lag")
    assert 0 < lag < 1000
    info = src.client().info("stats")
    assert int(info["pubsub_channels"]) == 0
    assert src.client().dbsize() == 1
    # the marker lives in a db the task does not write: db 0 holds exactly the source's
    assert set(dst.client().keys()) == {b"k"}
    assert dst.client(15).keys() == [b"cdcd:checkpoint:hb"]


def test_command_size_matches_resp_encoding() -> None:
    import random

    from cdcd.readers.psync import command_size
    from cdcd.resp import encode

    rng = random.Random(1)
    for _ in range(5000):
        args = [rng.randbytes(rng.choice([0, 1, 9, 10, 99, 100, 999, 1000, 123_456]))
                for _ in range(rng.randint(1, 14))]
        assert command_size(args) == len(encode(args))


def test_scripts_replicated_verbatim_by_an_older_source(servers: Any, daemon: Daemon) -> None:
    # Redis 6.2 can still replicate scripts as EVAL/EVALSHA instead of their effects.
    src = servers("redis6", args=["--lua-replicate-commands", "no"])
    dst = servers("redis6")
    daemon.ok("create", spec(src, dst, task_id="lua"))
    wait_for(lambda: daemon.task("lua")["phase"] == "incremental", 30, what="stream phase")
    c = src.client()
    script = "redis.call('INCRBY', KEYS[1], ARGV[1]); return redis.call('RPUSH', KEYS[2], ARGV[1])"
    sha = c.script_load(script)
    for i in range(20):
        c.eval(script, 2, "lua:n", "lua:l", i)
        c.evalsha(sha, 2, "lua:n", "lua:l", i)
    converge(src, dst, daemon, "lua")
    assert dst.client().get("lua:n") == str(2 * sum(range(20))).encode()
    # The scripts reached the target as scripts (EVALSHA sent as EVAL with its body).
    stats = dst.client().info("commandstats")
    assert stats["cmdstat_eval"]["calls"] >= 40, stats.get("cmdstat_eval")


def test_command_the_target_rejects_fails_the_task_naming_it(servers: Any,
                                                            daemon: Daemon) -> None:
    src, dst = servers(), servers()
    daemon.ok("create", spec(src, dst, task_id="rej"))
    wait_for(lambda: daemon.task("rej")["phase"] == "incremental", 30, what="stream phase")
    src.client().set("cnt", 1)
    wait_for(lambda: dst.client().get("cnt") == b"1", 10, what="cnt on the target")
    dst.client().delete("cnt")
    dst.client().rpush("cnt", "diverged")         # someone wrote to the target directly
    src.client().incr("cnt")
    failed = daemon.wait_state("rej", "Failed")
    assert "'cnt'" in failed["reason"] and "WRONGTYPE" in failed["reason"]


def test_stream_honours_filter_and_db_mapping(servers: Any, daemon: Daemon) -> None:
    src, dst = servers(), servers()
    daemon.ok("create", spec(src, dst, task_id="f", filter={
        "dbs": [0, 1], "include_prefixes": ["keep:"], "exclude_prefixes": ["keep:tmp:"]},
        db_mapping={"1": 3}))
    wait_for(lambda: daemon.task("f")["phase"] == "incremental", 30, what="stream phase")
    s0, s1, s2 = src.client(0), src.client(1), src.client(2)
    s0.mset({"keep:a": 1, "drop:a": 1, "keep:tmp:x": 1})
    s0.set("keep:b", 2)
    s0.delete("keep:b", "drop:a")
    s0.incr("keep:n")
    s1.rpush("keep:l", 1, 2, 3)
    s1.set("drop:b", 1)
    s2.set("keep:other-db", 1)
    with s0.pipeline(transaction=True) as p:
        p.incr("keep:n")
        p.set("drop:c", 1)
        p.execute()
    s0.set("keep:last", 1)
    d0, d3 = dst.client(0), dst.client(3)
    wait_for(lambda: d0.get("keep:last") == b"1", 15, what="the last write")
    assert set(d0.keys()) == {b"keep:a", b"keep:n", b"keep:last"}
    # dbs 0 and 3 are written: the marker goes to the highest db the task never writes
    assert daemon.task("f")["markers"] == ["db 15: cdcd:checkpoint:f"]
    assert d0.get("keep:n") == b"2"
    assert set(d3.keys()) == {b"keep:l"} and d3.lrange("keep:l", 0, -1) == [b"1", b"2", b"3"]
    assert dst.client(1).dbsize() == 0 and dst.client(2).dbsize() == 0


def test_wait_on_the_source_counts_cdcd_once_the_target_has_the_write(servers: Any,
                                                                     daemon: Daemon) -> None:
    # WAIT makes the source send REPLCONF GETACK; cdcd answers with the offset the target
    # has acknowledged, so WAIT returning 1 means the write is on the target.
    src, dst = servers(), servers()
    daemon.ok("create", spec(src, dst, task_id="w"))
    wait_for(lambda: daemon.task("w")["phase"] == "incremental", 30, what="stream phase")
    c = src.client()
    started = time.monotonic()
    for i in range(5):
        c.set(f"w:{i}", i)
        assert c.execute_command("WAIT", 1, 5000) == 1
        assert dst.client().get(f"w:{i}") == str(i).encode()
    # Answered as soon as the target acknowledges, not at the next once-a-second ACK.
    assert time.monotonic() - started < 2.5
