"""Big keys: values over the threshold are copied in chunks through a temporary key, by
both readers, exactly, with bounded memory and without ever exposing a half-written key.

Most tests run a reader and the writer in-process against real servers with a low
threshold (64 KiB, 16 KiB / 100 elements per command), so every type goes down the
chunked path with a small dataset; the memory test runs the real daemon with its
defaults on a dataset of a 150 MB string, a 1M-field hash and a 1M-element list.
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from cdcd.compat import RESTORE_PLAN, WritePlan
from cdcd.entry import COMMAND
from cdcd.progress import Progress
from cdcd.ratelimit import TokenBucket
from cdcd.readers.bigkey import BigKey, hash_tag, key_slot, temp_key
from cdcd.readers.psync import PsyncReader
from cdcd.readers.scan import ScanSnapshot
from cdcd.resp import Connection
from cdcd.spec import parse_spec
from cdcd.task import run_pipeline
from cdcd.writer import Writer

from .compare import BIN, assert_same, fill_bulk
from .daemon import Daemon, endpoint
from .servers import FLAVOURS, RedisServer

Servers = Callable[..., RedisServer]

BIG = 64 << 10
CHUNK_BYTES = 16 << 10
CHUNK_ELEMENTS = 100
FUTURE_MS = 3_600_000
TASK = "bk"
READERS = ("scan", "psync")
WORDS = [b"alpha", b"beta", b"gamma", b"delta", b"epsilon", b"zeta", b"eta", b"\x00\xff"]
SCORES = {b"0.1": 0.1, b"-inf": float("-inf"), b"inf": float("inf"), b"1e300": 1e300,
          b"denormal": 5e-324, b"max": 1.7976931348623157e308, b"-tiny": -2.5e-300,
          b"third": 1 / 3, BIN: -7.25}

# key -> (kind, length command): every one of them is over BIG for both readers
BIG_KEYS: dict[bytes, str] = {
    b"big:str": "string", b"big:str:words": "string", b"big:str:ttl": "string",
    b"big:hash": "hash", b"big:list": "list", b"big:set": "set", b"big:ints": "set",
    b"big:zset": "zset", b"big:stream": "stream", b"{user:7}:big": "hash",
    b"a}b{:big": "list", BIN + b"big": "string",
}
LENGTH = {"string": "STRLEN", "hash": "HLEN", "list": "LLEN", "set": "SCARD",
          "zset": "ZCARD", "stream": "XLEN"}


@pytest.fixture(params=READERS)
def reader(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def fill_big(c: redis.Redis[bytes]) -> None:
    """Write one or more big values of every type (binary, odd scores, TTLs) and some
    small keys."""
    rnd = random.Random(5)
    p = c.pipeline(transaction=False)
    p.set(b"big:str", rnd.randbytes(300_000))                      # stored raw
    p.set(b"big:str:words", b" ".join(rnd.choice(WORDS) for _ in range(60_000)))  # LZF
    p.set(b"big:str:ttl", rnd.randbytes(200_000), px=FUTURE_MS)
    p.set(BIN + b"big", BIN + rnd.randbytes(100_000) + BIN)
    p.hset(b"big:hash", mapping={b"f%d" % i: b"v%d" % i for i in range(20_000)})
    p.hset(b"big:hash", mapping={BIN + b"field": BIN * 50, b"int": 12345, b"": b"empty",
                                 b"long": rnd.randbytes(30_000)})
    p.pexpire(b"big:hash", FUTURE_MS)
    p.hset(b"{user:7}:big", mapping={b"k%d" % i: rnd.randbytes(20) for i in range(5000)})
    p.rpush(b"big:list", *[b"item-%d" % i for i in range(30_000)])
    p.rpush(b"big:list", *range(-300, 300), BIN, rnd.randbytes(70_000), b"")
    p.rpush(b"a}b{:big", *[rnd.randbytes(30) for _ in range(5000)])
    p.sadd(b"big:set", *[b"m%d" % i for i in range(20_000)], BIN)
    p.sadd(b"big:ints", *range(-60_000, 60_000, 3))
    p.zadd(b"big:zset", {b"z%d" % i: i / 7 for i in range(20_000)})
    p.zadd(b"big:zset", SCORES)
    p.execute()
    ids = [c.xadd(b"big:stream", {b"payload": rnd.randbytes(40), b"n": i}) for i in range(3000)]
    for i in range(0, 3000, 100):
        c.xadd(b"big:stream", {b"other": b"fields", BIN: BIN})
    c.xdel(b"big:stream", ids[0], ids[10], ids[1500])
    c.xgroup_create(b"big:stream", b"g1", id=b"0")
    c.xreadgroup(b"g1", b"alice", {b"big:stream": b">"}, count=150)  # > 1 XPENDING page
    c.xreadgroup(b"g1", b"bob", {b"big:stream": b">"}, count=7)
    c.xreadgroup(b"g1", b"alice", {b"big:stream": b"0"}, count=5)  # delivered twice
    c.xack(b"big:stream", b"g1", ids[1], ids[2])
    c.xgroup_createconsumer(b"big:stream", b"g1", b"idle")
    c.xgroup_create(b"big:stream", b"g2", id=b"$")
    c.xadd(b"big:stream", {b"late": b"1"})
    c.xreadgroup(b"g2", b"carol", {b"big:stream": b">"}, count=1)
    c.pexpire(b"big:stream", FUTURE_MS)
    fill_bulk(c, 2000, prefix=b"small:")
    c.hset(b"small:hash", mapping={b"a": b"1"})


async def copy(reader: str, src: RedisServer, dst: RedisServer, *, big: int = BIG,
               limiter: TokenBucket | None = None, plan: WritePlan = RESTORE_PLAN,
               **spec: Any) -> Progress:
    """Run one reader and the writer in-process until the snapshot is on the target."""
    task_spec = parse_spec({"task_id": TASK, "source": endpoint(src), "target": endpoint(dst),
                            "reader": reader, **spec})
    progress = Progress()
    queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=8)
    target = await Connection.open_endpoint(task_spec.target, role="target")
    source = None
    try:
        writer = Writer(target, progress=progress, replace=task_spec.existing_keys != "skip",
                        db_map=task_spec.target_db, limiter=limiter)
        if reader == "scan":
            source = await Connection.open_endpoint(task_spec.source, role="source")
            produce = ScanSnapshot(source, task_spec, progress, None, big_value_bytes=big,
                                   chunk_bytes=CHUNK_BYTES, chunk_elements=CHUNK_ELEMENTS,
                                   plan=plan)
            run = produce.run(queue)
        else:
            psync = PsyncReader(task_spec, progress, resume=None, host="127.0.0.1",
                                port=src.port, rdb_only=True, plan=plan)
            psync.big_value_bytes = big
            psync.chunk_bytes = CHUNK_BYTES
            psync.chunk_elements = CHUNK_ELEMENTS
            run = psync.run(queue)

        async def ack(batch: Any) -> None:
            pass

        await run_pipeline(run, writer.run(queue, ack))
    finally:
        await target.aclose()
        if source is not None:
            await source.aclose()
    return progress


def renames(c: redis.Redis[bytes]) -> int:
    stats = c.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{name}", {"calls": 0})["calls"])
               for name in ("rename", "renamenx"))


def stream_meta(c: redis.Redis[bytes], key: bytes) -> dict[str, Any]:
    info = c.xinfo_stream(key)
    return {k: info.get(k) for k in ("length", "last-generated-id", "max-deleted-entry-id",
                                     "entries-added", "recorded-first-entry-id")}


# --- the temporary key and the commands, without servers -----------------------------------

@pytest.mark.parametrize("key", [b"plain", b"{user}:1", b"a{b", b"a}b", b"a{}b", b"}{x}",
                                 b"x}{", b"{", b"}", b"", BIN, b"{}{t}", b"k" * 300])
def test_temp_key_lands_in_the_keys_slot(key: bytes) -> None:
    tmp = temp_key("t-1.x", key)
    assert tmp.startswith(b"cdcd:tmp:t-1.x:")
    assert key_slot(tmp) == key_slot(key)
    assert hash_tag(tmp) is not None  # never hashed whole: the slot comes from a tag
    if hash_tag(key) is not None:
        assert tmp == b"cdcd:tmp:t-1.x:" + key
    elif key and b"}" not in key:
        assert tmp == b"cdcd:tmp:t-1.x:{" + key + b"}"


def test_commands_are_chunked_and_the_tail_is_atomic() -> None:
    out: list[Any] = []
    b = BigKey(3, b"h", "hash", task_id="t", replace=True, chunk_bytes=1 << 20,
               chunk_elements=3)
    b.begin(out)
    b.add_chunk([b"f1", b"v1", b"f2", b"v2", b"f3"], out)   # a pair cut between chunks
    b.add_chunk([b"v3", b"f4", b"v4"], out)
    b.finish(1_900_000_000_000, out)
    tmp = temp_key("t", b"h")
    assert [e[2] for e in out] == [
        [b"DEL", tmp],
        [b"HSET", tmp, b"f1", b"v1", b"f2", b"v2", b"f3", b"v3"],
        [b"HSET", tmp, b"f4", b"v4"],
        [b"MULTI"], [b"RENAME", tmp, b"h"], [b"PEXPIREAT", b"h", b"1900000000000"], [b"EXEC"]]
    assert all(e[0] == COMMAND and e[1] == 3 for e in out)

    out = []
    z = BigKey(0, b"z", "zset", task_id="t", replace=False, chunk_elements=2)
    z.begin(out)
    z.add_chunk([b"a", b"0.1", b"b", b"-inf", b"c", b"1e+300"], out)
    z.finish(0, out)
    tmp = temp_key("t", b"z")
    assert [e[2] for e in out] == [
        [b"DEL", tmp], [b"ZADD", tmp, b"0.1", b"a", b"-inf", b"b"],
        [b"ZADD", tmp, b"1e+300", b"c"], [b"RENAMENX", tmp, b"z"], [b"DEL", tmp]]

    out = []
    s = BigKey(0, b"s", "string", task_id="t", replace=True, size=10, chunk_bytes=4)
    s.begin(out)
    for piece in (b"abc", b"defgh", b"ij"):
        s.add_chunk([piece], out)
    s.finish(0, out)
    tmp = temp_key("t", b"s")
    assert [e[2] for e in out] == [
        [b"DEL", tmp], [b"SETRANGE", tmp, b"9", b"\0"], [b"SETRANGE", tmp, b"0", b"abcd"],
        [b"SETRANGE", tmp, b"4", b"efgh"], [b"SETRANGE", tmp, b"8", b"ij"],
        [b"RENAME", tmp, b"s"]]

    out = []
    empty = BigKey(0, b"gone", "list", task_id="t", replace=True)
    empty.begin(out)
    empty.finish(0, out)
    assert [e[2][0] for e in out] == [b"DEL"]  # nothing built: nothing renamed


@pytest.mark.parametrize("kind", ["hash", "list", "zset"])
def test_chunks_keep_every_element_in_order_and_within_limits(kind: str) -> None:
    rnd = random.Random(kind)
    step = 1 if kind == "list" else 2
    for _ in range(30):
        limit_bytes, limit_items = rnd.randint(1, 400), rnd.randint(1, 9)
        b = BigKey(0, b"k", kind, task_id="t", replace=True, chunk_bytes=limit_bytes,
                   chunk_elements=limit_items)
        items = [rnd.randbytes(rnd.choice([0, 1, 5, 50, 300])) for _ in range(step * 200)]
        out: list[Any] = []
        pos = 0
        while pos < len(items):   # pieces of any size, pairs cut anywhere
            size = rnd.randint(0, 40)
            b.add_chunk(items[pos:pos + size], out)
            pos += size
        b.finish(0, out)
        adds = [e[2][2:] for e in out if e[2][0] in (b"HSET", b"RPUSH", b"ZADD")]
        if kind == "zset":   # back to member, score order
            adds = [[x for i in range(0, len(a), 2) for x in (a[i + 1], a[i])] for a in adds]
        assert [x for a in adds for x in a] == items
        for a in adds:
            assert 0 < len(a) <= limit_items * step and len(a) % step == 0
            # over the byte limit only by the element (pair) that crossed it
            assert sum(map(len, a[:-step])) < limit_bytes


# --- both readers, every type -------------------------------------------------------------

@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_every_big_type_copied_exactly(flavour: str, reader: str,
                                             servers: Servers) -> None:
    src, dst = servers(flavour), servers(flavour)
    c, d = src.client(), dst.client()
    fill_big(c)
    d.set(b"big:set", b"a string the copy replaces")   # existing_keys replace
    t0 = time.monotonic()
    progress = await copy(reader, src, dst)
    elapsed = time.monotonic() - t0
    assert_same(c, d)   # also: no cdcd:tmp:* key left behind
    assert renames(d) == len(BIG_KEYS), "every big key went through a temporary key"
    assert progress.keys_done == c.dbsize()
    if flavour != "redis6":   # 7.0+ stream counters
        assert stream_meta(d, b"big:stream") == stream_meta(c, b"big:stream")
    for key in (b"big:str:ttl", b"big:hash", b"big:stream"):
        assert d.pttl(key) > 0 and abs(c.pttl(key) - d.pttl(key)) < 5000, key
    assert d.pttl(b"big:str") == -1
    # scores bit for bit
    for member, score in SCORES.items():
        assert d.zscore(b"big:zset", member) == score
    assert elapsed < 30


async def test_existing_keys_skip_keeps_the_targets_values(reader: str,
                                                          servers: Servers) -> None:
    src, dst = servers(), servers()
    c, d = src.client(), dst.client()
    fill_big(c)
    mine = {b"big:hash": b"target's own string", b"big:str:ttl": b"target's own value"}
    d.mset(mine)
    d.rpush(b"big:list", b"target", b"list")
    await copy(reader, src, dst, existing_keys="skip")
    for key, value in mine.items():
        assert d.get(key) == value
        assert d.pttl(key) == -1   # the source's TTL did not land on the target's key
    assert d.lrange(b"big:list", 0, -1) == [b"target", b"list"]
    assert_same(c, d, keys=[k for k in BIG_KEYS if k not in mine and k != b"big:list"])
    assert not list(d.scan_iter(match=b"cdcd:tmp:*"))


async def test_filter_skips_big_keys_it_does_not_want(reader: str, servers: Servers) -> None:
    src, dst = servers(), servers()
    c, d = src.client(), dst.client()
    fill_big(c)
    await copy(reader, src, dst, filter={"include_prefixes": ["big:h"]})
    assert set(d.scan_iter()) == {b"big:hash"}
    assert_same(c, d, keys=[b"big:hash"])


async def test_scan_without_memory_usage_dumps_whole(servers: Servers) -> None:
    """A source that refuses MEMORY USAGE (ACL) still gets every key copied: whole."""
    src, dst = servers(), servers()
    c, d = src.client(), dst.client()
    fill_big(c)
    c.acl_setuser("cdcd", enabled=True, passwords=["+pw"], keys=["*"],
                  commands=["+@all", "-memory"])
    progress = await copy("scan", src, dst, source={"addrs": src.addr, "username": "cdcd",
                                                    "password": "pw"})
    assert_same(c, d)
    assert renames(d) == 0
    assert progress.keys_done == c.dbsize()


async def test_target_never_sees_a_half_written_key(reader: str, servers: Servers) -> None:
    """Poll every big key's length (and TTL) on the target while the copy runs (slowed to
    ~2 MB/s): it is absent or complete, never in between, and has its TTL from the start."""
    src, dst = servers(), servers()
    c, d = src.client(), dst.client()
    fill_big(c)
    full = {k: int(c.execute_command(LENGTH[kind], k)) for k, kind in BIG_KEYS.items()}
    with_ttl = [k for k in BIG_KEYS if c.pttl(k) > 0]
    temps = [temp_key(TASK, k) for k in BIG_KEYS]
    seen: dict[bytes, set[int]] = {k: set() for k in BIG_KEYS}
    bad_ttl: list[tuple[bytes, int]] = []
    building = 0
    stop = threading.Event()
    failure: list[BaseException] = []

    def poll() -> None:
        nonlocal building
        try:
            poller = dst.client()
            while not stop.is_set():
                p = poller.pipeline(transaction=False)
                for k, kind in BIG_KEYS.items():
                    p.type(k)
                    p.execute_command(LENGTH[kind], k)
                for k in with_ttl:
                    p.pttl(k)
                p.exists(*temps)
                res = p.execute(raise_on_error=False)
                for i, k in enumerate(BIG_KEYS):
                    kind, length = res[2 * i], res[2 * i + 1]
                    if kind == BIG_KEYS[k].encode():
                        seen[k].add(int(length))
                for k, ttl in zip(with_ttl, res[2 * len(BIG_KEYS):-1]):
                    if ttl == -1:
                        bad_ttl.append((k, ttl))
                building += res[-1] > 0
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            failure.append(exc)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        await copy(reader, src, dst, limiter=TokenBucket(2_000_000, 64 << 10))
    finally:
        stop.set()
        thread.join(10)
    assert not failure, failure
    assert building > 10, "the poller never saw a copy in progress"
    for k in BIG_KEYS:
        assert seen[k] <= {full[k]}, (k, sorted(seen[k])[:10], full[k])
    assert not bad_ttl
    assert_same(c, d)


# --- memory, through the daemon --------------------------------------------------------------

HASH_LUA = ("for i = tonumber(ARGV[1]), tonumber(ARGV[2]) do "
            "redis.call('HSET', KEYS[1], 'field:' .. i, 'value:' .. i) end")
# hex digests, so that the RDB's LZF-compressed list nodes stay over the threshold
LIST_LUA = ("for i = tonumber(ARGV[1]), tonumber(ARGV[2]) do "
            "redis.call('RPUSH', KEYS[1], redis.sha1hex(tostring(i))) end")


def vm_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_daemon_memory_stays_bounded(daemon_factory: Callable[..., Daemon],
                                     servers: Servers, capsys: pytest.CaptureFixture[str]
                                     ) -> None:
    """A 150 MB string, a 1M-field hash and a 1M-element list through each reader, with
    the default thresholds: the daemon's peak RSS stays under 200 MB."""
    src = servers()
    c = src.client()
    chunk = os.urandom(1 << 20)
    p = c.pipeline(transaction=False)
    for _ in range(150):
        p.append(b"huge:string", chunk)
    p.execute()
    for lua, key in ((HASH_LUA, b"huge:hash"), (LIST_LUA, b"huge:list")):
        for start in range(1, 1_000_001, 250_000):
            c.eval(lua, 1, key, start, start + 249_999)
    fill_bulk(c, 5000, prefix=b"small:")
    report = []
    for reader in READERS:
        dst = servers()
        daemon = daemon_factory()
        assert daemon.proc is not None
        before = vm_hwm_mb(daemon.proc.pid)
        t0 = time.monotonic()
        tid = daemon.create({"source": endpoint(src), "target": endpoint(dst),
                             "migration_method": "full_amount_migration", "reader": reader})
        task = daemon.wait_state(tid, "Succeeded", timeout=120)
        seconds = time.monotonic() - t0
        hwm = vm_hwm_mb(daemon.proc.pid)
        report.append(f"{reader}: {seconds:.1f} s, daemon VmHWM {hwm:.0f} MB "
                      f"(idle {before:.0f} MB)")
        d = dst.client()
        for key in (b"huge:string", b"huge:hash", b"huge:list"):
            assert (d.execute_command("DEBUG", "DIGEST-VALUE", key) ==
                    c.execute_command("DEBUG", "DIGEST-VALUE", key)), (reader, key)
        assert d.dbsize() == c.dbsize()
        assert task["progress"]["snapshot"]["keys_done"] == c.dbsize()
        assert renames(d) == 3
        assert hwm < 200, report
        daemon.stop()
    with capsys.disabled():
        print("\nbig-key copy:", "; ".join(report))
