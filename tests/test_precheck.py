"""Prechecks against real servers: each check passing and failing for real."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from cdcd.precheck import (
    Check,
    ServerVersion,
    dump_compatibility,
    failed,
    parse_version,
    rdb_version,
    run_prechecks,
    server_version,
    worst,
)
from cdcd.spec import TaskSpec, parse_spec

from .servers import RedisServer, free_port, silent_server, wait_for

Servers = Callable[..., RedisServer]


def spec_for(src: RedisServer | str, dst: RedisServer | str, **kw: Any) -> TaskSpec:
    """Build a spec through the API parser; ``source``/``target`` dicts override fields."""
    data: dict[str, Any] = {
        "source": {"addrs": src if isinstance(src, str) else src.addr},
        "target": {"addrs": dst if isinstance(dst, str) else dst.addr},
        "migration_method": "full_amount_migration",
    }
    for side in ("source", "target"):
        data[side].update(kw.pop(side, {}))
    data.update(kw)
    return parse_spec(data)


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


@contextmanager
def write_load(server: RedisServer, value_size: int = 2048) -> Iterator[None]:
    """Keep writing to ``server`` from a thread until the block ends."""
    stop = threading.Event()
    client = server.client()
    written = [0]

    def work() -> None:
        i = 0
        while not stop.is_set():
            pipe = client.pipeline(transaction=False)
            for _ in range(20):
                pipe.set(f"load:{i % 500}", b"x" * value_size)
                i += 1
            pipe.execute()
            written[0] = i
            time.sleep(0.005)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        wait_for(lambda: written[0] > 100, what="write load to start")
        yield
    finally:
        stop.set()
        thread.join(10)
        client.close()


async def test_healthy_pair_every_check_ok(servers: Servers) -> None:
    src, dst = servers(), servers()
    spec = spec_for(src, dst, migration_method="incremental_migration", reader="auto")
    t0 = time.monotonic()
    checks = await run_prechecks(spec)
    elapsed = time.monotonic() - t0
    assert [c.name for c in checks] == [
        "source.connection", "target.connection", "identity", "source.version",
        "target.version", "dump_compatibility", "source.functions", "source.psync", "source.topology",
        "target.topology", "target.writable", "target.existing_keys", "target.memory",
        "target.eviction_policy", "source.repl_backlog"]
    assert all(c.status == "ok" for c in checks), [c.to_json() for c in checks if c.status != "ok"]
    assert worst(checks) == "ok" and not failed(checks)
    assert 0.9 < elapsed < 2.5, elapsed          # one ~1 s write-rate sample, all else parallel
    got = by_name(checks)
    assert "Redis 7." in got["source.version"].message and "RDB 10" in got["source.version"].message
    assert got["source.connection"].to_json() == {
        "name": "source.connection", "status": "ok",
        "message": f"source {src.addr} reachable without AUTH"}
    assert "ACL DRYRUN" in got["source.psync"].message


@pytest.mark.parametrize(("src_flavour", "dst_flavour", "src_label", "dst_label"), [
    ("redis6", "redis7", "Redis 6.2", "Redis 7.0"),
    ("valkey8", "valkey8", "Valkey 8.1", "Valkey 8.1"),
    ("redis7", "valkey8", "Redis 7.0", "Valkey 8.1"),
])
async def test_versions_across_flavours(servers: Servers, src_flavour: str, dst_flavour: str,
                                        src_label: str, dst_label: str) -> None:
    src, dst = servers(src_flavour), servers(dst_flavour)
    checks = by_name(await run_prechecks(spec_for(src, dst, reader="psync")))
    assert src_label in checks["source.version"].message
    assert dst_label in checks["target.version"].message
    assert checks["dump_compatibility"].status == "ok", checks["dump_compatibility"].message
    assert checks["source.psync"].status == "ok"
    assert not failed(list(checks.values()))


async def test_wrong_and_missing_password(servers: Servers) -> None:
    src, dst = servers(password="secret"), servers()
    checks = await run_prechecks(spec_for(src, dst, source={"password": "wrong"}))
    got = by_name(checks)
    conn = got["source.connection"]
    assert conn.status == "error"
    assert f"source {src.addr}" in conn.message and "WRONGPASS" in conn.message
    # checks that need the source are left out; the target is still checked
    assert not [c for c in checks if c.name.startswith("source.") and c.name != conn.name]
    assert "dump_compatibility" not in got and got["target.writable"].status == "ok"
    assert failed(checks)

    got = by_name(await run_prechecks(spec_for(src, dst)))
    assert got["source.connection"].status == "error"
    assert "NOAUTH" in got["source.connection"].message
    assert "set source.password" in got["source.connection"].message

    got = by_name(await run_prechecks(spec_for(src, dst, source={"password": "secret"})))
    assert got["source.connection"].status == "ok"
    assert "as user 'default'" in got["source.connection"].message


async def test_unreachable_port(servers: Servers) -> None:
    src = servers()
    port = free_port()
    checks = by_name(await run_prechecks(spec_for(src, f"127.0.0.1:{port}")))
    conn = checks["target.connection"]
    assert conn.status == "error"
    assert f"target 127.0.0.1:{port}" in conn.message and "connection refused" in conn.message
    assert checks["source.connection"].status == "ok"


async def test_silent_server_times_out() -> None:
    """A port that accepts but never answers becomes an error check, not a hang."""
    async with silent_server() as port:
        t0 = time.monotonic()
        checks = by_name(await run_prechecks(
            spec_for(f"127.0.0.1:{port}", "127.0.0.1:1"), command_timeout=0.5))
        assert time.monotonic() - t0 < 3
    assert checks["source.connection"].status == "error"
    assert "no reply to PING within 0.5s" in checks["source.connection"].message


async def test_non_redis_server_is_an_error() -> None:
    """A port answering something else than RESP (here HTTP) is reported, not raised."""
    async def http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(http, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        plain = by_name(await run_prechecks(spec_for(f"127.0.0.1:{port}", "127.0.0.1:1")))
        authed = by_name(await run_prechecks(spec_for(f"127.0.0.1:{port}", "127.0.0.1:1",
                                                      source={"password": "pw"})))
    finally:
        server.close()
        await server.wait_closed()
    for checks in (plain, authed):
        assert checks["source.connection"].status == "error"
        assert "does not speak the Redis protocol" in checks["source.connection"].message


@pytest.mark.parametrize("flavour", ["redis7", "redis6", "valkey8"])
async def test_psync_refused_by_acl(servers: Servers, flavour: str) -> None:
    src, dst = servers(flavour), servers(flavour)
    src.client().execute_command("ACL", "SETUSER", "u", "on", ">pw", "~*", "+@all",
                                 "-psync", "-sync")
    user = {"username": "u", "password": "pw"}
    check = by_name(await run_prechecks(spec_for(src, dst, reader="psync", source=user)))[
        "source.psync"]
    assert check.status == "error"
    assert "refuses PSYNC for user 'u'" in check.message and "reader to scan" in check.message
    check = by_name(await run_prechecks(spec_for(src, dst, reader="auto", source=user)))[
        "source.psync"]
    assert check.status == "warning" and "will fall back to scan" in check.message
    checks = by_name(await run_prechecks(spec_for(src, dst, reader="scan", source=user)))
    assert "source.psync" not in checks


@pytest.mark.parametrize(("flavour", "status"), [("redis7", "warning"), ("redis6", "ok")])
async def test_psync_allowed_but_no_acl_rights(servers: Servers, flavour: str,
                                               status: str) -> None:
    """Without ACL DRYRUN rights, Redis 6.2 is probed with a discarded MULTI; 7.0+ cannot
    be probed that way (PSYNC is no-multi there), so the check says it could not verify."""
    src, dst = servers(flavour), servers(flavour)
    src.client().execute_command("ACL", "SETUSER", "v", "on", ">pw", "~*", "+@all",
                                 "-@admin", "+psync", "+replconf")
    check = by_name(await run_prechecks(spec_for(src, dst, reader="psync",
                                                 source={"username": "v", "password": "pw"})))[
        "source.psync"]
    assert check.status == status, check.message
    if status == "warning":
        assert "cannot verify" in check.message
    else:
        assert "discarded MULTI" in check.message
    # the probe never ran PSYNC: no replica ever attached
    assert src.client().info("replication")["connected_slaves"] == 0


async def test_existing_keys(servers: Servers) -> None:
    src, dst = servers(), servers()
    src.client().set("k", "v")
    d0, d5 = dst.client(0), dst.client(5)
    d0.mset({"a": 1, "b": 2, "user:1": 3})
    d5.mset({"x": 1, "y": 2})

    async def existing(**kw: Any) -> Check:
        return by_name(await run_prechecks(spec_for(src, dst, **kw)))["target.existing_keys"]

    c = await existing(existing_keys="fail")
    assert c.status == "error"
    assert "db 0 holds 3 keys" in c.message and "db 5 holds 2 keys" in c.message
    c = await existing(existing_keys="replace")
    assert c.status == "warning" and "overwritten" in c.message
    c = await existing(existing_keys="skip")
    assert c.status == "ok" and "kept" in c.message
    # only the databases the task writes count
    c = await existing(existing_keys="fail", filter={"dbs": [1]})
    assert c.status == "ok"
    c = await existing(existing_keys="fail", filter={"dbs": [1]}, db_mapping={"1": 5})
    assert c.status == "error" and "db 5 holds 2 keys" in c.message and "db 0" not in c.message
    c = await existing(existing_keys="fail", db_mapping={"0": 7})
    assert c.status == "error" and "db 0" not in c.message and "db 5 holds 2" in c.message
    # with a prefix filter only matching keys count
    c = await existing(existing_keys="fail", filter={"include_prefixes": ["user:"]})
    assert c.status == "error"
    assert "db 0 holds 1 keys matching" in c.message and "db 5" not in c.message
    c = await existing(existing_keys="fail", filter={"include_prefixes": ["order:"]})
    assert c.status == "ok"
    # a resumed task (not fresh) does not look
    checks = by_name(await run_prechecks(spec_for(src, dst, existing_keys="fail"), fresh=False))
    assert "target.existing_keys" not in checks


async def test_replica_target_is_an_error(servers: Servers) -> None:
    src, master = servers(), servers()
    replica = servers(args=["--replicaof", "127.0.0.1", str(master.port)])
    checks = by_name(await run_prechecks(spec_for(src, replica)))
    c = checks["target.writable"]
    assert c.status == "error"
    assert f"read-only replica of 127.0.0.1:{master.port}" in c.message
    assert by_name(await run_prechecks(spec_for(src, master)))["target.writable"].status == "ok"


async def test_target_user_without_write_rights(servers: Servers) -> None:
    src, dst = servers(), servers()
    dst.client().execute_command("ACL", "SETUSER", "ro", "on", ">pw", "~*", "+@all", "-@write")
    c = by_name(await run_prechecks(spec_for(src, dst, target={"username": "ro",
                                                               "password": "pw"})))
    # +@all -@write keeps ACL DRYRUN, which then refuses RESTORE
    assert c["target.writable"].status == "error"
    assert "may not write" in c["target.writable"].message


async def test_eviction_policy_warning(servers: Servers) -> None:
    src, dst = servers(), servers(args=["--maxmemory-policy", "allkeys-lru"])
    c = by_name(await run_prechecks(spec_for(src, dst)))["target.eviction_policy"]
    assert c.status == "warning" and "allkeys-lru" in c.message


async def test_memory_headroom(servers: Servers) -> None:
    src, dst = servers(), servers()
    c = src.client()
    pipe = c.pipeline(transaction=False)
    for i in range(2000):
        pipe.set(f"k{i}", b"x" * 4000)
    pipe.execute()
    src_used = int(c.info("memory")["used_memory"])
    dst_used = int(dst.client().info("memory")["used_memory"])

    async def memory(maxmemory: int) -> Check:
        dst.client().config_set("maxmemory", maxmemory)
        return by_name(await run_prechecks(spec_for(src, dst)))["target.memory"]

    low = await memory(dst_used + src_used // 2)
    assert low.status == "error" and "does not fit" in low.message
    near = await memory(dst_used + int(src_used * 1.05))
    assert near.status == "warning" and "10%" in near.message
    ok = await memory(dst_used + src_used * 3)
    assert ok.status == "ok"
    unlimited = await memory(0)
    assert unlimited.status == "ok" and "no maxmemory limit" in unlimited.message


async def test_older_target_refuses_dump(servers: Servers) -> None:
    src, dst = servers("redis7"), servers("redis6")
    # write_mode auto: values written as commands, and the check says so and why
    c = by_name(await run_prechecks(spec_for(src, dst)))["dump_compatibility"]
    assert c.status == "ok", c.message
    assert c.message.startswith("write_mode rewrite: target Redis 6.2.5 (RDB 9) refuses DUMP "
                                "payloads of RDB"), c.message
    # write_mode restore: an error naming both sides and what to do
    c = by_name(await run_prechecks(spec_for(src, dst, write_mode="restore")))[
        "dump_compatibility"]
    assert c.status == "error"
    assert "Redis 6.2.5 (RDB 9) refuses DUMP payloads" in c.message
    assert "write_mode is restore: use write_mode auto or rewrite" in c.message
    # the newer target accepts the older source
    c = by_name(await run_prechecks(spec_for(dst, src)))["dump_compatibility"]
    assert c.status == "ok" and c.message.startswith("write_mode restore: target Redis 7.")


async def test_valkey_source_to_redis7_refused(servers: Servers) -> None:
    src, dst = servers("valkey8"), servers("redis7")
    c = by_name(await run_prechecks(spec_for(src, dst, write_mode="restore")))[
        "dump_compatibility"]
    assert c.status == "error" and "RDB 11" in c.message and "RDB 10" in c.message
    c = by_name(await run_prechecks(spec_for(src, dst)))["dump_compatibility"]
    assert c.status == "ok" and c.message.startswith("write_mode rewrite: ")


def test_rdb_versions_and_relaxed_valkey() -> None:
    """The version table and the Valkey rules that no installed server can exercise."""
    assert rdb_version("redis", (6, 2, 5)) == 9
    assert rdb_version("redis", (7, 0, 15)) == 10
    assert rdb_version("redis", (7, 2, 4)) == 11
    assert rdb_version("redis", (7, 4, 0)) == 12
    assert rdb_version("redis", (8, 0, 2)) == 12
    assert rdb_version("valkey", (8, 1, 1)) == 11
    assert rdb_version("valkey", (9, 0, 0)) == 80
    assert parse_version("7.2.4-rc1") == (7, 2, 4)
    valkey = server_version({"server_name": "valkey", "redis_version": "7.2.4",
                             "valkey_version": "8.1.3"})
    assert (valkey.product, valkey.version, valkey.rdb) == ("valkey", (8, 1, 3), 11)
    redis74 = server_version({"redis_version": "7.4.1"})
    # Valkey refuses Redis 7.4's "foreign" RDB 12 (rdb-version-check relaxed or not: a
    # relaxed load is not exact, so auto rewrites)
    strict = dump_compatibility(redis74, valkey, "restore")
    assert strict.status == "error" and "foreign to Valkey" in strict.message
    auto = dump_compatibility(redis74, valkey)
    assert auto.status == "ok" and auto.message.startswith("write_mode rewrite: ")
    # Valkey 9 writes RDB 80 but still refuses Redis 7.4's "foreign" RDB 12
    valkey9 = ServerVersion(product="valkey", version=(9, 0, 0), text="9.0.0", rdb=80)
    assert dump_compatibility(redis74, valkey9, "restore").status == "error"
    assert dump_compatibility(valkey, valkey9).message.startswith("write_mode restore: ")
    forced = dump_compatibility(valkey, valkey9, "rewrite")
    assert forced.to_json()["message"] == "write_mode rewrite: asked for in the task spec"
    unknown = ServerVersion(product="redis", version=(), text="?", rdb=None)
    assert dump_compatibility(unknown, valkey).status == "warning"
    # rewrite needs Redis 6.2's commands (SET ... PXAT, XGROUP CREATECONSUMER)
    redis60 = server_version({"redis_version": "6.0.16"})
    redis70 = server_version({"redis_version": "7.0.15"})
    old = dump_compatibility(redis70, redis60)
    assert old.status == "error" and "older than the commands write_mode rewrite uses" in \
        old.message and "Redis 6.2 or newer" in old.message
    assert dump_compatibility(redis60, redis70).status == "ok"


async def test_backlog_too_small_for_write_rate(servers: Servers) -> None:
    # a master with a replica attached: the backlog exists and master_repl_offset moves
    src = servers(args=["--repl-backlog-size", "16kb", "--repl-diskless-sync-delay", "0"])
    replica = servers(args=["--replicaof", "127.0.0.1", str(src.port)])
    wait_for(lambda: replica.client().info("replication").get("master_link_status") == "up",
             what="replica link up")
    dst = servers()
    spec = spec_for(src, dst, migration_method="incremental_migration", reader="psync")
    with write_load(src):
        c = by_name(await run_prechecks(spec))["source.repl_backlog"]
    assert c.status == "warning", c.message
    assert "measured from master_repl_offset" in c.message
    assert "raise repl-backlog-size to" in c.message
    advised = int(c.message.split("raise repl-backlog-size to ")[1].split()[0])
    assert advised >= 1 << 20 and advised % (1 << 20) == 0
    # without load the same backlog is fine
    assert by_name(await run_prechecks(spec))["source.repl_backlog"].status == "ok"


async def test_backlog_estimated_before_any_replica(servers: Servers) -> None:
    src, dst = servers(args=["--repl-backlog-size", "16kb"]), servers()
    spec = spec_for(src, dst, migration_method="incremental_migration")
    with write_load(src):
        c = by_name(await run_prechecks(spec))["source.repl_backlog"]
    assert c.status == "warning" and "estimated from network input" in c.message
    # full migrations and scan readers do not need a backlog
    assert "source.repl_backlog" not in by_name(await run_prechecks(spec_for(src, dst)))
    assert "source.repl_backlog" not in by_name(await run_prechecks(
        spec_for(src, dst, migration_method="incremental_migration", reader="scan")))


async def test_cluster_shapes(servers: Servers) -> None:
    src, dst = servers(), servers()
    # the default bus port (port + 10000) may be out of range for an ephemeral port
    node = servers(args=["--cluster-enabled", "yes", "--cluster-port", str(free_port())])
    # two addresses mean a cluster: a standalone node and a node of no formed cluster
    c = by_name(await run_prechecks(spec_for(src, f"{dst.addr},{node.addr}")))
    assert c["target.topology"].status == "error"
    msg = c["target.topology"].message
    assert "cluster support disabled" in msg and "no master serving slots" in msg, msg
    # a cluster source is read shard by shard: a node of no formed cluster serves nothing
    c = by_name(await run_prechecks(spec_for(node, dst)))
    assert c["source.topology"].status == "error"
    assert "no master serving slots" in c["source.topology"].message
    assert c["target.topology"].status == "ok"


async def test_refused_info_becomes_errors_not_exceptions(servers: Servers) -> None:
    src, dst = servers(), servers()
    src.client().execute_command("ACL", "SETUSER", "w", "on", ">pw", "~*", "+@all", "-info",
                                 "-config")
    checks = by_name(await run_prechecks(spec_for(
        src, dst, migration_method="incremental_migration",
        source={"username": "w", "password": "pw"})))
    assert checks["source.connection"].status == "warning"
    assert "INFO is refused" in checks["source.connection"].message
    for name in ("target.memory", "source.repl_backlog"):
        assert checks[name].status == "error", name
        assert "INFO refused" in checks[name].message
    # HELLO still tells the version and the mode
    for name in ("source.version", "dump_compatibility", "source.topology",
                 "target.writable"):
        assert checks[name].status == "ok", checks[name].message
    assert "Redis 7.0" in checks["source.version"].message


async def test_scan_reader_rights(servers: Servers) -> None:
    """The scan reader needs SCAN, DUMP and PTTL on the source; MEMORY USAGE and GETRANGE
    only help. The target's user must also be allowed MSET (plain strings land by MSET)."""
    src, dst = servers(), servers()
    acl = src.client()
    acl.execute_command("ACL", "SETUSER", "nodump", "on", ">pw", "~*", "+@all", "-dump")
    acl.execute_command("ACL", "SETUSER", "noprobe", "on", ">pw", "~*", "+@all", "-getrange",
                        "-memory")
    dst.client().execute_command("ACL", "SETUSER", "nomset", "on", ">pw", "~*", "+@all",
                                 "-mset")

    async def checks(**kw: Any) -> dict[str, Check]:
        return by_name(await run_prechecks(spec_for(src, dst, reader="scan", **kw)))

    c = (await checks(source={"username": "nodump", "password": "pw"}))["source.scan"]
    assert c.status == "error" and "refuses DUMP" in c.message and "'nodump'" in c.message
    c = (await checks(source={"username": "noprobe", "password": "pw"}))["source.scan"]
    assert c.status == "warning"
    assert "MEMORY" in c.message and "GETRANGE" in c.message and "whole DUMP" in c.message
    ok = await checks()
    assert ok["source.scan"].status == "ok" and ok["target.writable"].status == "ok"
    c = (await checks(target={"username": "nomset", "password": "pw"}))["target.writable"]
    assert c.status == "error" and "mset" in c.message.lower()
    # other readers do not run the scan reader's check
    assert "source.scan" not in by_name(await run_prechecks(spec_for(src, dst, reader="psync")))
