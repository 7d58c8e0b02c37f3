"""The scan reader's fast path for plain strings and its TTL bookkeeping, on real servers.

Plain strings are read by one GETRANGE each (no MEMORY USAGE, no DUMP) and written by
MSET; while the db holds no key with a TTL no PTTL is sent, and a TTL that appears
meanwhile is noticed by the INFO keyspace that ends every round trip.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
import redis

from cdcd.entry import RESTORE, STRINGS, Batch, string_payload
from cdcd.progress import Progress
from cdcd.readers.scan import PROBE_BYTES, ScanSnapshot
from cdcd.resp import Connection
from cdcd.spec import parse_spec
from cdcd.task import run_pipeline
from cdcd.writer import Writer

from .compare import assert_same, fill_bulk
from .servers import FLAVOURS, RedisServer

Servers = Callable[..., RedisServer]
HOUR_MS = 3_600_000


def calls(c: redis.Redis[bytes], command: str) -> int:
    stats = c.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {"calls": 0})["calls"])


async def copy(src: RedisServer, dst: RedisServer, *, count: int = 512,
               big: int = 1 << 20, middle: Callable[[int, Batch], None] | None = None,
               **spec: Any) -> tuple[Progress, list[Batch]]:
    """Run the scan reader and the writer in-process; ``middle`` sees every batch first."""
    task_spec = parse_spec({"task_id": "scan-t", "source": {"addrs": src.addr},
                            "target": {"addrs": dst.addr}, "reader": "scan", **spec})
    progress = Progress()
    seen: list[Batch] = []
    q1: asyncio.Queue[Any] = asyncio.Queue(maxsize=1)
    q2: asyncio.Queue[Any] = asyncio.Queue(maxsize=1)
    source = await Connection.open_endpoint(task_spec.source, role="source")
    target = await Connection.open_endpoint(task_spec.target, role="target")
    try:
        reader = ScanSnapshot(source, task_spec, progress, None, count=count,
                              big_value_bytes=big, chunk_bytes=256 << 10)
        writer = Writer(target, progress=progress, replace=task_spec.existing_keys != "skip")

        async def relay() -> None:
            while (batch := await q1.get()) is not None:
                if middle is not None:
                    middle(len(seen), batch)
                seen.append(batch)
                await q2.put(batch)
            await q2.put(None)

        async def ack(batch: Batch) -> None:
            pass

        await run_pipeline(reader.run(q1), relay(), writer.run(q2, ack))
    finally:
        await source.aclose()
        await target.aclose()
    return progress, seen


def keys_of(batches: list[Batch], kind: int) -> list[bytes]:
    out: list[bytes] = []
    for b in batches:
        for e in b.entries:
            if e[0] == kind:
                out += e[2][::2] if kind == STRINGS else [e[2]]
    return out


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_plain_strings_take_one_read_and_land_by_mset(flavour: str,
                                                            servers: Servers) -> None:
    src, dst = servers(flavour), servers(flavour)
    c = src.client()
    fill_bulk(c, 3000, value_size=120)
    c.mset({b"s:empty": b"", b"s:int": b"-12345", b"s:edge": b"e" * PROBE_BYTES,
            b"s:long": b"l" * (PROBE_BYTES + 1), b"s:medium": b"m" * 300_000})
    c.set(b"s:big", b"b" * (3 << 20))           # over big_value_bytes: chunked
    for i in range(40):
        c.hset(b"h:%d" % i, mapping={b"f": b"v%d" % i})
        c.rpush(b"l:%d" % i, b"a", b"b")
    c.config_resetstat()

    progress, batches = await copy(src, dst)
    pttl, dumped = calls(c, "pttl"), calls(c, "dump")
    sized = calls(c, "memory|usage") + calls(c, "memory")  # 6.2 counts subcommands as one
    assert_same(c, dst.client())
    assert progress.keys_done == c.dbsize()
    msets = keys_of(batches, STRINGS)
    restores = keys_of(batches, RESTORE)
    # plain strings up to PROBE_BYTES went by MSET, all at once per round trip
    assert {b"s:int", b"s:edge"} <= set(msets) and len(msets) >= 3000
    assert calls(dst.client(), "mset") <= 3000 // 512 + 10
    # the rest was sized and dumped: collections, the long strings, the ambiguous empty one
    assert {b"s:long", b"s:medium", b"s:empty", b"h:0", b"l:39"} <= set(restores)
    assert b"s:big" not in msets + restores and calls(dst.client(), "rename") == 1
    # no TTL anywhere: no PTTL, and MEMORY USAGE / DUMP only for the keys that need them
    assert pttl == 1        # the big string's, read in chunks
    assert 0 < sized <= 90 and dumped == len(restores)
    assert all(dst.client().pttl(k) == -1 for k in (b"s:int", b"h:0", b"s:big"))


async def test_mostly_collections_skip_the_string_probe(servers: Servers) -> None:
    src, dst = servers(), servers()
    c = src.client()
    p = c.pipeline(transaction=False)
    for i in range(3000):
        p.sadd(b"set:%d" % i, b"a", b"b")
    p.set(b"one:string", b"v")
    p.execute()
    c.config_resetstat()
    await copy(src, dst, count=100)
    probes = calls(c, "getrange")
    assert_same(c, dst.client())
    # after the first rounds show sets, keys are sized first instead of probed
    assert 0 < probes < 1000


async def test_ttls_with_and_without_probe(servers: Servers) -> None:
    src, dst = servers(), servers()
    c = src.client()
    fill_bulk(c, 1000)
    c.set(b"t:str", b"v", px=HOUR_MS)
    c.set(b"t:empty", b"", px=HOUR_MS)
    c.hset(b"t:hash", mapping={b"a": b"1"})
    c.pexpire(b"t:hash", HOUR_MS)
    c.config_resetstat()
    await copy(src, dst)
    assert calls(c, "pttl") >= 1000     # the db had TTLs from the start
    assert_same(c, dst.client())
    for key in (b"t:str", b"t:empty", b"t:hash"):
        assert HOUR_MS - 60_000 < dst.client().pttl(key) <= HOUR_MS, key
    assert dst.client().pttl(b"k:1") == -1


async def test_a_ttl_set_during_the_scan_is_copied(servers: Servers) -> None:
    """Keys get a TTL after the first batch: the INFO keyspace at the end of a round trip
    notices, the keys of that round get their PTTL, and every later read asks for it."""
    src, dst = servers(), servers()
    c = src.client()
    fill_bulk(c, 20_000)
    before: list[bytes] = []

    def middle(i: int, batch: Batch) -> None:
        if i == 0:
            before.extend(keys_of([batch], STRINGS) + keys_of([batch], RESTORE))
            p = c.pipeline(transaction=False)
            for n in range(20_000):
                p.pexpire(b"k:%d" % n, HOUR_MS)
            p.execute()

    c.config_resetstat()
    await copy(src, dst, count=100, middle=middle)
    assert calls(c, "pttl") >= 19_000
    t = dst.client()
    names = [b"k:%d" % n for n in range(20_000)]
    assert t.dbsize() == 20_000 and t.mget(names) == c.mget(names)
    p = t.pipeline(transaction=False)
    for n in range(20_000):
        p.pttl(b"k:%d" % n)
    ttls = p.execute()
    without = [n for n, ms in enumerate(ttls) if ms == -1]
    assert 0 < len(before) <= 200     # SCAN COUNT is a hint
    # at most the rounds already read when the TTLs appeared were copied without one
    assert len(without) <= len(before) + 400, len(without)
    assert all(HOUR_MS - 120_000 < ms <= HOUR_MS for ms in ttls if ms != -1)


def test_string_payload_is_what_restore_accepts(servers: Servers) -> None:
    server = servers()
    c = server.client()
    for n in (0, 1, 63, 64, 16383, 16384, 70_000):
        value = bytes(range(256)) * (n // 256 + 1)
        c.restore(b"k%d" % n, 0, string_payload(value[:n]))
        assert c.get(b"k%d" % n) == value[:n]


async def test_probe_never_reads_past_a_low_big_value_threshold(servers: Servers) -> None:
    """With big_value_bytes under the probe size, a string over it is still chunked."""
    src, dst = servers(), servers()
    c = src.client()
    fill_bulk(c, 100)
    c.set(b"s:10k", b"x" * 10_000)
    c.set(b"s:4k", b"y" * 4096)
    _, batches = await copy(src, dst, big=4096)
    assert_same(c, dst.client())
    msets = keys_of(batches, STRINGS)
    assert b"s:4k" in msets and b"s:10k" not in msets + keys_of(batches, RESTORE)
    assert calls(dst.client(), "rename") == 1


async def test_source_refusing_getrange_gets_every_key_sized_and_dumped(
        servers: Servers) -> None:
    src, dst = servers(), servers()
    c = src.client()
    c.execute_command("ACL", "SETUSER", "noprobe", "on", ">pw", "~*", "+@all", "-getrange")
    fill_bulk(c, 2000)
    c.hset(b"h", mapping={b"a": b"1"})
    c.config_resetstat()
    _, batches = await copy(src, dst, source={"addrs": src.addr, "username": "noprobe",
                                              "password": "pw"})
    dumped = calls(c, "dump")
    assert_same(c, dst.client())
    # the first round's probes are refused; from then on every key is sized and dumped
    assert keys_of(batches, STRINGS) == [] and len(keys_of(batches, RESTORE)) == 2001
    assert dumped == 2001
