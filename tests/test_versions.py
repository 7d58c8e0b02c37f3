"""Any version to any version: write_mode restore / rewrite / auto between Redis 6.2, the
machine's Redis (7.0 or newer) and Valkey 8.1, in every direction, with both readers.

The daemon tests copy the mixed dataset (every type and encoding, TTLs, binary keys,
streams with groups, consumers and pending entries, three dbs) and compare key by key;
the in-process tests lower the big-value threshold so big keys of every type take the
chunked path too.
"""

from __future__ import annotations

import itertools
import os
import random
import subprocess
import time
from collections.abc import Callable
from typing import Any

import pytest

from cdcd.compat import WritePlan, server_version
from cdcd.errors import FatalTaskError
from cdcd.precheck import Check, field_ttl_check, run_prechecks
from cdcd.progress import Progress
from cdcd.rdb.values import ValueNotRewritable, decode_payload, decode_value, module_name
from cdcd.readers.rewrite import Rewriter
from cdcd.resp import parse_info
from cdcd.spec import parse_spec

from .cluster import running_cluster
from .compare import assert_same, fill_mixed, wait_same
from .daemon import Daemon, spec
from .load import Load
from .servers import FLAVOURS, RedisServer, wait_for
from .test_bigkeys import copy, fill_big
from .test_cluster_target import big_list
from .test_incremental import converge

Servers = Callable[..., RedisServer]

PAIRS = list(itertools.permutations(FLAVOURS, 2))
READERS = ("psync", "scan")


def rdb_of(server: RedisServer) -> tuple[str, int]:
    v = server_version({k: str(x) for k, x in server.client().info("server").items()})
    assert v.rdb is not None
    return v.product, v.rdb


def needs_rewrite(src: RedisServer, dst: RedisServer) -> bool:
    """What the servers' RDB versions say (a table independent of cdcd.compat's code)."""
    (_, s), (product, d) = rdb_of(src), rdb_of(dst)
    return s > d or (product == "valkey" and 12 <= s <= 79)


def fill(c: Callable[[int], Any]) -> None:
    fill_mixed(c(0), big=False)
    fill_mixed(c(1), big=False, tag=b"@db1")
    c(2).set(b"only-in-db2", b"x")
    c(2).zadd(b"z", {b"a": 1.5})


def assert_copied(src: RedisServer, dst: RedisServer) -> None:
    for db in range(3):
        assert_same(src.client(db), dst.client(db))


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize(("src_flavour", "dst_flavour"), PAIRS)
def test_full_copy_between_versions(src_flavour: str, dst_flavour: str, reader: str,
                                    daemon: Daemon, servers: Servers) -> None:
    src, dst = servers(src_flavour), servers(dst_flavour)
    fill(src.client)
    tid = daemon.create(spec(src, dst, reader=reader))
    t = daemon.wait_state(tid, "Succeeded", timeout=120)
    assert_copied(src, dst)
    mode = "rewrite" if needs_rewrite(src, dst) else "restore"
    assert t["write_mode"]["mode"] == mode, t["write_mode"]
    check = {c["name"]: c for c in t["prechecks"]}["dump_compatibility"]
    assert check["status"] == "ok" and check["message"].startswith(f"write_mode {mode}: ")
    if mode == "rewrite":
        assert "refuses DUMP payloads" in t["write_mode"]["reason"]
    keys = sum(src.client(db).dbsize() for db in range(3))
    assert t["progress"]["snapshot"]["keys_done"] == keys


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_rewrite_between_equal_versions_matches_restore(flavour: str, reader: str,
                                                        daemon: Daemon,
                                                        servers: Servers) -> None:
    src, restored, rewritten = servers(flavour), servers(flavour), servers(flavour)
    fill(src.client)
    a = daemon.create(spec(src, restored, reader=reader, write_mode="restore"))
    b = daemon.create(spec(src, rewritten, reader=reader, write_mode="rewrite"))
    assert daemon.wait_state(a, "Succeeded", timeout=120)["write_mode"]["mode"] == "restore"
    t = daemon.wait_state(b, "Succeeded", timeout=120)
    assert t["write_mode"] == {"mode": "rewrite", "reason": "asked for in the task spec"}
    for db in range(3):
        assert_same(restored.client(db), rewritten.client(db))
    assert_copied(src, rewritten)
    # written as commands: no RESTORE ran on the rewritten target
    stats = rewritten.client().info("commandstats")
    assert "cmdstat_restore" not in stats and "cmdstat_restore-asking" not in stats


@pytest.mark.parametrize("reader", READERS)
def test_valkey_into_an_older_redis_cluster_is_rewritten(reader: str, daemon: Daemon,
                                                         servers: Servers) -> None:
    """Rewritten values reach a cluster target's masters by slot (each key's MULTI block
    goes to its master)."""
    src = servers("valkey8")
    fill_mixed(src.client(), big=False)
    with running_cluster("redis6", replicas=0) as cluster:
        tid = daemon.create(spec(src, cluster.addrs, reader=reader))
        t = daemon.wait_state(tid, "Succeeded", timeout=90)
        assert t["write_mode"]["mode"] == "rewrite"
        assert_same(src.client(), cluster.client())


@pytest.mark.parametrize("reader", READERS)
def test_big_keys_over_the_daemons_threshold_into_an_older_target(reader: str,
                                                                  daemon: Daemon,
                                                                  servers: Servers) -> None:
    """The real daemon's 8 MiB threshold: a 9 MB list and a 9 MB hash go down the chunked
    path into Redis 6.2, the rest as commands."""
    src, dst = servers("valkey8"), servers("redis6")
    fill_mixed(src.client(), big=False)
    big_list(src.client())
    c = src.client()
    for i in range(0, 90_000, 10_000):
        c.hset(b"big:hash", mapping={b"f%d" % j: os.urandom(100) for j in range(i, i + 10_000)})
    c.pexpire(b"big:hash", 3_600_000)
    tid = daemon.create(spec(src, dst, reader=reader))
    t = daemon.wait_state(tid, "Succeeded", timeout=120)
    assert t["write_mode"]["mode"] == "rewrite"
    assert_same(src.client(), dst.client())
    assert "big list b'big:list'" in daemon.log_text()     # the chunked path, both readers


def test_write_mode_restore_into_an_older_target_fails_naming_both(daemon: Daemon,
                                                                   servers: Servers) -> None:
    src, dst = servers("redis7"), servers("redis6")
    src.client().set(b"k", b"v")
    tid = daemon.create(spec(src, dst, write_mode="restore"))
    t = daemon.wait_state(tid, "Failed", timeout=60)
    assert "refuses DUMP payloads of RDB" in t["reason"] and "6.2" in t["reason"]
    assert "write_mode is restore" in t["reason"]
    assert dst.client().dbsize() == 0


def test_write_mode_is_validated(daemon: Daemon, servers: Servers) -> None:
    src, dst = servers(), servers()
    status, body = daemon.api("create", spec(src, dst, write_mode="dump"))
    assert status == 400
    assert "write_mode: must be one of auto, restore, rewrite" in body["message"]


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize(("src_flavour", "dst_flavour"),
                         [p for p in PAIRS if p[0] != "redis6"] + [("redis6", "redis6")])
async def test_big_keys_rewritten_exactly(src_flavour: str, dst_flavour: str, reader: str,
                                          servers: Servers) -> None:
    """Big values of every type (chunked path) and small ones (direct path), rewritten."""
    src, dst = servers(src_flavour), servers(dst_flavour)
    fill_big(src.client())
    fill_mixed(src.client(), big=False)
    target = server_version({k: str(x) for k, x in dst.client().info("server").items()})
    plan = WritePlan(mode="rewrite", reason="test", target=target)
    progress = await copy(reader, src, dst, plan=plan)
    assert_same(src.client(), dst.client())
    assert progress.keys_done == src.client().dbsize()


async def test_rewrite_with_existing_keys_skip_keeps_the_targets(servers: Servers) -> None:
    src, dst = servers("redis7"), servers("redis6")
    fill_mixed(src.client(), big=False)
    d = dst.client()
    d.set(b"hash:small", b"the target's")
    d.rpush(b"str:int", b"the target's")
    target = server_version({k: str(x) for k, x in d.info("server").items()})
    plan = WritePlan(mode="rewrite", reason="test", target=target)
    await copy("psync", src, dst, plan=plan, existing_keys="skip")
    assert d.get(b"hash:small") == b"the target's"
    assert d.lrange(b"str:int", 0, -1) == [b"the target's"]
    kept = {b"hash:small", b"str:int"}
    others = [k for k in src.client().scan_iter() if k not in kept]
    assert_same(src.client(), d, keys=others)
    assert not [k for k in d.scan_iter(b"cdcd:tmp:*")]


def newer_commands(c: Any, i: int) -> None:
    """Commands whose replicated form an older target may lack: expiry conditions, stream
    counters, consumer groups read and claimed, pops of several keys, Valkey's SET IFEQ,
    sharded PUBLISH (each where the source has it)."""
    version = c.info("server")
    valkey = "valkey_version" in version or version.get("server_name") == "valkey"
    major = int(str(version.get("valkey_version" if valkey else "redis_version")).split(".")[0])
    c.set(f"exp:{i}", "v")
    c.expire(f"exp:{i}", 1000)
    if major >= 7:
        c.expire(f"exp:{i}", 2000, gt=True)
        c.expire(f"exp:{i}", 10, nx=True)           # not applied: not propagated
        c.rpush(f"mpop:{i}", *range(5))
        c.execute_command("LMPOP", 1, f"mpop:{i}", "LEFT", "COUNT", 2)
        c.execute_command("SPUBLISH", "chan", "m")
    c.xadd(f"xs:{i}", {"f": i}, id=f"{i + 1}-1")
    if major >= 7:
        c.execute_command("XGROUP", "CREATE", f"xs:{i}", "g", "0", "ENTRIESREAD", "0")
        c.execute_command("XSETID", f"xs:{i}", f"{i + 1}-5", "ENTRIESADDED", "3",
                          "MAXDELETEDID", "0-1")
    else:
        c.xgroup_create(f"xs:{i}", "g", id="0")
    c.xreadgroup("g", "alice", {f"xs:{i}": ">"})
    c.xautoclaim(f"xs:{i}", "g", "bob", 0, "0-0")
    if valkey and version["valkey_version"] >= "8.1":
        c.set(f"ifeq:{i}", "a")
        c.execute_command("SET", f"ifeq:{i}", "b", "IFEQ", "a")
        c.execute_command("SET", f"ifeq:{i}", "c", "IFEQ", "zzz")   # not applied


@pytest.mark.parametrize(("src_flavour", "dst_flavour"), PAIRS)
def test_incremental_between_versions(src_flavour: str, dst_flavour: str, daemon: Daemon,
                                      servers: Servers) -> None:
    src, dst = servers(src_flavour), servers(dst_flavour)
    fill(src.client)
    daemon.ok("create", spec(src, dst, task_id="inc", reader="psync",
                             migration_method="incremental_migration"))
    wait_for(lambda: daemon.task("inc")["phase"] == "incremental", 60, what="stream phase")
    with Load(src.client, dbs=(0, 1, 2), max_ops=200_000) as load:
        for i in range(30):
            newer_commands(src.client(i % 3), i)
        wait_for(lambda: load.ops > 3000, 60, what="load during the stream phase")
    converge(src, dst, daemon, "inc")
    t = daemon.task("inc")
    assert t["state"] == "Running"
    assert t["write_mode"]["mode"] == ("rewrite" if needs_rewrite(src, dst) else "restore")


def test_replicated_restores_into_an_older_target_are_rewritten(daemon: Daemon,
                                                                 servers: Servers) -> None:
    """A RESTORE on the source (an app's DUMP/RESTORE, a MIGRATE into it) is replicated
    with the source's payload, which the older target refuses: written as commands."""
    src, dst = servers("redis7"), servers("redis6")
    fill(src.client)
    daemon.ok("create", spec(src, dst, task_id="r", reader="psync",
                             migration_method="incremental_migration"))
    wait_for(lambda: daemon.task("r")["phase"] == "incremental", 60, what="stream phase")
    c = src.client()
    for key in (b"hash:large", b"zset:small", b"stream:s", b"list:small", b"str:raw"):
        payload = c.dump(key)
        c.restore(b"copy:" + key, 0, payload)
        c.restore(b"ttl:" + key, 600_000, payload)
        c.restore(b"abs:" + key, int(time.time() * 1000) + 900_000, payload, absttl=True)
        c.restore(b"set:small", 0, payload, replace=True)     # replaces another type
    converge(src, dst, daemon, "r")
    assert daemon.task("r")["state"] == "Running"


def test_scan_reader_notifications_into_an_older_target(daemon: Daemon,
                                                         servers: Servers) -> None:
    """The keyspace-notification feed re-copies changed keys: as commands into 6.2."""
    src, dst = servers("valkey8", args=["--notify-keyspace-events", "KA"]), servers("redis6")
    fill(src.client)
    daemon.ok("create", spec(src, dst, task_id="n", reader="scan",
                             migration_method="incremental_migration"))
    wait_for(lambda: daemon.task("n")["phase"] == "incremental", 60, what="stream phase")
    c = src.client()
    c.hset(b"hash:small", mapping={b"new": b"field"})
    c.zadd(b"zset:small", {b"late": 9.5})
    c.xadd(b"stream:s", {b"f": b"late"}, id=b"2-1")
    c.set(b"str:int", b"7", px=600_000)
    c.delete(b"list:small")
    src.client(1).rpush(b"list:large", b"tail")
    for db in range(3):
        wait_same(src.client(db), dst.client(db), timeout=30)
    t = daemon.task("n")
    assert t["state"] == "Running" and t["write_mode"]["mode"] == "rewrite"


def test_incremental_into_an_older_cluster(daemon: Daemon, servers: Servers) -> None:
    """Valkey 8.1 into a Redis 6.2 cluster: rewritten snapshot values and translated
    stream commands routed by slot."""
    src = servers("valkey8")
    fill_mixed(src.client(), big=False)
    with running_cluster("redis6", replicas=0) as cluster:
        daemon.ok("create", spec(src, cluster.addrs, task_id="ci", reader="psync",
                                 migration_method="incremental_migration"))
        wait_for(lambda: daemon.task("ci")["phase"] == "incremental", 60, what="stream phase")
        with Load(src.client, dbs=(0,), max_ops=100_000) as load:
            for i in range(20):
                newer_commands(src.client(), i)
            wait_for(lambda: load.ops > 2000, 60, what="load during the stream phase")
        markers = list(cluster.client().scan_iter(b"cdcd:*"))
        wait_same(src.client(), cluster.client(), timeout=60, ignore=markers)
        t = daemon.task("ci")
        assert t["state"] == "Running" and t["write_mode"]["mode"] == "rewrite"


def test_a_command_the_older_target_lacks_stops_the_task_naming_it(daemon: Daemon,
                                                                     servers: Servers) -> None:
    src, dst = servers("redis7"), servers("redis6")
    src.client().set(b"k", b"v")
    daemon.ok("create", spec(src, dst, task_id="fn", reader="psync",
                             migration_method="incremental_migration"))
    wait_for(lambda: daemon.task("fn")["phase"] == "incremental", 60, what="stream phase")
    src.client().function_load("#!lua name=mylib\n"
                               "redis.register_function('f', function() return 1 end)")
    t = daemon.wait_state("fn", "Failed", timeout=60)
    assert "replicated command 'FUNCTION LOAD" in t["reason"], t["reason"]
    assert "Redis 6.2" in t["reason"] and "has no functions" in t["reason"]
    assert dst.client().get(b"k") == b"v"


LIB = "#!lua name=%s\nredis.register_function('%s', function() return 1 end)"


async def test_functions_into_6_2_are_a_precheck_error_listing_them(servers: Servers) -> None:
    src, dst = servers("redis7"), servers("redis6")
    for name in ("mylib", "other"):
        src.client().function_load(LIB % (name, name + "_f"))

    async def check(**kw: Any) -> dict[str, str]:
        data = spec(src, dst, **{"reader": "psync", **kw})
        checks = await run_prechecks(parse_spec(data))
        return {c.name: c for c in checks}["source.functions"].to_json()

    c = await check()
    assert c["status"] == "error", c
    assert "holds 2 function libraries (mylib, other)" in c["message"]
    assert "Redis 6.2" in c["message"] and '"functions": "skip"' in c["message"]
    c = await check(functions="skip")
    assert c["status"] == "warning" and "not copied (functions is skip)" in c["message"]
    c = await check(reader="scan")
    assert c["status"] == "error"
    # a target with functions takes them
    c = {x.name: x for x in await run_prechecks(parse_spec(spec(src, servers("valkey8"),
                                                                reader="psync")))}
    assert c["source.functions"].status == "ok" and "copied" in c["source.functions"].message


def test_functions_skip_copies_the_data_without_them(daemon: Daemon, servers: Servers) -> None:
    src, dst = servers("redis7"), servers("redis6")
    src.client().function_load(LIB % ("mylib", "f"))
    src.client().set(b"k", b"v")
    daemon.ok("create", spec(src, dst, task_id="fs", reader="psync", functions="skip",
                             migration_method="incremental_migration"))
    wait_for(lambda: daemon.task("fs")["phase"] == "incremental", 60, what="stream phase")
    src.client().function_load(LIB % ("later", "g"))      # in the stream: left out too
    src.client().set(b"after", b"1")
    converge(src, dst, daemon, "fs")
    t = daemon.task("fs")
    assert t["state"] == "Running" and t["spec"]["functions"] == "skip"
    checks = {c["name"]: c for c in t["prechecks"]}
    assert checks["source.functions"]["status"] == "warning"


def test_functions_are_copied_into_a_target_that_has_them(daemon: Daemon,
                                                          servers: Servers) -> None:
    src, dst = servers("valkey8"), servers("redis7")
    src.client().function_load(LIB % ("mylib", "f"))
    tid = daemon.create(spec(src, dst, reader="psync"))
    t = daemon.wait_state(tid, "Succeeded", timeout=60)
    assert t["write_mode"]["mode"] == "rewrite"
    assert [lib[lib.index(b"library_name") + 1]
            for lib in dst.client().function_list()] == [b"mylib"]


def check_rdb(server: RedisServer, path: str) -> None:
    """Run the server's own redis-check-rdb on a file (the server binary checks RDB files
    when it is called by that name)."""
    link = server.dir / "redis-check-rdb"
    if not link.exists():
        link.symlink_to(server.bin)
    run = subprocess.run([str(link), path], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "RDB looks OK" in run.stdout, run.stdout[-2000:]


def bgsave(server: RedisServer) -> str:
    """Save the server's dataset with BGSAVE, check the file; return its path."""
    c = server.client()
    assert c.info("persistence")["rdb_changes_since_last_save"] > 0
    c.bgsave()

    def saved() -> bool:
        info = c.info("persistence")
        return not info["rdb_bgsave_in_progress"] and not info["rdb_changes_since_last_save"]
    wait_for(saved, 30, what="BGSAVE")
    assert c.info("persistence")["rdb_last_bgsave_status"] == "ok"
    path = str(server.dir / "dump.rdb")
    check_rdb(server, path)
    return path


@pytest.mark.parametrize(("file_flavour", "dst_flavour"),
                         [(f, "redis6") for f in FLAVOURS] + [("redis7", "redis7"),
                                                              ("valkey8", "valkey8")])
def test_rdb_file_written_by_each_version_is_imported_exactly(
        file_flavour: str, dst_flavour: str, daemon: Daemon, servers: Servers) -> None:
    src, dst = servers(file_flavour), servers(dst_flavour)
    fill(src.client)
    path = bgsave(src)
    size = os.path.getsize(path)
    tid = daemon.create({"source": {"rdb_file": path}, "target": {"addrs": dst.addr},
                         "migration_method": "full_amount_migration"})
    t = daemon.wait_state(tid, "Succeeded", timeout=120)
    assert_copied(src, dst)
    status, body = daemon.api("verify", {"task_id": tid})
    assert status == 400 and "the source is an RDB file" in body["message"], body
    snap = t["progress"]["snapshot"]
    assert snap["file_bytes_read"] == snap["file_bytes_total"] == size
    assert snap["percent"] == 100.0
    assert snap["keys_done"] == sum(src.client(db).dbsize() for db in range(3))
    assert t["progress"]["reader"] == "rdb_file" and t["spec"]["source"] == {"rdb_file": path}
    assert t["write_mode"]["mode"] == ("rewrite" if needs_rewrite(src, dst) else "restore")
    checks = {c["name"]: c for c in t["prechecks"]}
    assert checks["source.rdb_file"]["status"] == "ok" and path in checks["source.rdb_file"][
        "message"]


def test_rdb_file_through_filters_and_db_mapping(daemon: Daemon, servers: Servers) -> None:
    src, dst = servers("redis7"), servers("redis6")
    fill(src.client)
    path = bgsave(src)
    tid = daemon.create({"source": {"rdb_file": path}, "target": {"addrs": dst.addr},
                         "filter": {"dbs": [1], "exclude_prefixes": ["stream:"]},
                         "db_mapping": {"1": 4}})
    daemon.wait_state(tid, "Succeeded", timeout=60)
    keys = [k for k in src.client(1).scan_iter() if not k.startswith(b"stream:")]
    assert_same(src.client(1), dst.client(4), keys=keys)
    assert dst.client(4).dbsize() == len(keys)
    assert dst.client(0).dbsize() == dst.client(1).dbsize() == 0


def test_rdb_file_bad_paths_and_files_are_refused(daemon: Daemon, servers: Servers,
                                                  tmp_path: Any) -> None:
    dst = servers()
    junk = tmp_path / "junk.rdb"
    junk.write_bytes(b"hello, this is not an RDB")

    def refused(source: dict[str, Any], **kw: Any) -> str:
        status, body = daemon.api("create", {"source": source, "target": {"addrs": dst.addr},
                                             **kw})
        assert status == 400, body
        return str(body["message"])

    assert "does not exist" in refused({"rdb_file": str(tmp_path / "missing.rdb")})
    assert "is not an RDB file" in refused({"rdb_file": str(junk)})
    assert "is a directory" in refused({"rdb_file": str(tmp_path)})
    assert "absolute path" in refused({"rdb_file": "dump.rdb"})
    assert "takes no other field" in refused({"rdb_file": str(junk), "addrs": dst.addr})
    assert "full_amount_migration only" in refused(
        {"rdb_file": str(junk)}, migration_method="incremental_migration")
    assert dst.client().dbsize() == 0


def test_a_truncated_rdb_file_fails_the_task_saying_so(daemon: Daemon, servers: Servers,
                                                      tmp_path: Any) -> None:
    src, dst = servers(), servers()
    fill(src.client)
    whole = open(bgsave(src), "rb").read()
    cut = tmp_path / "cut.rdb"
    cut.write_bytes(whole[:len(whole) // 2])
    tid = daemon.create({"source": {"rdb_file": str(cut)}, "target": {"addrs": dst.addr}})
    t = daemon.wait_state(tid, "Failed", timeout=60)
    assert str(cut) in t["reason"] and "RDB ended before its EOF opcode" in t["reason"]
    assert "truncated" in t["reason"]


# --- decoding, without servers ----------------------------------------------------------------

def test_lzf_in_c_and_in_python_agree() -> None:
    from cdcd.rdb import lzf as rdb_lzf
    from cdcd.rdb.records import _Corrupt
    lzf = pytest.importorskip("lzf")
    rnd = random.Random(3)
    for _ in range(200):
        data = b"".join(rnd.choice([b"abc" * rnd.randrange(1, 50), rnd.randbytes(20),
                                    b"\0" * rnd.randrange(300)]) for _ in range(20))
        packed = lzf.compress(data)
        if packed is None:      # incompressible: Redis stores it plain
            continue
        assert rdb_lzf._lzf_decompress(packed, len(data), 0) == data
        assert rdb_lzf._lzf_decompress_py(packed, len(data), 0) == data
    packed = lzf.compress(b"x" * 1000)
    with pytest.raises(_Corrupt, match="expands to 1000 bytes, expected 999"):
        rdb_lzf._lzf_decompress(packed, 999, 0)
    with pytest.raises(_Corrupt, match="truncated"):
        rdb_lzf._lzf_decompress(packed[:-1], 1000, 0)


MODULE_CHARSET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def test_module_values_name_their_module() -> None:
    # moduleTypeEncodeId("ReJSON-RL", 3): 9 characters of 6 bits, then 10 bits of version
    module_id = 0
    for ch in "ReJSON-RL":
        module_id = (module_id << 6) | MODULE_CHARSET.index(ch)
    module_id = (module_id << 10) | 3
    assert module_name(module_id) == "ReJSON-RL (encoding version 3)"
    body = b"\x81" + module_id.to_bytes(8, "big") + b"\x00"
    with pytest.raises(ValueNotRewritable, match="module ReJSON-RL"):
        decode_value(7, body)


def test_module_values_fail_the_task_or_are_skipped_and_listed() -> None:
    """Pure logic: no test server loads a module, so the payload is built here."""
    module_id = 0
    for ch in "ReJSON-RL":
        module_id = (module_id << 6) | MODULE_CHARSET.index(ch)
    payload = bytes([7]) + b"\x81" + ((module_id << 10) | 3).to_bytes(8, "big") + \
        b"\x00" + b"\x0b\x00" + bytes(8)
    plan = WritePlan(mode="rewrite", reason="test")
    for modules in ("fail", "skip"):
        spec_ = parse_spec(spec("127.0.0.1:1", "127.0.0.1:2", task_id="m", modules=modules))
        progress = Progress()
        out: list[Any] = []
        rewriter = Rewriter(plan, spec_, progress, source="source x")
        if modules == "fail":
            with pytest.raises(FatalTaskError) as exc:
                rewriter.key(3, b"doc:1", payload, 0, True, out)
            assert "key b'doc:1' (db 3)" in exc.value.message
            assert "module ReJSON-RL (encoding version 3)" in exc.value.message
            assert '"modules": "skip"' in exc.value.message
            continue
        assert rewriter.key(3, b"doc:1", payload, 0, True, out) == 0 and out == []
        view = progress.view(incremental=False)["snapshot"]
        assert view["keys_skipped"] == 1
        assert view["not_written"] == {"count": 1, "keys": [
            "db 3 key b'doc:1': a module value of module ReJSON-RL (encoding version 3): only "
            "the module can write it (RESTORE into a target with the module loaded)"]}


def test_hashes_with_field_ttls_on_the_source_are_a_precheck_error_when_rewriting() -> None:
    """Pure logic: no test server is Redis 7.4+ (INFO keyspace's subexpiry counter)."""
    ok = Check(name="dump_compatibility", status="ok", message="write_mode rewrite: why")
    info = parse_info(b"# Keyspace\r\ndb0:keys=10,expires=1,avg_ttl=0,subexpiry=0\r\n"
                      b"db3:keys=5,expires=2,avg_ttl=0,subexpiry=2\r\n")
    c = field_ttl_check(ok, info)
    assert c.status == "error" and "hashes with field TTLs (2 in db 3)" in c.message
    assert field_ttl_check(ok, parse_info(b"db0:keys=10,expires=1,avg_ttl=0\r\n")) is ok


def test_values_no_command_rebuilds_are_refused() -> None:
    with pytest.raises(ValueNotRewritable, match="field TTLs"):
        decode_value(24, b"\x00" * 16)
    with pytest.raises(ValueNotRewritable, match="malformed value of RDB type 4"):
        decode_value(4, b"\x05\x01a")
    with pytest.raises(ValueNotRewritable, match="too short"):
        decode_payload(b"\x00\x01a")


def test_dump_payloads_of_every_encoding_decode(servers: Servers) -> None:
    """DUMP replies of each flavour decode to what the server's own reads return."""
    for flavour in FLAVOURS:
        s = servers(flavour)
        c = s.client()
        fill_mixed(c, big=False)
        for key in (b"hash:small", b"hash:large", b"set:intset", b"set:small", b"list:small",
                    b"list:large", b"zset:small", b"zset:odd", b"str:int", b"str:raw"):
            kind, items, _ = decode_payload(c.dump(key))
            t = c.type(key).decode()
            assert kind == t, (flavour, key)
            if t == "string":
                assert items == [c.get(key)]
            elif t == "hash":
                assert dict(zip(items[::2], items[1::2])) == c.hgetall(key)
            elif t == "list":
                assert items == c.lrange(key, 0, -1)
            elif t == "set":
                assert set(items) == c.smembers(key)
            else:
                assert [(m, float(sc)) for m, sc in zip(items[::2], items[1::2])] == \
                    c.zrange(key, 0, -1, withscores=True), (flavour, key)
        kind, items, meta = decode_payload(c.dump(b"stream:s"))
        assert kind == "stream" and meta is not None
        assert [(i, dict(zip(f[::2], f[1::2]))) for i, f in items] == c.xrange(b"stream:s")
        assert sorted(g.name for g in meta.groups) == [b"g1", b"g2"]
        pending = {p[0] for g in meta.groups for p in g.pending}
        assert pending == {p["message_id"] for g in (b"g1", b"g2")
                           for p in c.xpending_range(b"stream:s", g, "-", "+", 1000)}

