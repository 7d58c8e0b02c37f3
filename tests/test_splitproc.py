"""A big RDB is split in a helper process (readers/splitproc.py, #12 point 8).

In-process tests run the psync reader and the writer against real servers with the
hand-over point lowered to 64 KiB (and the big-value threshold to 64 KiB, so big values
cross the pipe window by window); daemon tests use the daemon's 1 MiB hand-over point on
RDBs of 12-20 MB of random values under a bandwidth limit of a few MB/s, so the reader
is still reading when its helper comes up however busy the machine (a smaller RDB can be
split whole in the event loop first): a resync's stale-key cleanup, a kill -9 and a pause
while a helper works, a cluster source's shards, the rdb_processes setting, a corrupt or
truncated RDB file.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis

from cdcd.entry import restore_entry
from cdcd.markers import slot_tags
from cdcd.rdb import BigValueChunk, BigValueEnd, BigValueStart, RdbSplitter
from cdcd.readers import splitproc
from cdcd.readers.splitproc import RdbFeed

from .cluster import Cluster
from .compare import BIN, assert_same, fill_bulk, fill_mixed, wait_same
from .daemon import Daemon, endpoint, spec
from .load import Load
from .servers import FLAVOURS, RedisServer, wait_for
from .test_bigkeys import BIG_KEYS, copy, fill_big, renames

Servers = Callable[..., RedisServer]
HANDED = "RDB splitting goes on in helper process"
# The default (-1) is one helper per CPU beyond two: none on a 2-core machine.
HELPERS = {"CDCD_RDB_PROCESSES": "4"}


@pytest.fixture
def daemon(daemon_factory: Callable[..., Daemon]) -> Daemon:
    """A daemon that hands big RDBs to helpers, whatever the machine's CPUs."""
    return daemon_factory(env=HELPERS)


@pytest.fixture
def small_handover(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Hand every RDB over after 64 KiB, waiting for the helper to be up."""
    monkeypatch.setattr(splitproc, "HANDOVER_BYTES", 64 << 10)
    monkeypatch.setattr(splitproc, "max_helpers", 4)
    monkeypatch.setattr(RdbFeed, "wait_for_helper", True)
    yield


def fill_strings(server: RedisServer, n: int) -> None:
    """Plain strings of each RDB encoding (short, 14-bit and 32-bit lengths, integers,
    LZF-compressed), some with a TTL, in db 0 and db 3."""
    rnd = random.Random(7)
    for db in (0, 3):
        p = server.client(db).pipeline(transaction=False)
        for i in range(n):
            k = b"s:%d:%d" % (db, i)
            m = i % 7
            if m == 0:
                p.set(k, rnd.randbytes(20))
            elif m == 1:
                p.set(k, rnd.randbytes(300))                  # 14-bit length
            elif m == 2:
                p.set(k, b"%d" % (i * 7919 - 50_000))         # integer encoded
            elif m == 3:
                p.set(k, b"x" * (100 + i % 50))               # LZF, short lengths
            elif m == 4:
                p.set(k, b"ab" * 5000)                        # LZF, longer lengths
            elif m == 5:
                p.set(k, rnd.randbytes(20), px=600_000)       # a TTL: stays a RESTORE
            else:
                p.set(k, rnd.randbytes(17_000))               # 32-bit length
            if i % 500 == 499:
                p.execute()
        p.execute()


def fill_random(c: redis.Redis[bytes], n: int, size: int, prefix: bytes = b"r:") -> None:
    """n strings of ``size`` random bytes (LZF cannot shrink them)."""
    rnd = random.Random(11)
    p = c.pipeline(transaction=False)
    for i in range(n):
        p.set(b"%s%d" % (prefix, i), rnd.randbytes(size))
        if i % 2000 == 1999:
            p.execute()
    p.execute()


def helper_pids(parent: int | None = None) -> list[int]:
    """The helper processes of ``parent`` (a daemon; this process by default)."""
    try:
        children = psutil.Process(parent).children()
    except psutil.NoSuchProcess:
        return []
    out = []
    for p in children:
        try:
            if "cdcd.readers.splitproc" in " ".join(p.cmdline()):
                out.append(p.pid)
        except psutil.NoSuchProcess:
            pass
    return out


def alive(pids: list[int]) -> bool:
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            pass
    return False


# --- the splitter's state, handed over -----------------------------------------------------

def canonical(records: list[Any]) -> list[Any]:
    """Records as comparable values, a big value's chunks joined (how its elements fall
    into windows depends on how the bytes came)."""
    out: list[Any] = []
    for rec in records:
        if isinstance(rec, BigValueStart):
            out.append(["big", rec.db, rec.key, rec.kind, rec.size, rec.expire_ms, []])
        elif isinstance(rec, BigValueChunk):
            out[-1][-1].extend(rec.items)
        elif isinstance(rec, BigValueEnd):
            if out[-1][3] == "string":     # its pieces cut where the bytes were
                out[-1][-1] = b"".join(out[-1][-1])
            out.append(("end", rec.stream))
        else:
            out.append(rec)
    return out


def test_suspended_splitter_goes_on_exactly(servers: Servers) -> None:
    """Split an RDB whole, and again suspended (pickled, resumed) after every chunk where
    that is possible: the same records, the same end."""
    src = servers()
    c = src.client()
    fill_mixed(c, big=False)
    fill_strings(src, 300)
    c.save()
    data = (Path(src.dir) / "dump.rdb").read_bytes()
    whole = RdbSplitter(key_record=restore_entry, big_value_bytes=4096)
    expected = whole.feed(data)
    assert whole.done
    for chunk in (1, 7, 100, 4096):
        got: list[Any] = []
        splitter = RdbSplitter(key_record=restore_entry, big_value_bytes=4096)
        handed = 0
        for i in range(0, len(data), chunk):
            got += splitter.feed(data[i:i + chunk])
            while splitter.backlog:
                got += splitter.feed(b"")
            state = splitter.suspend()
            if state is not None:
                handed += 1
                splitter = RdbSplitter.resume(pickle.loads(pickle.dumps(state)),
                                              key_record=restore_entry)
        assert splitter.done and handed >= 5
        assert splitter.keys_seen == whole.keys_seen
        assert canonical(got) == canonical(expected), chunk


# --- in-process: the reader and the writer, a helper splitting -------------------------------

@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_helper_copies_every_type_exactly(flavour: str, servers: Servers,
                                                small_handover: None,
                                                caplog: pytest.LogCaptureFixture) -> None:
    src, dst = servers(flavour), servers(flavour)
    c, d = src.client(), dst.client()
    fill_big(c)
    fill_mixed(c, big=False)
    fill_strings(src, 2000)
    d.set(b"big:set", b"a string the copy replaces")
    caplog.set_level(logging.INFO, "cdcd.reader.splitproc")
    progress = await copy("psync", src, dst)
    assert HANDED in caplog.text
    for db in (0, 3):
        assert_same(src.client(db), dst.client(db))
    assert renames(d) >= len(BIG_KEYS), "big values still go through a temporary key"
    assert progress.keys_done == c.dbsize() + src.client(3).dbsize()
    # plain strings went as MSETs, the rest as RESTOREs
    stats = d.info("commandstats")
    assert stats["cmdstat_mset"]["calls"] > 0 and stats["cmdstat_restore"]["calls"] > 0
    assert not helper_pids()


async def test_helper_keeps_existing_keys_skip(servers: Servers, small_handover: None,
                                               caplog: pytest.LogCaptureFixture) -> None:
    src, dst = servers(), servers()
    c, d = src.client(), dst.client()
    fill_strings(src, 1500)
    mine = {b"s:0:3": b"target's", b"s:0:10": b"target's too"}
    d.mset(mine)
    caplog.set_level(logging.INFO, "cdcd.reader.splitproc")
    await copy("psync", src, dst, existing_keys="skip")
    assert HANDED in caplog.text
    for key, value in mine.items():
        assert d.get(key) == value
    assert_same(c, d, keys=[k for k in c.scan_iter(count=1000) if k not in mine])


async def test_helper_with_filters_and_rewrite(servers: Servers, small_handover: None,
                                               caplog: pytest.LogCaptureFixture) -> None:
    from cdcd.compat import WritePlan, server_version
    src, dst = servers("redis7"), servers("redis6")
    c = src.client()
    fill_strings(src, 1500)
    fill_mixed(c, big=False)
    target = server_version({k: str(x) for k, x in dst.client().info("server").items()})
    plan = WritePlan(mode="rewrite", reason="test", target=target)
    caplog.set_level(logging.INFO, "cdcd.reader.splitproc")
    await copy("psync", src, dst, plan=plan, filter={"include_prefixes": ["s:", "hash:"],
                                                     "dbs": [0]})
    assert HANDED in caplog.text
    wanted = [k for k in c.scan_iter(count=1000) if k.startswith((b"s:", b"hash:"))]
    assert sorted(dst.client().scan_iter(count=1000)) == sorted(wanted)
    assert_same(c, dst.client(), keys=wanted)
    assert dst.client(3).dbsize() == 0


# --- the real daemon -------------------------------------------------------------------------

def handovers(daemon: Daemon) -> int:
    return daemon.log_text().count(HANDED)


def splitting(d: Daemon, task_id: str, src: RedisServer, dst: RedisServer, keys: int,
              mb: int) -> list[int]:
    """An incremental task copying ``keys`` random 200-byte values at ``mb`` MB/s, once its
    RDB is in a helper's hands: the helpers' pids."""
    fill_random(src.client(), keys, 200)
    d.ok("create", spec(src, dst, task_id=task_id, bandwidth_limit_mb=mb, reader="psync",
                        migration_method="incremental_migration"))
    wait_for(lambda: handovers(d) == 1, 60, what="the RDB handed over")
    time.sleep(0.5)
    assert d.proc is not None
    helpers = helper_pids(d.proc.pid)
    assert helpers
    return helpers


def test_resync_through_a_helper_removes_only_stale_keys(servers: Servers,
                                                          daemon: Daemon) -> None:
    """A resync's cleanup removes the target's keys that the new RDB lacks: the keys that
    came from the helper (plain strings joined into MSETs too) count as present."""
    src, dst = servers(), servers()
    c, d = src.client(), dst.client()
    fill_random(c, 70_000, 200)
    fill_strings(src, 300)
    daemon.ok("create", spec(src, dst, task_id="rs", reader="psync", bandwidth_limit_mb=4,
                             migration_method="incremental_migration"))
    wait_for(lambda: daemon.task("rs")["phase"] == "incremental", 60, what="stream phase")
    assert handovers(daemon) == 1
    d.set(b"stale", b"only on the target")
    d.delete(b"r:17")
    daemon.ok("resync", {"task_id": "rs"})
    wait_for(lambda: handovers(daemon) == 2, 60, what="the resync's RDB handed over")
    c.incr(b"after")
    wait_for(lambda: d.get(b"after") == b"1", 60, what="the stream after the resync")
    wait_for(lambda: d.get(b"stale") is None, 30, what="the stale key removed")
    for db in (0, 3):
        wait_same(src.client(db), dst.client(db), timeout=30)


def test_kill_9_while_a_helper_splits(servers: Servers,
                                      daemon_factory: Callable[..., Daemon]) -> None:
    """The daemon dies while its helper splits: the helper exits with its input, and the
    restarted daemon copies again, exactly, with writes going on."""
    src, dst = servers(), servers()
    c = src.client()
    d = daemon_factory(env=HELPERS)
    helpers = splitting(d, "k9", src, dst, 100_000, 4)    # 20 MB, more than the pipeline holds
    d.kill()
    wait_for(lambda: not alive(helpers), 10, what="the orphaned helper exiting")
    with Load(lambda db: src.client(db), dbs=(0,), kinds="counters+lists") as load:
        d.start()
        d.ok("update", {"task_id": "k9", "bandwidth_limit_mb": None})
        wait_for(lambda: d.task("k9")["phase"] == "incremental", 90, what="stream phase")
        wait_for(lambda: load.ops > 2000, 30, what="writes during the stream")
    wait_same(c, dst.client(), timeout=60)


def test_cluster_shards_each_get_a_helper_up_to_the_setting(
        daemon_factory: Callable[..., Daemon], servers: Servers) -> None:
    """A 3-shard source under load into a standalone target, exact; at most rdb_processes
    helpers at once (here 2), the other shard split in the event loop."""
    cluster = Cluster(replicas=0).start()
    try:
        tags = slot_tags()
        rnd = random.Random(2)
        for i, m in enumerate(cluster.masters):   # 5 MB each, straight into its master
            first = i * (16384 // 3)
            p = m.client().pipeline(transaction=False)
            for j in range(25_000):
                p.set(b"{" + tags[first + j % 5000] + b"}:%d" % j, rnd.randbytes(200))
                if j % 2000 == 1999:
                    p.execute()
            p.execute()
        dst = servers()
        d = daemon_factory(env={"CDCD_RDB_PROCESSES": "2"})
        with Load(lambda db: cluster.client(), dbs=(0,), kinds="counters+lists") as load:
            d.ok("create", {"task_id": "cs", "source": {"addrs": cluster.addrs},
                            "target": endpoint(dst), "bandwidth_limit_mb": 4,
                            "migration_method": "incremental_migration"})
            wait_for(lambda: handovers(d) >= 1, 60, what="an RDB handed over")
            most = 0
            assert d.proc is not None
            while d.task("cs")["phase"] != "incremental":
                most = max(most, len(helper_pids(d.proc.pid)))
                time.sleep(0.05)
            wait_for(lambda: load.ops > 1000, 30, what="writes during the stream")
        assert 1 <= most <= 2, most
        wait_same(cluster.client(), dst.client(), timeout=60)
    finally:
        cluster.stop()


def test_rdb_processes_0_splits_in_the_daemon(servers: Servers,
                                              daemon_factory: Callable[..., Daemon]) -> None:
    src, dst = servers(), servers()
    fill_bulk(src.client(), 80_000, value_size=40)
    d = daemon_factory(env={"CDCD_RDB_PROCESSES": "0"})
    d.ok("create", spec(src, dst, task_id="zero", reader="psync"))
    d.wait_state("zero", "Succeeded", timeout=60)
    assert handovers(d) == 0
    assert_same(src.client(), dst.client())
    assert "RDB helper processes: up to 0 at once (rdb_processes 0" in d.log_text()


def test_rdb_processes_default_is_one_per_cpu_beyond_two(
        daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory()
    cpus = os.cpu_count() or 1
    assert (f"RDB helper processes: up to {max(0, cpus - 2)} at once (rdb_processes -1, "
            f"{cpus} CPUs)") in d.log_text()


def test_corrupt_and_truncated_rdb_files_through_a_helper(servers: Servers, daemon: Daemon,
                                                          tmp_path: Path) -> None:
    """The helper's parse error fails the task naming it; a file ending early too."""
    src, dst = servers(), servers()
    c = src.client()
    fill_random(c, 60_000, 200)
    c.save()
    data = (Path(src.dir) / "dump.rdb").read_bytes()
    assert len(data) > 3 * splitproc.HANDOVER_BYTES
    # a byte inside the value stored last of a sample (where keys lie in the file depends
    # on the server's hash seed): only the checksum can tell
    at = max(data.find(v) for v in c.mget([b"r:%d" % i for i in range(0, 60_000, 500)]))
    assert at > len(data) // 2
    bad = bytearray(data)
    bad[at + 100] ^= 0xFF
    corrupt = tmp_path / "corrupt.rdb"
    corrupt.write_bytes(bytes(bad))
    short = tmp_path / "short.rdb"
    short.write_bytes(data[:len(data) * 19 // 20])
    for name, path, said in (("corrupt", corrupt, "checksum"), ("short", short, "truncated")):
        daemon.ok("create", {"task_id": name, "source": {"rdb_file": str(path)},
                             "target": endpoint(dst), "bandwidth_limit_mb": 4})
        view = daemon.wait_state(name, "Failed", timeout=60)
        assert said in view["reason"].lower(), view["reason"]
        daemon.ok("delete", {"task_id": name})
    assert handovers(daemon) == 2
    assert daemon.proc is not None and not helper_pids(daemon.proc.pid)


def test_binary_keys_and_dbs_through_a_helper(servers: Servers, daemon: Daemon) -> None:
    src, dst = servers("valkey8"), servers()
    c = src.client()
    fill_random(c, 70_000, 200, prefix=BIN)
    fill_strings(src, 500)
    daemon.ok("create", spec(src, dst, task_id="bin", db_mapping={"3": 5}, reader="psync",
                             bandwidth_limit_mb=4))
    daemon.wait_state("bin", "Succeeded", timeout=60)
    assert handovers(daemon) == 1
    assert_same(c, dst.client())
    assert_same(src.client(3), dst.client(5))


def test_pause_while_a_helper_splits(servers: Servers, daemon: Daemon) -> None:
    """A reader stopped while its helper's output waits unread (the writer held back by a
    bandwidth limit) ends promptly, its helper too; resumed, the copy is exact."""
    src, dst = servers(), servers()
    helpers = splitting(daemon, "p", src, dst, 70_000, 2)
    daemon.ok("pause", {"task_id": "p"})
    daemon.wait_state("p", "Paused", timeout=10)
    wait_for(lambda: not alive(helpers), 10, what="the helper ended")
    daemon.ok("update", {"task_id": "p", "bandwidth_limit_mb": None})
    daemon.ok("resume", {"task_id": "p"})
    wait_for(lambda: daemon.task("p")["phase"] == "incremental", 90, what="stream phase")
    wait_same(src.client(), dst.client(), timeout=60)
