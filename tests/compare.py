"""Build test datasets and compare a source with a target key by key: type, value, TTL.

The comparison pipelines its reads (a few round trips per thousand keys), so checking a
few hundred thousand keys stays a matter of seconds.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import Any

import redis

CHUNK = 1000

BIN = b"\x00\xff\r\n"


def _fetch_values(c: "redis.Redis[bytes]", keys: list[bytes]) -> dict[bytes, tuple[str, Any, int]]:
    """Return {key: (type, value, pttl)} for keys, reading in pipelined chunks."""
    out: dict[bytes, tuple[str, Any, int]] = {}
    for i in range(0, len(keys), CHUNK):
        chunk = keys[i:i + CHUNK]
        pipe = c.pipeline(transaction=False)
        for k in chunk:
            pipe.type(k)
        types = [t.decode() for t in pipe.execute()]
        pipe = c.pipeline(transaction=False)
        for k, t in zip(chunk, types):
            if t == "string":
                pipe.get(k)
            elif t == "hash":
                pipe.hgetall(k)
            elif t == "list":
                pipe.lrange(k, 0, -1)
            elif t == "set":
                pipe.smembers(k)
            elif t == "zset":
                pipe.zrange(k, 0, -1, withscores=True)
            else:
                pipe.exists(k)  # placeholder; streams and others are read one by one below
            pipe.pttl(k)
        # A key may change between the two round trips (a live source): an error reply is
        # then just a value that differs, and wait_same() looks again.
        res = pipe.execute(raise_on_error=False)
        for j, (k, t) in enumerate(zip(chunk, types)):
            value = res[2 * j]
            if isinstance(value, redis.ResponseError):
                value = ("error", str(value))
            elif t == "stream":
                try:
                    value = stream_value(c, k)
                except redis.ResponseError as exc:
                    value = ("error", str(exc))
            elif t not in ("string", "hash", "list", "set", "zset"):
                value = None
            out[k] = (t, value, res[2 * j + 1])
    return out


def stream_value(c: "redis.Redis[bytes]", key: bytes) -> Any:
    """Entries, last id and every group's cursor, pending entries and consumers."""
    groups = []
    for g in sorted(c.xinfo_groups(key), key=lambda g: g["name"]):
        pending = c.xpending_range(key, g["name"], "-", "+", 1_000_000)
        groups.append((g["name"], g["last-delivered-id"],
                       sorted((p["message_id"], p["consumer"], p["times_delivered"])
                              for p in pending),
                       sorted(x["name"] for x in c.xinfo_consumers(key, g["name"]))))
    info = c.xinfo_stream(key)
    return (c.xrange(key), info["last-generated-id"], info["length"], groups)


def value_of(c: "redis.Redis[bytes]", key: bytes) -> tuple[str, Any]:
    t, v, _ = _fetch_values(c, [key])[key]
    return t, v


def diff(src: "redis.Redis[bytes]", dst: "redis.Redis[bytes]", *, ttl_tolerance_ms: int = 2000,
         keys: Iterable[bytes] | None = None, limit: int = 20,
         ignore: Iterable[bytes] = ()) -> list[str]:
    """Return human-readable differences (empty when the target matches the source).

    Without ``keys`` the whole db is compared, extra target keys included; with ``keys``
    only those keys are.
    """
    problems: list[str] = []
    if keys is None:
        src_keys = sorted(set(src.scan_iter(count=1000)))
        dst_set = set(dst.scan_iter(count=1000)) - set(ignore)
        for k in sorted(dst_set - set(src_keys))[:limit]:
            problems.append(f"extra key {k!r} on the target")
    else:
        src_keys = sorted(set(keys))
    for i in range(0, len(src_keys), 10 * CHUNK):
        chunk = src_keys[i:i + 10 * CHUNK]
        sv = _fetch_values(src, chunk)
        dv = _fetch_values(dst, chunk)
        for k in chunk:
            st, sval, sttl = sv[k]
            if st == "none":
                continue  # expired or deleted on the source meanwhile
            dt, dval, dttl = dv[k]
            if (st, sval) != (dt, dval):
                problems.append(f"key {k!r}: source {st} {str(sval)[:200]} != "
                                f"target {dt} {str(dval)[:200]}")
            elif (sttl < 0) != (dttl < 0) or abs(sttl - dttl) > ttl_tolerance_ms:
                problems.append(f"key {k!r}: source pttl {sttl} != target pttl {dttl}")
            if len(problems) >= limit:
                return problems
    return problems


def assert_same(src: "redis.Redis[bytes]", dst: "redis.Redis[bytes]", **kw: Any) -> None:
    problems = diff(src, dst, **kw)
    assert not problems, "\n".join(problems)


def wait_same(src: "redis.Redis[bytes]", dst: "redis.Redis[bytes]", timeout: float = 60,
              **kw: Any) -> None:
    deadline = time.monotonic() + timeout
    while True:
        problems = diff(src, dst, **kw)
        if not problems:
            return
        if time.monotonic() > deadline:
            raise AssertionError("target never matched the source:\n" + "\n".join(problems))
        time.sleep(0.2)


# --- datasets ---------------------------------------------------------------------------------

def fill_bulk(c: "redis.Redis[bytes]", n: int, *, prefix: bytes = b"k:", value_size: int = 16,
              start: int = 0) -> None:
    """Write n string keys quickly (pipelined MSETs); values are value_size bytes."""
    pad = b"v" * max(0, value_size - 8)
    batch: dict[bytes, bytes] = {}
    pipe = c.pipeline(transaction=False)
    for i in range(start, start + n):
        batch[b"%s%d" % (prefix, i)] = b"%08d" % i + pad
        if len(batch) >= 1000:
            pipe.mset(batch)
            batch = {}
            if len(pipe) >= 50:
                pipe.execute()
    if batch:
        pipe.mset(batch)
    pipe.execute()


def fill_mixed(c: "redis.Redis[bytes]", *, big: bool = True, tag: bytes = b"") -> list[bytes]:
    """Write every type in small and large encodings, binary keys and values, and TTLs.

    ``big`` adds a 5 MB string and a 100k-field hash. ``tag`` goes into every value, so
    two dbs filled with different tags hold the same key names with different values.
    Return the keys written.
    """
    now_ms = int(time.time() * 1000)
    p = c.pipeline(transaction=False)
    # strings: int, embstr, raw, empty, binary key and value
    p.set(b"str:int", b"12345")
    p.set(b"str:short", b"hello" + tag)
    p.set(b"str:raw", b"r" * 200 + tag)
    p.set(b"str:empty", b"")
    p.set(b"str:" + BIN + b"key", BIN * 10 + tag)
    p.set(BIN, BIN + tag)
    p.set(b"str:negative", b"-42")
    # hashes: small (listpack/ziplist), big value (hashtable), many fields (hashtable)
    p.hset(b"hash:small", mapping={b"a": b"1", b"b": b"2" + tag, BIN: BIN})
    p.hset(b"hash:longvalue", mapping={b"f": b"x" * 100 + tag})
    p.hset(b"hash:large", mapping={b"f%d" % i: b"v%d" % i + tag for i in range(1000)})
    # lists: small (listpack/ziplist), large quicklist of many nodes, binary items
    p.rpush(b"list:small", b"a", b"b" + tag, BIN)
    p.rpush(b"list:large", *[b"item-%d" % i + tag for i in range(20000)])
    p.rpush(b"list:bigitems", *[b"y" * 10000 for _ in range(5)])
    # sets: intset, small strings (listpack on 7.2+), large intset overflow, hashtable
    p.sadd(b"set:intset", 1, 2, 3, -7, 1 << 40)
    p.sadd(b"set:small", b"a", b"b" + tag, BIN)
    p.sadd(b"set:manyints", *range(1000))
    p.sadd(b"set:large", *[b"m%d" % i + tag for i in range(1000)])
    # sorted sets: small (listpack/ziplist), large (skiplist), odd scores
    p.zadd(b"zset:small", {b"a": 1, b"b" + tag: 2.5, BIN: -3})
    p.zadd(b"zset:large", {b"z%d" % i + tag: i / 7 for i in range(1000)})
    p.zadd(b"zset:odd", {b"inf": float("inf"), b"-inf": float("-inf"), b"tie1": 1, b"tie2": 1,
                         b"tiny": 1e-300})
    # TTLs: relative and absolute, on several types
    p.set(b"ttl:str", b"expiring" + tag, px=600_000)
    p.hset(b"ttl:hash", mapping={b"a": b"b"})
    p.expire(b"ttl:hash", 3600)
    p.rpush(b"ttl:list", b"1", b"2")
    p.pexpireat(b"ttl:list", now_ms + 900_000)
    p.execute()
    # streams: entries, a deleted entry, consumer groups with pending entries
    c.xadd(b"stream:s", {b"f": b"v" + tag}, id=b"1-1")
    for i in range(2, 200):
        c.xadd(b"stream:s", {b"f": b"v%d" % i, BIN: BIN}, id=b"1-%d" % i)
    c.xdel(b"stream:s", b"1-5")
    c.xgroup_create(b"stream:s", b"g1", id=b"0")
    c.xgroup_create(b"stream:s", b"g2", id=b"1-100")
    c.xreadgroup(b"g1", b"alice", {b"stream:s": b">"}, count=10)
    c.xreadgroup(b"g1", b"bob", {b"stream:s": b">"}, count=5)
    c.xreadgroup(b"g2", b"carol", {b"stream:s": b">"}, count=3)
    c.xack(b"stream:s", b"g1", b"1-1", b"1-2")
    c.xgroup_createconsumer(b"stream:s", b"g2", b"idle")
    c.xgroup_create(b"stream:empty", b"g", id=b"$", mkstream=True)
    c.xadd(b"stream:big", {b"payload": b"p" * 50 + tag}, id=b"5-0")
    for i in range(1, 3000):
        c.xadd(b"stream:big", {b"n": b"%d" % i})
    if big:
        c.set(b"str:5mb", os.urandom(5 << 20))
        p = c.pipeline(transaction=False)
        fields = {b"field:%d" % i: b"%d" % i + tag for i in range(100_000)}
        items = list(fields.items())
        for i in range(0, len(items), 20_000):
            p.hset(b"hash:100k", mapping=dict(items[i:i + 20_000]))
        p.execute()
    return sorted(c.scan_iter(count=1000))


def write_commands(c: "redis.Redis[bytes]") -> dict[str, int]:
    """Return {command: calls} for every command a server ran that may write data."""
    stats = c.info("commandstats")
    out: dict[str, int] = {}
    readonly = {"scan", "dump", "pttl", "ttl", "info", "select", "ping", "auth", "type",
                "get", "hgetall", "lrange", "smembers", "zrange", "xrange", "xinfo",
                "xinfo|groups", "xinfo|stream", "xinfo|consumers", "xpending", "exists",
                "dbsize", "config", "config|get", "config|resetstat", "client", "hello",
                "command", "command|docs", "client|setinfo", "client|setname", "memory",
                "memory|usage", "getrange", "hscan", "sscan",
                "object", "object|encoding", "pexpiretime", "strlen", "hlen", "llen", "scard",
                "zcard", "xlen", "keys", "randomkey", "echo", "time", "role", "psync",
                "replconf", "sync", "acl", "acl|whoami", "acl|dryrun", "client|list", "client|kill",
                "client|id", "function|list"}
    for name, v in stats.items():
        cmd = name.removeprefix("cmdstat_").lower()
        if cmd not in readonly:
            out[cmd] = int(v["calls"])
    return out


def assert_counters_and_lists(src: "redis.Redis[bytes]", dst: "redis.Redis[bytes]") -> None:
    """The keys of Load(kinds="counters+lists"): a command applied twice or lost shows."""
    for i in range(50):
        assert src.get(f"counter:{i}") == dst.get(f"counter:{i}"), i
    for i in range(20):
        assert src.lrange(f"list:{i}", 0, -1) == dst.lrange(f"list:{i}", 0, -1), i
