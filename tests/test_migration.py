"""full_amount_migration through the SCAN reader, against real servers of every flavour.

Each test copies a dataset with the real daemon and compares the target with the source
key by key (type, value, TTL), and checks the source was never written to.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import redis

from .compare import assert_same, fill_bulk, fill_mixed, write_commands
from .daemon import Daemon, spec
from .servers import FLAVOURS, RedisServer, wait_for

Servers = Callable[..., RedisServer]


@pytest.fixture(params=FLAVOURS)
def flavour(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def dirty(c: "redis.Redis[bytes]") -> int:
    return int(c.info("persistence")["rdb_changes_since_last_save"])


class SourceGuard:
    """Prove a task never wrote to its source: no write command ran, nothing got dirty."""

    def __init__(self, server: RedisServer) -> None:
        self.c = server.client()
        self.writes = write_commands(self.c)
        self.dirty = dirty(self.c)

    def check(self) -> None:
        assert write_commands(self.c) == self.writes
        assert dirty(self.c) == self.dirty


def wait_progress(daemon: Daemon, tid: str, at_least: int = 1, timeout: float = 30
                  ) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        t = daemon.task(tid)
        assert t["state"] != "Failed", t["reason"]
        return t if t["progress"]["snapshot"]["keys_done"] >= at_least else None
    return dict(wait_for(ready, timeout, 0.05, what=f"{tid} to copy {at_least} keys"))


def kill_clients(server: RedisServer) -> int:
    """Drop every client connection of a server except the one asking."""
    c = server.client()
    me = c.client_id()
    n = 0
    for info in c.client_list():
        if int(info["id"]) != me and info.get("flags", "") in ("N", ""):
            n += int(c.client_kill_filter(_id=info["id"]) or 0)
    return n


def encodings(c: "redis.Redis[bytes]", keys: list[bytes]) -> dict[bytes, bytes]:
    return {k: c.object("encoding", k) for k in keys}


def test_full_copy_every_type_encoding_and_db(flavour: str, daemon: Daemon,
                                              servers: Servers) -> None:
    src = servers(flavour, password="src-pw")
    dst = servers(flavour)
    dst.client().acl_setuser("cdcd", enabled=True, passwords=["+dst-pw"], keys=["*"],
                             commands=["+@all"])
    fill_mixed(src.client(0), big=True)
    fill_mixed(src.client(1), big=False, tag=b"@db1")
    fill_mixed(src.client(2), big=False, tag=b"@db2")
    src.client(2).set(b"only-in-db2", b"x")
    counts = {db: src.client(db).dbsize() for db in range(3)}
    guard = SourceGuard(src)

    data = spec(src, dst)
    data["target"].update(username="cdcd", password="dst-pw")
    tid = daemon.create(data)
    t = daemon.wait_state(tid, "Succeeded", timeout=120)

    assert t["phase"] == "done" and t["reason"] == ""
    snap = t["progress"]["snapshot"]
    assert snap["keys_total"] == sum(counts.values())
    assert snap["keys_done"] == sum(counts.values())
    assert snap["percent"] == 100.0
    assert snap["bytes"] > 5 << 20  # the 5 MB string alone
    for db in range(3):
        assert_same(src.client(db), dst.client(db))
    assert set(dst.client().info("keyspace")) == {"db0", "db1", "db2"}
    # same encodings on both sides (RESTORE keeps small and large representations)
    probe = [b"str:int", b"str:raw", b"hash:small", b"hash:large", b"hash:100k", b"list:small",
             b"list:large", b"set:intset", b"set:small", b"set:large", b"zset:small",
             b"zset:large", b"stream:s"]
    enc = encodings(src.client(), probe)
    assert enc[b"hash:large"] == b"hashtable" and enc[b"zset:large"] == b"skiplist"
    assert enc[b"set:intset"] == b"intset" and enc[b"hash:small"] in (b"listpack", b"ziplist")
    assert encodings(dst.client(), probe) == enc
    # expiry is absolute: the target's deadline is the source's, not a restarted one
    for key in (b"ttl:str", b"ttl:hash", b"ttl:list"):
        s_ttl = src.client().pttl(key)
        d_ttl = dst.client().pttl(key)
        assert 0 < d_ttl <= s_ttl + 5, (key, s_ttl, d_ttl)
        assert s_ttl - d_ttl < 1000, (key, s_ttl, d_ttl)
    assert dst.client().pttl(b"str:int") == -1
    guard.check()


def test_keys_expiring_during_copy_are_not_resurrected(flavour: str, daemon: Daemon,
                                                       servers: Servers) -> None:
    src, dst = servers(flavour), servers(flavour)
    c = src.client()
    fill_bulk(c, 12_000, value_size=200)  # ~3 MB to write: ~3 s at 1 MB/s
    base = int(time.time() * 1000)
    deadlines: dict[bytes, int] = {}
    p = c.pipeline(transaction=False)
    for i in range(3000):
        key = b"vol:%d" % i
        deadlines[key] = base + 300 + i  # 0.3 s .. 3.3 s from now, spread over the copy
        p.set(key, b"v" * 100, pxat=deadlines[key])
    for i in range(300):
        key = b"long:%d" % i
        deadlines[key] = base + 60_000 + i
        p.set(key, b"l", pxat=deadlines[key])
    p.execute()
    tid = daemon.create(spec(src, dst, bandwidth_limit_mb=1))
    daemon.wait_state(tid, "Succeeded", timeout=60)

    d = dst.client()
    keys = list(deadlines)
    p = d.pipeline(transaction=False)
    for k in keys:
        p.pttl(k)
    now = int(time.time() * 1000)
    ttls = p.execute()
    copied = 0
    for k, ttl in zip(keys, ttls):
        assert ttl != -1, f"{k!r} lost its TTL on the target"
        if ttl >= 0:
            copied += 1
            # never later than the source's deadline (small slack for the clock read)
            assert now + ttl <= deadlines[k] + 50, (k, now + ttl, deadlines[k])
    assert copied >= 300  # the long-lived ones at least
    # once every short deadline has passed, none of them exists on the target
    wait_for(lambda: c.exists(*[k for k in keys if k.startswith(b"vol:")]) == 0, 30,
             what="source keys to expire")
    assert d.exists(*[k for k in keys if k.startswith(b"vol:")]) == 0
    assert not list(d.scan_iter(match=b"vol:*", count=1000))
    assert_same(c, d)


def test_filter_dbs_and_prefixes(flavour: str, daemon: Daemon, servers: Servers) -> None:
    src, dst, dst2 = servers(flavour), servers(flavour), servers(flavour)
    names = [b"user:1", b"user:2", b"user:tmp:1", b"user:tmp:2", b"order:1", b"users",
             b"we*ird[:1", b"weXird[:1", b"we*ird]:1", b"\xffuser:1", b"user:\x00bin"]
    for db in range(3):
        c = src.client(db)
        for n in names:
            c.set(n, b"%s@%d" % (n, db))
        c.hset(b"user:h", mapping={b"db": db})
    guard = SourceGuard(src)
    tid = daemon.create(spec(src, dst, filter={
        "dbs": [0, 2], "include_prefixes": ["user:", "we*ird["],
        "exclude_prefixes": ["user:tmp:"]}))
    daemon.wait_state(tid, "Succeeded")
    want = {b"user:1", b"user:2", b"user:h", b"user:\x00bin", b"we*ird[:1"}
    for db in (0, 2):
        assert set(dst.client(db).scan_iter()) == want, db
        assert_same(src.client(db), dst.client(db), keys=want)
    assert dst.client(1).dbsize() == 0
    # one include prefix goes to the server as a SCAN MATCH: glob characters are literal
    tid2 = daemon.create(spec(src, dst2, filter={"include_prefixes": ["we*ird["]}))
    daemon.wait_state(tid2, "Succeeded")
    for db in range(3):
        assert set(dst2.client(db).scan_iter()) == {b"we*ird[:1"}, db
    # an exclude-only filter; an empty dbs list is refused (it would copy nothing)
    dst.client().flushall()
    tid3 = daemon.create(spec(src, dst, filter={"exclude_prefixes": ["user:", "w"]}))
    daemon.wait_state(tid3, "Succeeded")
    for db in range(3):
        assert set(dst.client(db).scan_iter()) == {b"order:1", b"users", b"\xffuser:1"}, db
    code, doc = daemon.api("create", spec(src, dst, filter={"dbs": []}))
    assert code == 400 and "filter.dbs" in doc["message"], doc
    guard.check()


def test_db_mapping(flavour: str, daemon: Daemon, servers: Servers) -> None:
    src, dst, dst2 = servers(flavour), servers(flavour), servers(flavour)
    for db in range(3):
        fill_mixed(src.client(db), big=False, tag=b"@%d" % db)
    tid = daemon.create(spec(src, dst, db_mapping={"1": 5, "2": 9}))
    daemon.wait_state(tid, "Succeeded")
    assert_same(src.client(0), dst.client(0))
    assert_same(src.client(1), dst.client(5))
    assert_same(src.client(2), dst.client(9))
    assert set(dst.client().info("keyspace")) == {"db0", "db5", "db9"}
    # a filtered db mapped onto db 0
    tid = daemon.create(spec(src, dst2, filter={"dbs": [2]}, db_mapping={"2": 0, "1": 3}))
    daemon.wait_state(tid, "Succeeded")
    assert_same(src.client(2), dst2.client(0))
    assert set(dst2.client().info("keyspace")) == {"db0"}


def test_existing_keys_replace_skip_fail(flavour: str, daemon: Daemon,
                                         servers: Servers) -> None:
    src = servers(flavour)
    s = src.client()
    s.set(b"k:1", b"source")
    s.hset(b"h", mapping={b"f": b"source"})
    s.set(b"k:2", b"source2", px=600_000)
    s.set(b"k:3", b"source3")

    def target() -> RedisServer:
        t = servers(flavour)
        c = t.client()
        c.set(b"k:1", b"target")
        c.rpush(b"h", b"target-list")  # same key, other type
        c.set(b"only-target", b"keep me")
        return t

    # replace (the default): the source's values win, other target keys stay
    dst = target()
    tid = daemon.create(spec(src, dst))
    daemon.wait_state(tid, "Succeeded")
    assert_same(s, dst.client(), keys=[b"k:1", b"h", b"k:2", b"k:3"])
    assert dst.client().get(b"only-target") == b"keep me"

    # skip: keys the target holds keep their value
    dst = target()
    tid = daemon.create(spec(src, dst, existing_keys="skip"))
    t = daemon.wait_state(tid, "Succeeded")
    c = dst.client()
    assert c.get(b"k:1") == b"target" and c.lrange(b"h", 0, -1) == [b"target-list"]
    assert c.get(b"only-target") == b"keep me"
    assert_same(s, c, keys=[b"k:2", b"k:3"])
    assert t["progress"]["snapshot"]["keys_skipped"] == 2

    # fail: the precheck refuses a target that holds keys in a db the task writes
    dst = target()
    tid = daemon.create(spec(src, dst, existing_keys="fail"))
    t = daemon.wait_state(tid, "Failed")
    assert dst.addr in t["reason"] and "db 0" in t["reason"], t["reason"]
    assert dst.client().get(b"k:1") == b"target" and dst.client().dbsize() == 3
    # ... but not one whose keys are in dbs the task does not write
    dst = servers(flavour)
    dst.client(4).set(b"elsewhere", b"1")
    tid = daemon.create(spec(src, dst, existing_keys="fail", filter={"dbs": [0]}))
    daemon.wait_state(tid, "Succeeded")
    assert_same(s, dst.client())
    # ... nor one that mapping sends elsewhere
    dst = servers(flavour)
    dst.client(0).set(b"other", b"1")
    tid = daemon.create(spec(src, dst, existing_keys="fail", db_mapping={"0": 1}))
    daemon.wait_state(tid, "Succeeded")
    assert_same(s, dst.client(1))


def test_empty_source(daemon: Daemon, servers: Servers) -> None:
    src, dst = servers(), servers()
    tid = daemon.create(spec(src, dst))
    t = daemon.wait_state(tid, "Succeeded")
    snap = t["progress"]["snapshot"]
    assert snap["keys_total"] == 0 and snap["keys_done"] == 0 and snap["percent"] == 100.0
    assert dst.client().dbsize() == 0


def test_failures_name_the_server_and_cause(daemon: Daemon, servers: Servers) -> None:
    src = servers(password="right")
    src.client().set(b"k", b"v")
    fill_bulk(src.client(), 2000)
    dst = servers()
    dst.client().acl_setuser("norestore", enabled=True, passwords=["+pw"], keys=["*"],
                             commands=["+@all", "-restore"])
    dead = "127.0.0.1:1"  # a privileged port nobody listens on
    good_dst = servers()
    cases: dict[str, tuple[dict[str, Any], list[str]]] = {}

    d = spec(dead, dst)
    cases["src-down"] = (d, ["source", dead])
    d = spec(src, dead)
    cases["dst-down"] = (d, ["target", dead])
    d = spec(src, dst)
    d["source"]["password"] = "wrong"
    cases["src-wrong-pw"] = (d, ["source", src.addr, "auth"])
    d = spec(src, dst)
    del d["source"]["password"]
    cases["src-no-pw"] = (d, ["source", src.addr, "NOAUTH"])
    d = spec(src, dst)
    d["target"].update(username="norestore", password="nope")
    cases["dst-wrong-pw"] = (d, ["target", dst.addr])
    d = spec(src, dst, resume_mode="auto")
    d["target"].update(username="norestore", password="pw")
    cases["dst-no-restore"] = (d, ["target", dst.addr, "RESTORE"])

    src.client().acl_setuser("nodump", enabled=True, passwords=["+pw"], keys=["*"],
                             commands=["+@all", "-dump"])
    d = spec(src, dst, resume_mode="auto")
    d["source"].update(username="nodump", password="pw")
    cases["src-no-dump"] = (d, ["source", src.addr, "DUMP"])
    d = spec(src, dst, db_mapping={"0": 20})
    cases["dst-bad-db"] = (d, ["target", dst.addr, "SELECT", "out of range"])

    for name, (data, _) in cases.items():
        # many tasks into one target: only shared_target lets them be created together
        daemon.create({"task_id": name, **data, "shared_target": True})
    good = daemon.create(spec(src, good_dst, task_id="good"))
    for name, (_, needles) in cases.items():
        t = daemon.wait_state(name, "Failed", timeout=30)
        for needle in needles:
            assert needle.lower() in t["reason"].lower(), (name, needle, t["reason"])
        assert "right" not in t["reason"]
    assert "NOPERM" in daemon.task("dst-no-restore")["reason"] or \
        "permission" in daemon.task("dst-no-restore")["reason"].lower()
    daemon.wait_state(good, "Succeeded")
    assert_same(src.client(), good_dst.client())
    assert len(daemon.ok("list", {"state": "Failed"})["tasks"]) == len(cases)
    assert "Traceback" not in daemon.log_text()
    # a failed task can be retried once the cause is fixed
    dst.client().acl_setuser("norestore", enabled=True, commands=["+restore"])
    assert daemon.ok("resume", {"task_id": "dst-no-restore"})["state"] == "Running"
    daemon.wait_state("dst-no-restore", "Succeeded")
    assert_same(src.client(), dst.client())


@pytest.mark.parametrize("mode", ["manual", "auto"])
def test_dropped_connections_mid_snapshot(mode: str, daemon: Daemon, servers: Servers) -> None:
    src, dst = servers(), servers()
    fill_bulk(src.client(), 15_000, value_size=200)
    tid = daemon.create(spec(src, dst, resume_mode=mode, bandwidth_limit_mb=2))
    wait_progress(daemon, tid, 1000)
    assert kill_clients(dst) >= 1
    if mode == "manual":
        t = daemon.wait_state(tid, "Failed", timeout=30)
        assert "target" in t["reason"] and dst.addr in t["reason"], t["reason"]
        assert daemon.ok("resume", {"task_id": tid}) == {"task_id": tid, "state": "Running"}
    else:
        wait_for(lambda: daemon.task(tid)["progress"]["retries"] >= 1, 30, what="a retry")
        wait_progress(daemon, tid, daemon.task(tid)["progress"]["snapshot"]["keys_done"] + 500)
        assert kill_clients(src) >= 1
    t = daemon.wait_state(tid, "Succeeded", timeout=60)
    assert t["progress"]["retries"] >= (1 if mode == "auto" else 0)
    assert_same(src.client(), dst.client())


@pytest.mark.parametrize("source,target,write_mode,works",
                         [("redis6", "redis7", "auto", True), ("valkey8", "redis6", "auto", True),
                          ("valkey8", "redis6", "restore", False)])
def test_across_versions(source: str, target: str, write_mode: str, works: bool,
                         daemon: Daemon, servers: Servers) -> None:
    """Older payloads restore on newer servers; the reverse is rewritten as commands, and
    with write_mode restore fails naming the target (more in test_versions.py)."""
    src, dst = servers(source), servers(target)
    fill_mixed(src.client(), big=False)
    tid = daemon.create(spec(src, dst, write_mode=write_mode))
    if works:
        daemon.wait_state(tid, "Succeeded")
        assert_same(src.client(), dst.client())
    else:
        t = daemon.wait_state(tid, "Failed")
        # the precheck refuses it up front, naming both versions, or the first RESTORE does
        reason = t["reason"]
        assert "target" in reason and "RESTORE" in reason, reason
        assert dst.client().dbsize() == 0
