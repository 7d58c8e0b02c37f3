"""Split RDB files written by real servers and check every payload against DUMP/RESTORE."""

from __future__ import annotations

import random
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import anycrc
import pytest
import redis

from cdcd.rdb import (
    BigValueChunk,
    BigValueEnd,
    BigValueStart,
    FunctionRecord,
    KeyRecord,
    RdbError,
    RdbSplitter,
    Record,
)
from cdcd.readers.bigkey import BigKey
from tests.servers import FLAVOURS, RedisServer, running

crc64 = anycrc.Model("CRC64-REDIS").calc

LIBRARY = (
    "#!lua name=cdcdlib\n"
    "redis.register_function('cdcd_echo', function(keys, args) return args[1] end)\n"
    "redis.register_function('cdcd_len', function(keys, args) return #args end)\n"
)
HUGE_HASH_FIELDS = 100_000
FUTURE_MS = 3_600_000


# --- building a dataset on a real server ---

def populate(server: RedisServer) -> None:
    """Write every type in every encoding the flavour has, in three dbs."""
    rnd = random.Random(7)
    c = server.client()
    c.config_set("list-compress-depth", 1)  # LZF-compressed quicklist nodes
    c.config_set("rdbcompression", "yes")
    p = c.pipeline(transaction=False)
    # strings: int, embstr, raw, LZF, binary, empty, big
    p.set("str:embstr", "hello")
    for name, value in [("int", 12345), ("neg", -7), ("int16", 30000), ("int32", 2_000_000_000),
                        ("int64", 9223372036854775807), ("lead0", "007"), ("float", "3.14")]:
        p.set(f"str:{name}", value)
    p.set("str:empty", "")
    p.set("str:raw", rnd.randbytes(300))
    p.set("str:lzf", "abc" * 2000)
    p.set("str:lzf-big", "x" * 100_000)
    words = [b"alpha", b"beta", b"gamma", b"delta", b"\x00\xff", b"epsilon"]
    p.set("str:lzf-words", b" ".join(rnd.choice(words) for _ in range(50_000)))  # LZF, big
    p.set("str:1mb", rnd.randbytes(1 << 20))
    p.set(b"bin\x00\xff\r\nkey", b"\x00\xff\r\n")
    p.set(b"", b"empty key")
    for key in ["12345", "-7", "300", "70000", "2147483647", "2147483648", "-2147483648", "0"]:
        p.set(key, f"integer-looking key {key}")
    p.set("k" * 200, "LZF-compressed key")
    p.set(b"\xc3\x00\x00", b"key that looks like an RDB special encoding")
    # lists
    p.rpush("list:small", "a", "b", 1, 2, -3, "x" * 30)
    p.rpush("list:big", *[f"item-{i}" for i in range(5000)])
    p.rpush("list:ints", *range(-2000, 2000, 7))
    p.rpush("list:bigitems", *[rnd.randbytes(10_000) for _ in range(5)])
    # sets
    p.sadd("set:intset", *range(10))
    p.sadd("set:small", "a", "b", "c")
    p.sadd("set:big", *[f"member-{i}" for i in range(1000)])
    p.sadd("set:bigints", *range(1000))
    # sorted sets
    p.zadd("zset:small", {"a": 1, "b": 2.5, "c": float("-inf"), "d": float("inf"), "e": -0.125})
    p.zadd("zset:big", {f"m{i}": i / 7 for i in range(500)})
    p.zadd("zset:longmember", {"y" * 100: 1.5, "z": 2})
    # hashes
    p.hset("hash:small", mapping={"f1": "v1", "f2": 2, "f3": "x" * 40})
    p.hset("hash:bigvalue", mapping={"f": "v" * 200, "g": 1})
    p.hset("hash:big", mapping={f"field-{i}": f"value-{i}" for i in range(1000)})
    for start in range(0, HUGE_HASH_FIELDS, 5000):
        p.hset("hash:huge", mapping={f"f{i}": i for i in range(start, start + 5000)})
    # keys with TTLs
    now_ms = int(time.time() * 1000)
    p.set("ttl:str", "expiring", px=FUTURE_MS)
    p.hset("ttl:hash", mapping={"a": 1})
    p.pexpireat("ttl:hash", now_ms + 2 * FUTURE_MS)
    p.rpush("ttl:list", *range(100))
    p.expireat("ttl:list", now_ms // 1000 + 7200)
    p.execute()
    make_streams(c)
    # other dbs
    for db in (1, 5):
        d = server.client(db=db)
        d.set(f"db{db}:str", f"in db {db}")
        d.set("shared-name", f"same key name, db {db}", px=FUTURE_MS + db)
        d.sadd(f"db{db}:set", "x", "y")
        d.hset(f"db{db}:hash", mapping={"a": "b"})
    if server.flavour != "redis6":
        c.function_load(LIBRARY)


def make_streams(c: redis.Redis[bytes]) -> None:
    """Streams with several nodes, deleted entries, groups, pending entries, consumers."""
    ids = [c.xadd("stream:groups", {"n": i, "payload": "p" * (i % 13)}) for i in range(300)]
    c.xdel("stream:groups", *ids[10:15], ids[150])
    c.xgroup_create("stream:groups", "g1", id="0")
    c.xreadgroup("g1", "alice", {"stream:groups": ">"}, count=20)
    c.xreadgroup("g1", "bob", {"stream:groups": ">"}, count=10)
    c.xack("stream:groups", "g1", *ids[:5])
    c.xgroup_createconsumer("stream:groups", "g1", "carol")
    c.xgroup_create("stream:groups", "g2", id="$")
    c.xgroup_create("stream:groups", "g3", id=ids[100])
    c.xreadgroup("g3", "dave", {"stream:groups": ">"}, count=3)
    empty = c.xadd("stream:empty", {"a": 1})
    c.xdel("stream:empty", empty)
    for i in range(50):
        c.xadd("stream:trimmed", {"i": i})
    c.xtrim("stream:trimmed", maxlen=10, approximate=False)


def keyspace(server: RedisServer) -> set[tuple[int, bytes]]:
    keys: set[tuple[int, bytes]] = set()
    for db in (0, 1, 5):
        keys.update((db, k) for k in server.client(db=db).scan_iter(count=1000))
    return keys


def save(server: RedisServer) -> bytes:
    server.client().save()
    return (server.dir / "dump.rdb").read_bytes()


def split(data: bytes, sizes: Iterator[int] | None = None, **kw: Any) -> tuple[
        list[KeyRecord | FunctionRecord], RdbSplitter]:
    """Feed data in chunks of the given sizes (one chunk when None)."""
    splitter = RdbSplitter(**kw)
    records: list[KeyRecord | FunctionRecord] = []
    view = memoryview(data)
    pos = 0
    while pos < len(data):
        size = next(sizes) if sizes is not None else len(data)
        records += splitter.feed(view[pos:pos + size])
        pos += size
    return records, splitter


def constant(size: int) -> Iterator[int]:
    while True:
        yield size


def random_sizes(seed: int, top: int) -> Iterator[int]:
    rnd = random.Random(seed)
    while True:
        yield rnd.randint(1, top)


def keys_of(records: list[KeyRecord | FunctionRecord]) -> list[KeyRecord]:
    return [r for r in records if isinstance(r, KeyRecord)]


@dataclass
class Dataset:
    flavour: str
    server: RedisServer
    rdb: bytes
    records: list[KeyRecord | FunctionRecord]
    keys: set[tuple[int, bytes]]


@pytest.fixture(scope="module", params=FLAVOURS)
def dataset(request: pytest.FixtureRequest) -> Iterator[Dataset]:
    with running(request.param) as server:
        populate(server)
        rdb = save(server)
        records, splitter = split(rdb)
        assert splitter.done
        yield Dataset(request.param, server, rdb, records, keyspace(server))


# --- the split itself ---

def test_every_key_once(dataset: Dataset) -> None:
    records = keys_of(dataset.records)
    assert len(records) == len(dataset.keys)
    assert {(r.db, r.key) for r in records} == dataset.keys
    splitter = split(dataset.rdb)[1]
    assert splitter.keys_seen == len(records)
    assert splitter.bytes_consumed == len(dataset.rdb)
    assert splitter.take_rest() == b""
    assert splitter.version == {"redis6": 9, "redis7": 10, "valkey8": 11}[dataset.flavour]
    assert b"redis-ver" in splitter.aux or b"valkey-ver" in splitter.aux
    assert splitter.aux[b"redis-bits"] == b"64"  # an int-encoded AUX value, as text
    splitter.finish()


@pytest.mark.parametrize("chunking", ["1", "7", "4096", "random-small", "random-large"])
def test_chunkings_agree(dataset: Dataset, chunking: str) -> None:
    sizes = {"random-small": random_sizes(1, 64), "random-large": random_sizes(2, 300_000)}
    chunks = sizes.get(chunking) or constant(int(chunking))
    records, splitter = split(dataset.rdb, chunks)
    assert splitter.done and splitter.bytes_consumed == len(dataset.rdb)
    assert records == dataset.records
    assert splitter.keys_seen == len(dataset.keys)


def test_buffer_holds_one_record(dataset: Dataset) -> None:
    """Fed in 64 KiB chunks, the splitter buffers at most the largest record and a chunk."""
    splitter = RdbSplitter()
    largest = 0
    for pos in range(0, len(dataset.rdb), 65536):
        splitter.feed(dataset.rdb[pos:pos + 65536])
        largest = max(largest, splitter.buffered)
    assert splitter.done
    biggest_record = max(len(r.payload) + len(r.key) for r in keys_of(dataset.records))
    assert biggest_record > 1 << 20
    assert largest <= biggest_record + 2 * 65536


def test_payloads_equal_dump(dataset: Dataset) -> None:
    records = keys_of(dataset.records)
    for db in (0, 1, 5):
        in_db = [r for r in records if r.db == db]
        pipe = dataset.server.client(db=db).pipeline(transaction=False)
        for r in in_db:
            pipe.dump(r.key)
        for r, dumped in zip(in_db, pipe.execute(), strict=True):
            assert r.payload == dumped, r


def test_expire_times(dataset: Dataset) -> None:
    records = keys_of(dataset.records)
    now_ms = int(time.time() * 1000)
    with_ttl = 0
    for r in records:
        client = dataset.server.client(db=r.db)
        if dataset.flavour == "redis6":  # no PEXPIRETIME before 7.0
            pttl = client.pttl(r.key)
            if pttl < 0:
                assert r.expire_ms == -1, r
            else:
                assert abs(now_ms + pttl - r.expire_ms) < 5000, r
        else:
            assert r.expire_ms == client.pexpiretime(r.key), r
        with_ttl += r.expire_ms != -1
        assert r.idle is None and r.freq is None  # maxmemory-policy noeviction saves neither
    assert with_ttl == 5


def test_restore_into_fresh_server(dataset: Dataset) -> None:
    records = keys_of(dataset.records)
    with running(dataset.flavour) as target:
        for db in (0, 1, 5):
            pipe = target.client(db=db).pipeline(transaction=False)
            for r in records:
                if r.db == db:
                    pipe.restore(r.key, max(r.expire_ms, 0), r.payload, replace=True, absttl=True)
            assert all(reply is True or reply == b"OK" for reply in pipe.execute())
        assert keyspace(target) == dataset.keys
        for r in records:
            source, copy = dataset.server.client(db=r.db), target.client(db=r.db)
            assert value_of(copy, r.key) == value_of(source, r.key), r
            if dataset.flavour != "redis6":
                assert copy.pexpiretime(r.key) == source.pexpiretime(r.key), r
            else:
                assert (copy.pttl(r.key) < 0) == (source.pttl(r.key) < 0), r
        for f in dataset.records:
            if isinstance(f, FunctionRecord):
                target.client().function_load(f.code.decode())
        if dataset.flavour != "redis6":
            assert target.client().fcall("cdcd_echo", 0, "hi") == b"hi"


def value_of(c: redis.Redis[bytes], key: bytes) -> tuple[Any, ...]:
    """Return the type and the full logical value of a key, for comparisons."""
    kind = c.type(key)
    if kind == b"string":
        return kind, c.get(key)
    if kind == b"list":
        return kind, c.lrange(key, 0, -1)
    if kind == b"set":
        return kind, sorted(c.smembers(key))
    if kind == b"zset":
        return kind, c.zrange(key, 0, -1, withscores=True)
    if kind == b"hash":
        return kind, c.hgetall(key)
    if kind == b"stream":
        info = c.xinfo_stream(key)
        meta = {k: info.get(k) for k in ("length", "last-generated-id", "max-deleted-entry-id",
                                         "entries-added", "recorded-first-entry-id", "groups")}
        groups = []
        for g in c.xinfo_groups(key):
            name = g["name"]
            consumers = sorted((x["name"], x["pending"]) for x in c.xinfo_consumers(key, name))
            pending = [(x["message_id"], x["consumer"], x["times_delivered"])
                       for x in c.xpending_range(key, name, "-", "+", 10_000)]
            groups.append((name, g["last-delivered-id"], g.get("entries-read"), g["pending"],
                           consumers, pending))
        return kind, c.xrange(key), meta, groups
    raise AssertionError(f"unexpected type {kind!r} for {key!r}")


def test_function_record(dataset: Dataset) -> None:
    functions = [r for r in dataset.records if isinstance(r, FunctionRecord)]
    if dataset.flavour == "redis6":
        assert functions == []
    else:
        assert [f.code.decode() for f in functions] == [LIBRARY]


def test_want_skips_keys(dataset: Dataset) -> None:
    asked: list[tuple[int, bytes]] = []

    def pick(db: int, key: bytes) -> bool:
        return key.startswith((b"str:", b"hash:", b"stream:")) or db == 5

    def want(db: int, key: bytes) -> bool:
        asked.append((db, key))
        return pick(db, key)

    records, splitter = split(dataset.rdb, random_sizes(3, 5000), want=want)
    expected = [r for r in keys_of(dataset.records) if pick(r.db, r.key)]
    assert 0 < len(expected) < len(dataset.keys)
    assert keys_of(records) == expected
    assert len(asked) == splitter.keys_seen == len(dataset.keys)
    assert set(asked) == dataset.keys  # asked exactly once per key
    none, splitter = split(dataset.rdb, constant(65536), want=lambda db, key: False)
    assert keys_of(none) == [] and splitter.keys_seen == len(dataset.keys) and splitter.done


def test_payload_version_override(dataset: Dataset) -> None:
    records = keys_of(split(dataset.rdb, payload_version=9)[0])
    for r in records:
        assert r.payload[-10:-8] == b"\x09\x00"
        assert struct.unpack("<Q", r.payload[-8:])[0] == crc64(r.payload[:-8])
    strings = [r for r in records if r.rdb_type == 0 and r.db == 0][:5]
    client = dataset.server.client()
    for r in strings:  # every server accepts a payload of an older RDB version
        client.restore(b"copy:" + r.key, 0, r.payload)
        assert client.get(b"copy:" + r.key) == client.get(r.key)
        client.delete(b"copy:" + r.key)


def test_replication_transfer(dataset: Dataset) -> None:
    """Split the RDB of a full resync as it arrives from the socket."""
    client = dataset.server.client()
    if dataset.flavour != "redis6":  # 6.2 keeps disk-based sync: the `$<len>` framing
        client.config_set("repl-diskless-sync", "yes")
        client.config_set("repl-diskless-sync-delay", 0)
    with socket.create_connection(("127.0.0.1", dataset.server.port), timeout=30) as sock:
        stream = sock.makefile("rb")
        sock.sendall(command(b"REPLCONF", b"capa", b"eof", b"capa", b"psync2"))
        assert stream.readline() == b"+OK\r\n"
        sock.sendall(command(b"PSYNC", b"?", b"-1"))
        assert read_line(stream).startswith(b"+FULLRESYNC ")
        header = read_line(stream)
        splitter = RdbSplitter()
        records: list[KeyRecord | FunctionRecord] = []
        rnd = random.Random(4)
        while not splitter.done:
            data = stream.read1(65536)
            assert data, "connection closed during the RDB transfer"
            cut = rnd.randint(0, len(data))
            records += splitter.feed(data[:cut]) + splitter.feed(data[cut:])
        rest = splitter.take_rest()
        if header.startswith(b"$EOF:"):
            mark = header[5:]
            assert len(mark) == 40
            while len(rest) < 40:
                rest += stream.read1(40 - len(rest))
            assert rest[:40] == mark
        else:
            assert splitter.bytes_consumed == int(header[1:])
    expected = {(r.db, r.key): r.payload for r in keys_of(dataset.records)}
    assert {(r.db, r.key): r.payload for r in keys_of(records)} == expected
    assert splitter.aux.get(b"repl-id") is not None


def command(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%b\r\n" % (len(a), a) for a in args)


def read_line(stream: Any) -> bytes:
    """Read a reply line, skipping the bare newlines a master sends as keep-alives."""
    while True:
        line: bytes = stream.readline()
        assert line, "connection closed"
        if line != b"\n":
            return line.rstrip(b"\r\n")


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_idle_and_freq(flavour: str) -> None:
    with running(flavour) as server:
        c = server.client()
        c.config_set("maxmemory-policy", "allkeys-lfu")
        c.set("hot", "x")
        for _ in range(50):
            c.get("hot")
        freq = c.object("freq", "hot")
        lfu = keys_of(split(save(server))[0])
        assert [(r.key, r.idle) for r in lfu] == [(b"hot", None)]
        assert lfu[0].freq is not None and freq - 1 <= lfu[0].freq <= freq  # may decay a step
        c.config_set("maxmemory-policy", "allkeys-lru")
        c.set("warm", "y")  # "hot" keeps LFU data in its LRU field: its idle time is junk
        lru = {r.key: r for r in keys_of(split(save(server))[0])}
        assert lru[b"warm"].freq is None and lru[b"hot"].freq is None
        idle = lru[b"warm"].idle
        assert idle is not None and 0 <= idle < 60


# --- malformed input ---

def test_truncated_rdb_is_reported(dataset: Dataset) -> None:
    rnd = random.Random(5)
    for cut in [0, 3, 9, 10, len(dataset.rdb) - 9, len(dataset.rdb) - 1,
                *rnd.sample(range(len(dataset.rdb)), 20)]:
        splitter = RdbSplitter()
        splitter.feed(dataset.rdb[:cut])
        assert not splitter.done
        with pytest.raises(RdbError, match=r"truncated .* byte offset \d+"):
            splitter.finish()


def test_checksum(dataset: Dataset) -> None:
    body, checksum = dataset.rdb[:-8], dataset.rdb[-8:]
    assert struct.unpack("<Q", checksum)[0] == crc64(body)
    bad = body + bytes([checksum[0] ^ 1]) + checksum[1:]
    with pytest.raises(RdbError, match=f"checksum mismatch.* byte offset {len(body)}"):
        split(bad, constant(1000))
    records, splitter = split(body + bytes(8))  # zero: saved with rdbchecksum no
    assert splitter.done and records == dataset.records


def test_bytes_after_the_end_are_left(dataset: Dataset) -> None:
    tail = b"+PING\r\n" * 10
    records, splitter = split(dataset.rdb + tail, random_sizes(6, 100_000))
    assert records == dataset.records
    assert splitter.bytes_consumed == len(dataset.rdb)
    assert splitter.take_rest() == tail
    assert splitter.feed(b"more") == [] and splitter.take_rest() == b"more"


def test_crc64_model() -> None:
    assert crc64(b"123456789") == 0xE9C6D914C4B8D9CA


@pytest.mark.parametrize(("data", "message"), [
    (b"HELLO", r"bad RDB magic b'H.* byte offset 0"),
    (b"REDIX0010", r"bad RDB magic"),
    (b"REDISabcd", r"bad RDB magic"),
    (b"REDIS0008\xff", r"unsupported RDB version 8 for magic REDIS"),
    (b"REDIS0013\xff", r"unsupported RDB version 13"),
    (b"VALKEY011\xff", r"unsupported RDB version 11 for magic VALKEY"),
    (b"REDIS0010\x08\x01k\x01v",
     r"unknown opcode or value type 8 .* byte offset 9 \(REDIS RDB version 10\)"),
    (b"REDIS0011\xfe\x00\x16\x01k\x00", r"unknown opcode or value type 22 .* offset 11"),
    (b"REDIS0012\xf3\x00", r"unknown opcode or value type 243"),
    (b"REDIS0011\xf2\x00", r"unknown opcode or value type 242"),
    (b"VALKEY080\xf2\x00", r"Valkey opcode 242 .* not supported at byte offset 9"),
    (b"VALKEY080\x17\x01k\x01v", r"Valkey value type 23 .* not supported"),
    (b"REDIS0010\x06\x01k\x00", r"module value type 6 .* cannot be delimited at byte offset 9"),
    (b"REDIS0010\xf6\x00", r"opcode 246 .* not supported"),
    (b"REDIS0010\xfe\x82", r"invalid length encoding 0x82 at byte offset 10"),
    (b"REDIS0010\x00\xc5k\x01v", r"invalid string encoding 0xc5 at byte offset 10"),
    (b"REDIS0010\x00\xc3\x02\x05\x00a\x00", r"LZF string expands to 1 bytes, expected 5"),
    (b"REDIS0010\xfa\xc3\x04\x05\x00a\x20\x05\x00", r"LZF back reference before the start"),
    (b"REDIS0010\x07\x01k\x01\x09", r"unknown module value opcode 9"),
    (b"REDIS0010\xf7\x01\x01\x00", r"MODULE_AUX with bad when-opcode 1"),
])
def test_malformed_input(data: bytes, message: str) -> None:
    for size in (1, len(data)):  # the same error whichever way the bytes arrive
        splitter = RdbSplitter()
        with pytest.raises(RdbError, match=message):
            split(data + bytes(20), constant(size))[1].finish()
        with pytest.raises(RdbError, match=message):  # the splitter stays failed
            splitter.feed(data + bytes(20))
            splitter.feed(b"\xff")
        with pytest.raises(RdbError):
            splitter.feed(b"")


def test_garbage_never_hangs() -> None:
    rnd = random.Random(8)
    started = time.monotonic()
    for _ in range(300):
        splitter = RdbSplitter()
        try:
            for chunk in (b"REDIS0011", rnd.randbytes(3), rnd.randbytes(50), rnd.randbytes(5000)):
                splitter.feed(chunk)
        except RdbError:
            pass
    assert time.monotonic() - started < 10


# --- formats the test servers cannot write, built by hand ---

def rdb_len(n: int) -> bytes:
    if n < 0x40:
        return bytes([n])
    if n < 0x4000:
        return bytes([0x40 | n >> 8, n & 0xFF])
    if n < 1 << 32:
        return b"\x80" + n.to_bytes(4, "big")
    return b"\x81" + n.to_bytes(8, "big")


def rdb_str(s: bytes) -> bytes:
    return rdb_len(len(s)) + s


def rdb_file(magic: bytes, body: bytes, checksum: bool = True) -> bytes:
    data = magic + body + b"\xff"
    return data + (struct.pack("<Q", crc64(data)) if checksum else bytes(8))


def dump_payload(rdb_type: int, value: bytes, version: int) -> bytes:
    body = bytes([rdb_type]) + value + struct.pack("<H", version)
    return body + struct.pack("<Q", crc64(body))


LISTPACK = b"\x0f\x00\x00\x00\x02\x00\x81a\x02\x81b\x02\xff"  # opaque to the splitter
EXPIRE_AT = 1_900_000_000_000
SYNTHETIC: list[tuple[bytes, list[tuple[int, bytes, int, bytes, int, int | None, int | None]]]] = [
    # Redis 7.4: hashes with field TTLs, SLOT_INFO, plus older opcodes
    (b"REDIS0012", [
        (0, b"h24", 24, struct.pack("<Q", EXPIRE_AT) + rdb_len(2) + rdb_len(0) + rdb_str(b"f")
         + rdb_str(b"v") + rdb_len(5000) + rdb_str(b"g" * 70) + b"\xc0\x05", -1, None, None),
        (0, b"h22", 22, rdb_len(1) + rdb_len(EXPIRE_AT) + rdb_str(b"f") + rdb_str(b"v"),
         EXPIRE_AT, None, None),
        (0, b"h25", 25, struct.pack("<Q", EXPIRE_AT) + rdb_str(LISTPACK), -1, 3, None),
        (2, b"h23", 23, rdb_str(LISTPACK), -1, None, 7),
    ]),
    # Valkey 9: hash with field expiries
    (b"VALKEY080", [
        (0, b"vh", 22, rdb_len(2) + rdb_str(b"f") + rdb_str(b"v") + struct.pack("<q", -1)
         + rdb_str(b"g") + b"\xc1\x00\x01" + struct.pack("<q", EXPIRE_AT), -1, None, None),
        (0, b"s", 0, rdb_str(b"plain"), EXPIRE_AT, None, None),
    ]),
    # module value and every older type written by hand
    (b"REDIS0010", [
        (0, b"mod", 7, rdb_len(0x3F2A) + rdb_len(1) + rdb_len(70000) + rdb_len(2) + rdb_len(5)
         + rdb_len(3) + b"\x00\x00\x80\x3f" + rdb_len(4) + struct.pack("<d", 2.5) + rdb_len(5)
         + rdb_str(b"module string") + rdb_len(0), -1, None, None),
        (0, b"z3", 3, rdb_len(3) + rdb_str(b"a") + b"\x031.5" + rdb_str(b"b") + b"\xfe"
         + rdb_str(b"c") + b"\xff", -1, None, None),
        (0, b"zip", 9, rdb_str(b"\x02\x01a\x01\x00b\xff"), -1, None, None),
        (0, b"l1", 1, rdb_len(3) + rdb_str(b"a") + b"\xc0\x05" + b"\xc3" + rdb_len(5)
         + rdb_len(40) + b"\x00a\xe0\x1e\x00", -1, None, None),
        (0, b"zl", 10, rdb_str(b"opaque ziplist bytes"), -1, None, None),
        (0, b"ql", 14, rdb_len(2) + rdb_str(b"ziplist-1") + rdb_str(b"ziplist-2"), -1, None,
         None),
        (0, b"st15", 15, rdb_len(1) + rdb_str(bytes(16)) + rdb_str(LISTPACK) + rdb_len(2)
         + rdb_len(5) + rdb_len(0) + rdb_len(1) + rdb_str(b"grp") + rdb_len(5) + rdb_len(0)
         + rdb_len(1) + bytes(16) + struct.pack("<Q", 7) + rdb_len(1) + rdb_len(1)
         + rdb_str(b"cons") + struct.pack("<Q", 9) + rdb_len(1) + bytes(16), -1, None, None),
    ]),
]


def synthetic_rdb(magic: bytes, keys: list[tuple[int, bytes, int, bytes, int, int | None,
                                                 int | None]]) -> bytes:
    body = b"\xfa" + rdb_str(b"redis-ver") + rdb_str(b"7.4.0")
    body += b"\xfa" + rdb_str(b"long-aux") + b"\xc3" + rdb_len(5) + rdb_len(40) + b"\x00a\xe0\x1e\x00"
    body += b"\xf7" + rdb_len(0x3F2A) + rdb_len(2) + rdb_len(2) + rdb_len(5) + rdb_str(b"aux")
    body += rdb_len(0)  # MODULE_AUX: module id, when opcode + when, fields, EOF
    if magic.startswith(b"VALKEY"):
        body += b"\xf3" + rdb_str(b"j" * 40) + rdb_len(2) + rdb_len(0) + rdb_len(100)
        body += rdb_len(200) + rdb_len(16383)
    db = -1
    for key_db, key, rdb_type, value, expire, idle, freq in keys:
        if key_db != db:
            db = key_db
            body += b"\xfe" + rdb_len(db) + b"\xfb" + rdb_len(len(keys)) + rdb_len(1)
            body += b"\xf4" + rdb_len(42) + rdb_len(3) + rdb_len(1)
        if expire != -1:
            body += b"\xfc" + struct.pack("<q", expire)
        if idle is not None:
            body += b"\xf8" + rdb_len(idle)
        if freq is not None:
            body += b"\xf9" + bytes([freq])
        body += bytes([rdb_type]) + rdb_str(key) + value
    body += b"\xf5" + rdb_str(LIBRARY.encode())
    return rdb_file(magic, body)


@pytest.mark.parametrize(("magic", "keys"), SYNTHETIC, ids=[m.decode() for m, _ in SYNTHETIC])
def test_synthetic_formats(magic: bytes, keys: list[tuple[int, bytes, int, bytes, int,
                                                          int | None, int | None]]) -> None:
    data = synthetic_rdb(magic, keys)
    version = int(magic.removeprefix(b"REDIS").removeprefix(b"VALKEY"))
    records, splitter = split(data)
    assert splitter.done and splitter.version == version
    assert splitter.aux == {b"redis-ver": b"7.4.0", b"long-aux": b"a" * 40}
    expected: list[KeyRecord | FunctionRecord] = [
        KeyRecord(db, key, t, dump_payload(t, value, version), expire, idle, freq)
        for db, key, t, value, expire, idle, freq in keys]
    expected.append(FunctionRecord(LIBRARY.encode()))
    assert records == expected
    for cut in range(len(data)):  # every split point
        head, tail = RdbSplitter(), data[cut:]
        assert head.feed(data[:cut]) + head.feed(tail) == expected, cut
    assert split(data, constant(1))[0] == expected


def test_old_expire_opcode_and_encoded_keys() -> None:
    body = b"\xfd" + struct.pack("<i", 1_900_000_000) + b"\x00\xc0\x7f" + rdb_str(b"a")
    body += b"\x00\xc1\x00\x80" + rdb_str(b"b")  # int16 -32768
    body += b"\x00\xc2" + struct.pack("<i", -2_000_000_000) + rdb_str(b"c")
    body += b"\x00\xc3" + rdb_len(5) + rdb_len(40) + b"\x00k\xe0\x1e\x00" + rdb_str(b"d")
    records = keys_of(split(rdb_file(b"REDIS0009", body, checksum=False))[0])
    assert [(r.key, r.expire_ms) for r in records] == [
        (b"127", 1_900_000_000_000), (b"-32768", -1), (b"-2000000000", -1), (b"k" * 40, -1)]


def test_huge_value_in_small_chunks_is_linear() -> None:
    """A 200k-field hash fed 64 bytes at a time is parsed once, not once per chunk."""
    fields = b"".join(rdb_str(b"f%d" % i) + rdb_str(b"v%d" % i) for i in range(200_000))
    data = rdb_file(b"REDIS0010", b"\x04" + rdb_str(b"big") + rdb_len(200_000) + fields)
    started = time.process_time()
    records, splitter = split(data, constant(64))
    elapsed = time.process_time() - started
    assert splitter.done
    assert [r.payload for r in keys_of(records)] == [
        dump_payload(4, rdb_len(200_000) + fields, 10)]
    assert elapsed < 5  # quadratic re-parsing would take minutes


# --- big values: decoded and emitted as they arrive -----------------------------------------

def split_big(data: bytes, sizes: Iterator[int] | None = None, **kw: Any) -> tuple[
        list[Record], RdbSplitter, int]:
    """Feed data in chunks, draining big values' backlog after each; return the records,
    the splitter and the most elements any one feed() call returned."""
    splitter = RdbSplitter(**kw)
    records: list[Record] = []
    most = 0
    pos = 0
    while pos < len(data):
        size = next(sizes) if sizes is not None else len(data)
        out = splitter.feed(data[pos:pos + size])
        while True:
            records += out
            most = max(most, sum(len(r.items) for r in out if isinstance(r, BigValueChunk)))
            if not splitter.backlog:
                break
            out = splitter.feed(b"")
        pos += size
    return records, splitter, most


def rebuild(target: redis.Redis[bytes], records: list[Record], *, flavour: str) -> int:
    """Write records to a server: RESTORE for KeyRecords, the chunked commands for big
    values (as the psync reader does); return how many values were big."""
    big: BigKey | None = None
    start: BigValueStart | None = None
    count = 0
    for r in records:
        commands: list[Any] = []
        if isinstance(r, KeyRecord):
            target.execute_command("SELECT", r.db)
            target.restore(r.key, max(r.expire_ms, 0), r.payload, replace=True, absttl=True)
        elif isinstance(r, BigValueStart):
            start = r
            big = BigKey(r.db, r.key, r.kind, task_id="rdb", replace=True, size=r.size,
                         chunk_bytes=5000, chunk_elements=77)
            big.begin(commands)
        elif isinstance(r, BigValueChunk):
            assert big is not None
            big.add_chunk(r.items, commands)
        elif isinstance(r, BigValueEnd):
            assert big is not None and start is not None
            big.finish(max(start.expire_ms, 0), commands, r.stream)
            big = start = None
            count += 1
        for _, db, args in commands:
            target.execute_command("SELECT", db)
            target.execute_command(*args)
    return count


@pytest.mark.parametrize("chunking", ["whole", "4096", "random-small"])
def test_big_values_rebuild_every_key(dataset: Dataset, chunking: str) -> None:
    """With a 2 KiB threshold most values are big: decoded element by element from every
    encoding the flavour writes (LZF strings and quicklist nodes included) and rebuilt by
    commands, they equal the source's values, TTLs and stream groups included."""
    sizes = {"whole": None, "4096": constant(4096), "random-small": random_sizes(6, 64)}
    records, splitter, _ = split_big(dataset.rdb, sizes[chunking], big_value_bytes=2048)
    assert splitter.done and splitter.keys_seen == len(dataset.keys)
    starts = [r for r in records if isinstance(r, BigValueStart)]
    assert len(starts) == splitter.big_values
    kinds = {r.kind for r in starts}
    assert kinds == {"string", "hash", "list", "set", "zset", "stream"}
    assert {r.key for r in starts} >= {b"str:1mb", b"str:lzf-words", b"hash:huge",
                                       b"list:big", b"set:big", b"zset:big", b"stream:groups"}
    with running(dataset.flavour) as target:
        assert rebuild(target.client(), records, flavour=dataset.flavour) == len(starts)
        assert keyspace(target) == dataset.keys   # no temporary key left
        for db, key in dataset.keys:
            source, copy = dataset.server.client(db=db), target.client(db=db)
            assert value_of(copy, key) == value_of(source, key), key
            assert (copy.pttl(key) > 0) == (source.pttl(key) > 0), key


def test_big_values_keep_the_buffer_small(dataset: Dataset) -> None:
    """Fed in 64 KiB chunks with a 256 KiB threshold, the splitter buffers at most the
    threshold (a value found big only once it is) or a streamed string's 1 MiB piece, and
    one feed() never returns more than a window's worth of elements."""
    limit = 256 << 10
    splitter = RdbSplitter(big_value_bytes=limit)
    largest = most = 0
    for pos in range(0, len(dataset.rdb), 65536):
        out = splitter.feed(dataset.rdb[pos:pos + 65536])
        while True:
            largest = max(largest, splitter.buffered)
            most = max(most, sum(len(r.items) for r in out if isinstance(r, BigValueChunk)))
            if not splitter.backlog:
                break
            out = splitter.feed(b"")
    assert splitter.done and splitter.big_values >= 2   # str:1mb, hash:huge
    assert largest <= max(limit, 1 << 20) + 2 * 65536
    assert most <= (256 << 10) // 2   # a 256 KiB window, 2 bytes for the smallest element


def test_big_values_the_filter_does_not_want_are_skipped(dataset: Dataset) -> None:
    records, splitter, _ = split_big(dataset.rdb, constant(65536), big_value_bytes=2048,
                                     want=lambda db, key: key == b"hash:huge")
    assert [r.key for r in records if isinstance(r, (KeyRecord, BigValueStart))] == [
        b"hash:huge"]
    assert splitter.keys_seen == len(dataset.keys) and splitter.done


def listpack(*items: bytes | int) -> bytes:
    """Encode a listpack of short strings and small non-negative ints (7-bit)."""
    body = b""
    for it in items:
        entry = bytes([it]) if isinstance(it, int) else bytes([0x80 | len(it)]) + it
        body += entry + bytes([len(entry)])
    return struct.pack("<IH", 6 + len(body) + 1, len(items)) + body + b"\xff"


def test_big_values_of_hand_built_encodings() -> None:
    """Types the test servers do not write big: quicklist2 PLAIN nodes, old zset (type 3)
    with special scores, old list (type 1), zset2 doubles, an intset."""
    plain = b"P" * 3000
    values = [
        (b"ql2", 18, rdb_len(2) + rdb_len(1) + rdb_str(plain) + rdb_len(2)
         + rdb_str(listpack(b"a", 7, b"bc")), "list", [plain, b"a", b"7", b"bc"]),
        (b"z3", 3, rdb_len(3) + rdb_str(b"a" * 3000) + b"\x031.5" + rdb_str(b"b") + b"\xfe"
         + rdb_str(b"c") + b"\xff", "zset", [b"a" * 3000, b"1.5", b"b", b"inf", b"c", b"-inf"]),
        (b"l1", 1, rdb_len(2) + rdb_str(b"q" * 3000) + b"\xc1\x00\x80", "list",
         [b"q" * 3000, b"-32768"]),
        (b"z5", 5, rdb_len(2) + rdb_str(b"m" * 3000) + struct.pack("<d", 0.1) + rdb_str(b"n")
         + struct.pack("<d", -1e300), "zset", [b"m" * 3000, b"0.1", b"n", b"-1e+300"]),
        (b"is", 11, rdb_str(struct.pack("<II", 8, 600) + b"".join(
            struct.pack("<q", i * 10**12) for i in range(600))), "set",
         [b"%d" % (i * 10**12) for i in range(600)]),
    ]
    body = b"".join(bytes([t]) + rdb_str(key) + value for key, t, value, _, _ in values)
    data = rdb_file(b"REDIS0011", body)
    for sizes in (None, constant(1), constant(100)):
        records, splitter, _ = split_big(data, sizes, big_value_bytes=1024)
        assert splitter.done
        got = []
        for r in records:
            if isinstance(r, BigValueStart):
                got.append((r.key, r.kind, []))
            elif isinstance(r, BigValueChunk):
                got[-1][2].extend(r.items)
        assert got == [(key, kind, items) for key, _, _, kind, items in values]


def test_truncated_big_value_is_reported(dataset: Dataset) -> None:
    cut = dataset.rdb.index(b"hash:huge") + 200_000
    splitter = RdbSplitter(big_value_bytes=2048)
    splitter.feed(dataset.rdb[:cut])
    while splitter.backlog:
        splitter.feed(b"")
    with pytest.raises(RdbError, match="truncated"):
        splitter.finish()
