"""Verification against real servers: planted differences are found exactly, nothing else."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import Any

import pytest
import redis

from cdcd.spec import TaskSpec, parse_spec
from cdcd.verify import Verification, render_key

from .servers import RedisServer, free_port

Servers = Callable[..., RedisServer]


def spec_for(src: RedisServer, dst: RedisServer | str, **kw: Any) -> TaskSpec:
    return parse_spec({"source": {"addrs": src.addr},
                       "target": {"addrs": dst if isinstance(dst, str) else dst.addr}, **kw})


def copy(src: RedisServer, dst: RedisServer, dbs: Iterable[int] = (0,),
         mapping: dict[int, int] | None = None) -> None:
    """Copy every key of ``dbs`` with DUMP/RESTORE, keeping TTLs."""
    for db in dbs:
        s, d = src.client(db), dst.client((mapping or {}).get(db, db))
        for key in s.scan_iter(count=1000):
            ttl = s.pttl(key)
            d.restore(key, max(ttl, 0), s.dump(key), replace=True)


def populate(c: redis.Redis[bytes], prefix: str = "") -> int:
    """Write one key of every type (stream with a group and pending entries); return count."""
    p = prefix
    c.set(f"{p}str", "hello")
    c.set(f"{p}num", 12345)
    c.set(f"{p}ttl", "soon", px=300_000)
    c.hset(f"{p}hash", mapping={"a": "1", "b": "2", "c": "3"})
    c.sadd(f"{p}set", "x", "y", "z")
    c.zadd(f"{p}zset", {"m1": 1.5, "m2": 0.1, "m3": -3})
    c.rpush(f"{p}list", "a", "b", "c", "a")
    for i in range(5):
        c.xadd(f"{p}stream", {"n": str(i)})
    c.xgroup_create(f"{p}stream", "g1", id="0")
    c.xgroup_create(f"{p}stream", "g2", id="$")
    c.xreadgroup("g1", "alice", {f"{p}stream": ">"}, count=2)
    c.xreadgroup("g1", "bob", {f"{p}stream": ">"}, count=1)
    c.set(b"bin\xff\x00\nkey" if not p else f"{p}bin".encode(), "binary")
    return 9


async def verify(spec: TaskSpec, **kw: Any) -> dict[str, Any]:
    v = Verification(spec, **kw)
    out = await v.run()
    assert out["state"] == "done", out["error"]
    assert out["percent"] == 100.0
    result: dict[str, Any] = out["result"]
    return result


def counts(result: dict[str, Any]) -> dict[str, Any]:
    return {c: result[c] for c in ("missing", "extra", "type_mismatch", "value_mismatch",
                                   "ttl_mismatch")}


def example_keys(result: dict[str, Any], kind: str) -> list[str]:
    return [e["key"] for e in result["examples"][kind]]


def cmdstat(server: RedisServer, cmd: str) -> int:
    info = server.client().info("commandstats")
    return int(info.get(f"cmdstat_{cmd}", {}).get("calls", 0))


@pytest.mark.parametrize(("src_flavour", "dst_flavour"), [
    ("redis7", "redis7"), ("redis6", "redis7"), ("valkey8", "valkey8")])
async def test_correct_copy_has_no_differences(servers: Servers, src_flavour: str,
                                               dst_flavour: str) -> None:
    src, dst = servers(src_flavour), servers(dst_flavour)
    n = populate(src.client(0)) + populate(src.client(3), prefix="three:")
    copy(src, dst, dbs=(0, 3))
    result = await verify(spec_for(src, dst))
    assert result["consistent"] and result["differences"] == 0, result["examples"]
    assert counts(result) == dict.fromkeys(counts(result), 0)
    assert result["keys_checked"] == n
    assert [(d["db"], d["target_db"], d["keys_checked"]) for d in result["dbs"]] == [
        (0, 0, 9), (3, 3, 9)]


async def test_planted_differences_found_exactly(servers: Servers) -> None:
    src, dst = servers(), servers()
    s = src.client()
    populate(s)
    s.set("ttl_close", "v", px=100_000)
    copy(src, dst)
    d = dst.client()
    d.delete(b"bin\xff\x00\nkey")                  # missing
    d.set("only_on_target", "x")                  # extra
    d.delete("set")
    d.set("set", "not a set")                     # type mismatch
    d.hset("hash", "b", "two")                    # value mismatch (hash field)
    d.xgroup_setid("stream", "g2", "0")           # value mismatch (stream group)
    d.pexpire("str", 60_000)                      # ttl mismatch: none on source
    d.pexpire("ttl_close", 99_000)                # within the 2000 ms tolerance: fine
    result = await verify(spec_for(src, dst))
    assert counts(result) == {"missing": 1, "extra": 1, "type_mismatch": 1,
                              "value_mismatch": 2, "ttl_mismatch": 1}
    assert result["differences"] == 6 and not result["consistent"]
    assert result["keys_checked"] == 10
    assert example_keys(result, "missing") == ["bin\\xff\\x00\\nkey"]
    assert example_keys(result, "extra") == ["only_on_target"]
    assert example_keys(result, "type_mismatch") == ["set"]
    assert sorted(example_keys(result, "value_mismatch")) == ["hash", "stream"]
    assert example_keys(result, "ttl_mismatch") == ["str"]
    details = {e["key"]: e["detail"] for kind in result["examples"]
               for e in result["examples"][kind]}
    assert details["hash"] == "hash field b differs"
    assert details["stream"].startswith("group g2 last-delivered-id")
    assert details["set"] == "source set, target string"
    assert details["str"].startswith("ttl source none, target 59")
    db0 = result["dbs"][0]
    assert counts(db0) == counts(result) and db0["examples"] == result["examples"]

    # a stricter tolerance reports the close TTL too
    strict = await verify(spec_for(src, dst), ttl_tolerance_ms=100)
    assert strict["ttl_mismatch"] == 2
    # the examples cap holds
    capped = await verify(spec_for(src, dst), examples=0)
    assert capped["examples"]["value_mismatch"] == [] and capped["value_mismatch"] == 2


async def test_stream_pel_and_consumers(servers: Servers) -> None:
    src, dst = servers(), servers()
    populate(src.client())
    copy(src, dst)
    d = dst.client()
    d.xclaim("stream", "g1", "carol", 0, [d.xpending_range("stream", "g1", "-", "+", 1)[0]
                                          ["message_id"]])
    result = await verify(spec_for(src, dst))
    assert result["value_mismatch"] == 1
    (ex,) = result["examples"]["value_mismatch"]
    assert ex["key"] == "stream" and "consumers" in ex["detail"] and "carol" in ex["detail"]


async def test_sampled_mode(servers: Servers) -> None:
    src, dst = servers(), servers()
    s, d = src.client(), dst.client()
    s.mset({f"k{i}": i for i in range(2000)})
    d.mset({f"k{i}": i for i in range(0, 2000, 2)})        # every odd key is missing
    d.set("extra", 1)
    result = await verify(spec_for(src, dst), sample=200)
    assert result["mode"] == "sample" and result["sample"] == 200
    assert result["keys_checked"] == 200
    assert 40 < result["missing"] < 160                    # about half
    assert result["extra"] is None and "extra" not in result["examples"]
    assert result["value_mismatch"] == 0 and result["type_mismatch"] == 0
    assert all(int(k[1:]) % 2 == 1 for k in example_keys(result, "missing"))
    assert cmdstat(src, "randomkey") >= 200 and cmdstat(src, "scan") == 0
    # a sample larger than the db scans it whole (still no extra-key pass)
    whole = await verify(spec_for(src, dst), sample=5000)
    assert whole["keys_checked"] == 2000 and whole["missing"] == 1000
    assert whole["extra"] is None


async def test_big_hash_compared_in_chunks(servers: Servers) -> None:
    src, dst = servers(), servers()
    s = src.client()
    for start in range(0, 200_000, 20_000):
        s.hset("big", mapping={f"f{i}": f"v{i}" for i in range(start, start + 20_000)})
    copy(src, dst)
    src.client().config_resetstat()
    result = await verify(spec_for(src, dst))
    assert result["consistent"] and result["keys_checked"] == 1
    assert cmdstat(src, "hgetall") == 0
    assert cmdstat(src, "hscan") >= 150                    # ~200 chunks of ~1000 fields
    d = dst.client()
    d.hset("big", "f123456", "changed")
    result = await verify(spec_for(src, dst))
    assert result["value_mismatch"] == 1
    assert result["examples"]["value_mismatch"][0]["detail"] == "hash field f123456 differs"
    d.hset("big", "f123456", "v123456")
    d.hdel("big", "f77")
    d.hset("big", "other", "x")                            # same length, different field
    result = await verify(spec_for(src, dst))
    assert result["examples"]["value_mismatch"][0]["detail"] == "hash field f77 missing on target"


async def test_every_type_in_chunks(servers: Servers) -> None:
    """With a small chunk every type takes the chunked path; one planted change each."""
    src, dst = servers(), servers()
    s = src.client()
    s.rpush("list", *[f"e{i}" for i in range(300)])
    s.sadd("set", *[f"m{i}" for i in range(300)])
    s.zadd("zset", {f"m{i}": i / 7 for i in range(300)})
    s.set("string", b"s" * 200_000)
    for i in range(300):
        s.xadd("stream", {"i": str(i)})
    s.xgroup_create("stream", "g", id="0")
    s.xreadgroup("g", "c1", {"stream": ">"}, count=150)
    s.xreadgroup("g", "c2", {"stream": ">"}, count=150)
    copy(src, dst)
    result = await verify(spec_for(src, dst), chunk=50)
    assert result["consistent"], result["examples"]
    d = dst.client()
    d.lset("list", 170, "changed")
    d.srem("set", "m250")
    d.sadd("set", "n250")
    d.zadd("zset", {"m123": 1000})
    d.setrange("string", 150_000, "X")
    pending = d.xpending_range("stream", "g", "-", "+", 300)
    d.xclaim("stream", "g", "c1", 0, [pending[200]["message_id"]])   # c2 -> c1
    result = await verify(spec_for(src, dst), chunk=50)
    details = {e["key"]: e["detail"] for e in result["examples"]["value_mismatch"]}
    assert result["value_mismatch"] == 5, details
    assert details["list"] == "list element 170 differs"
    assert details["set"] == "set member m250 missing on target"
    assert details["zset"] == "zset member m123 score differs"
    assert details["string"].startswith("string differs in bytes")
    assert details["stream"].startswith("group g pending entry")
    assert "(consumer c2)" in details["stream"]


async def test_db_mapping_and_filters(servers: Servers) -> None:
    src, dst = servers(), servers()
    s1 = src.client(1)
    s1.mset({"user:1": 1, "user:2": 2, "user:3": 3, "other:1": 1, "user:tmp:1": 1})
    src.client(0).set("user:in-db0", 1)             # db 0 is not selected
    copy(src, dst, dbs=(1,), mapping={1: 2})
    d2 = dst.client(2)
    d2.delete("user:3", "other:1", "user:tmp:1")    # missing, but only user:3 counts
    d2.set("user:extra", 1)                         # extra in the mapped db
    d2.set("other:extra", 1)                        # outside the prefix filter
    dst.client(1).set("user:in-target-db1", 1)      # db 1 of the target is not written
    spec = spec_for(src, dst, db_mapping={"1": 2},
                    filter={"dbs": [1], "include_prefixes": ["user:"],
                            "exclude_prefixes": ["user:tmp:"]})
    result = await verify(spec)
    assert counts(result) == {"missing": 1, "extra": 1, "type_mismatch": 0,
                              "value_mismatch": 0, "ttl_mismatch": 0}
    assert example_keys(result, "missing") == ["user:3"]
    assert example_keys(result, "extra") == ["user:extra"]
    assert [(x["db"], x["target_db"]) for x in result["dbs"]] == [(1, 2)]
    assert result["keys_checked"] == 3
    assert result["examples"]["missing"][0]["target_db"] == 2


async def test_two_source_dbs_into_one_target_db(servers: Servers) -> None:
    src, dst = servers(), servers()
    src.client(0).set("a", 1)
    src.client(1).set("b", 2)
    copy(src, dst, dbs=(0, 1), mapping={1: 0})
    dst.client(0).set("c", 3)
    result = await verify(spec_for(src, dst, db_mapping={"1": 0}))
    assert counts(result) == {"missing": 0, "extra": 1, "type_mismatch": 0,
                              "value_mismatch": 0, "ttl_mismatch": 0}
    assert example_keys(result, "extra") == ["c"]
    assert result["examples"]["extra"][0]["detail"] == \
        "on target db 0 only, not in source db 0, db 1"


async def test_recheck_drops_difference_fixed_during_delay(servers: Servers) -> None:
    src, dst = servers(), servers()
    populate(src.client())
    copy(src, dst)
    d = dst.client()
    d.hset("hash", "a", "lagging")      # fixed during the delay
    d.delete("list")                    # stays missing
    d.set("late_extra", 1)              # removed during the delay
    v = Verification(spec_for(src, dst), recheck_delay=1.0)
    task = asyncio.create_task(v.run())
    deadline = time.monotonic() + 20
    while v.progress["phase"] != "recheck":
        assert time.monotonic() < deadline and not task.done(), v.progress
        await asyncio.sleep(0.01)
    d.hset("hash", "a", "1")
    d.delete("late_extra")
    out = await task
    result = out["result"]
    assert counts(result) == {"missing": 1, "extra": 0, "type_mismatch": 0,
                              "value_mismatch": 0, "ttl_mismatch": 0}
    assert example_keys(result, "missing") == ["list"]
    assert result["recheck"] == {"enabled": True, "delay_s": 1.0, "rechecked": 3,
                                 "resolved": 2}


async def test_recheck_hook_is_awaited(servers: Servers) -> None:
    src, dst = servers(), servers()
    src.client().set("k", "new")
    dst.client().set("k", "old")
    calls: list[float] = []

    async def catch_up() -> None:
        calls.append(time.monotonic())
        dst.client().set("k", "new")

    result = await verify(spec_for(src, dst), recheck=catch_up)
    assert calls and result["consistent"]
    assert result["recheck"]["resolved"] == 1
    # without a recheck the same lag is reported
    dst.client().set("k", "old")
    assert (await verify(spec_for(src, dst)))["value_mismatch"] == 1


async def test_rate_limit_progress_and_cancel(servers: Servers) -> None:
    src, dst = servers(), servers()
    src.client().mset({f"k{i}": i for i in range(1000)})
    copy(src, dst)
    t0 = time.monotonic()
    # 1000 source + 1000 target keys scanned at 1000/s, after a 256-key burst
    result = await verify(spec_for(src, dst), keys_per_sec=1000)
    assert time.monotonic() - t0 > 1.4
    assert result["consistent"] and result["keys_checked"] == 1000

    v = Verification(spec_for(src, dst), keys_per_sec=300)
    task = asyncio.create_task(v.run())
    seen: list[float] = []
    deadline = time.monotonic() + 20
    while v.progress["keys_checked"] < 300:
        assert time.monotonic() < deadline and not task.done()
        seen.append(v.progress["percent"])
        await asyncio.sleep(0.02)
    assert v.progress["state"] == "running" and 0 < v.progress["percent"] < 100
    assert v.progress["keys_total"] == 1000
    v.cancel()
    out = await task                    # cancel() ends run() cleanly, no CancelledError
    assert out["state"] == "cancelled" and out["result"] is None
    assert seen == sorted(seen)


async def test_unreachable_and_cluster_fail_cleanly(servers: Servers) -> None:
    src = servers()
    port = free_port()
    out = await Verification(spec_for(src, f"127.0.0.1:{port}")).run()
    assert out["state"] == "failed" and f"target 127.0.0.1:{port}" in out["error"]
    out = await Verification(spec_for(src, f"127.0.0.1:{port},127.0.0.1:{port + 1}")).run()
    assert out["state"] == "failed" and "no seed node answered" in out["error"]


def test_render_key() -> None:
    assert render_key(b"plain:key") == "plain:key"
    assert render_key("clé".encode()) == "clé"
    assert render_key(b"a\\b") == "a\\\\b"
    assert render_key(b"\xff\x00\n\t\x7f") == "\\xff\\x00\\n\\t\\x7f"
    assert render_key(b"x" * 300).endswith("...")
