"""Servers told apart by identity, not address strings, against real servers: the
``identity`` precheck, ``target_run_id`` and ``find_conflict`` (cdcd.identity), and a task
whose source and target are one server under two names failing before it writes."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from cdcd.identity import find_conflict, resolve, same_server, target_run_id
from cdcd.precheck import Check, failed, run_prechecks
from cdcd.spec import Endpoint, TaskSpec
from cdcd.task import State

from .daemon import Daemon, spec
from .servers import RedisServer, free_port, silent_server, wait_for
from .test_precheck import spec_for

Servers = Callable[..., RedisServer]
FLAVOURS = ["redis7", "redis6", "valkey8"]


async def identity(spec: TaskSpec) -> tuple[Check, list[Check], dict[str, str | None]]:
    ids: dict[str, str | None] = {}
    checks = await run_prechecks(spec, identity_out=ids)
    (check,) = [c for c in checks if c.name == "identity"]
    return check, checks, ids


def run_id(server: RedisServer) -> str:
    return str(server.client().info("server")["run_id"])


def replica_of(servers: Servers, master: RedisServer, flavour: str = "redis7",
               wait: bool = True) -> RedisServer:
    """Start a replica of ``master``; ``wait`` until its link is up (same replid)."""
    replica = servers(flavour, args=["--replicaof", "127.0.0.1", str(master.port)])
    if wait:
        wait_for(lambda: replica.client().info("replication")["master_link_status"] == "up",
                 what="replication link up")
    return replica


# --- the identity precheck ---------------------------------------------------------------

@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_same_server_under_two_names(servers: Servers, flavour: str) -> None:
    server = servers(flavour)
    before = server.client().dbsize()
    check, checks, ids = await identity(spec_for(f"127.0.0.1:{server.port}",
                                                 f"localhost:{server.port}"))
    assert check.status == "error" and failed(checks)
    assert check.message.startswith(
        f"source 127.0.0.1:{server.port} and target localhost:{server.port} are the same "
        f"server (run_id {run_id(server)})"), check.message
    assert ids == {"source_run_id": run_id(server), "target_run_id": run_id(server)}
    assert server.client().dbsize() == before


async def test_same_server_on_two_ips_known_by_run_id(servers: Servers) -> None:
    """127.0.0.1 and 127.0.0.2 resolve apart; only the run_id says it is one server."""
    server = servers(args=["--bind", "127.0.0.1 127.0.0.2"])
    assert resolve([("127.0.0.1", server.port)]).isdisjoint(resolve([("127.0.0.2",
                                                                       server.port)]))
    check, _, _ = await identity(spec_for(f"127.0.0.1:{server.port}",
                                          f"127.0.0.2:{server.port}"))
    assert check.status == "error"
    assert f"are the same server (run_id {run_id(server)})" in check.message


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_target_replica_of_source(servers: Servers, flavour: str) -> None:
    src = servers(flavour)
    dst = replica_of(servers, src, flavour)
    check, checks, _ = await identity(spec_for(src, dst))
    assert check.status == "error" and failed(checks)
    assert "share a replication group" in check.message, check.message
    assert "writing the target would write the source's replication group" in check.message
    assert check.message.startswith(f"source {src.addr} and target {dst.addr}")


async def test_target_replica_of_source_before_its_link_is_up(servers: Servers) -> None:
    """A replica that never synced (no masterauth) has its own replid: its master_host
    still gives it away."""
    src = servers(password="m-pw")
    dst = replica_of(servers, src, wait=False)
    assert dst.client().info("replication")["master_link_status"] == "down"
    check, _, _ = await identity(spec_for(src, dst, source={"password": "m-pw"}))
    assert check.status == "error"
    assert check.message.startswith(f"target {dst.addr} is a replica of source {src.addr}: "
                                    f"writing the target would write the source's "
                                    f"replication group"), check.message


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_source_replica_of_target(servers: Servers, flavour: str) -> None:
    """The endless loop: what the task writes to the target comes back in the source's
    replication stream."""
    dst = servers(flavour)
    src = replica_of(servers, dst, flavour)
    check, _, _ = await identity(spec_for(src, dst))
    assert check.status == "error"
    assert "writing the target would write the source's replication group" in check.message
    # before the link is up, the master address says it
    dst2 = servers(flavour, password="t-pw")
    src2 = replica_of(servers, dst2, flavour, wait=False)
    check, _, _ = await identity(spec_for(src2, dst2, target={"password": "t-pw"}))
    assert check.status == "error"
    assert check.message.startswith(f"source {src2.addr} is a replica of target "
                                    f"{dst2.addr}"), check.message


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_unrelated_servers_pass(servers: Servers, flavour: str) -> None:
    src, dst = servers(flavour), servers(flavour)
    check, checks, ids = await identity(spec_for(src, f"localhost:{dst.port}"))
    assert check.status == "ok", check.message
    assert "are distinct servers" in check.message and run_id(src) in check.message
    assert ids == {"source_run_id": run_id(src), "target_run_id": run_id(dst)}
    assert not failed(checks), [c.to_json() for c in checks if c.status == "error"]


async def test_sibling_replicas_and_a_promoted_source(servers: Servers) -> None:
    """Two replicas of one master share its replid: refused. A source promoted out of the
    target's group (REPLICAOF NO ONE) keeps the target's replid as master_replid2."""
    master = servers()
    src, dst = replica_of(servers, master), replica_of(servers, master)
    check, _, _ = await identity(spec_for(src, dst))
    assert check.status == "error" and "share a replication group" in check.message
    # a replica of an unrelated master is fine as a source
    check, _, _ = await identity(spec_for(src, servers()))
    assert check.status == "ok", check.message
    src.client().execute_command("REPLICAOF", "NO", "ONE")
    wait_for(lambda: src.client().info("replication")["role"] == "master", what="promotion")
    check, _, _ = await identity(spec_for(src, master))
    assert check.status == "error"
    assert "is the source's master_replid2" in check.message, check.message


async def test_identity_out_when_a_side_is_down(servers: Servers) -> None:
    src = servers()
    ids: dict[str, str | None] = {}
    checks = await run_prechecks(spec_for(src, "127.0.0.1:1"), identity_out=ids)
    assert ids == {"source_run_id": run_id(src), "target_run_id": None}
    assert "identity" not in {c.name for c in checks}


# --- target_run_id -------------------------------------------------------------------------

async def test_target_run_id(servers: Servers) -> None:
    server = servers(password="pw")
    ep = Endpoint(addrs=(("localhost", server.port),), password="pw")
    first = await target_run_id(ep)
    assert first == run_id(server) and len(first) == 40
    assert await target_run_id(Endpoint(addrs=ep.addrs, password="wrong")) is None
    assert await target_run_id(Endpoint(addrs=ep.addrs)) is None          # NOAUTH
    assert await target_run_id(Endpoint(addrs=(("127.0.0.1", free_port()),))) is None
    server.restart()                                  # a new process, a new run_id
    again = await target_run_id(ep)
    assert again is not None and again != first


async def test_target_run_id_of_a_silent_server() -> None:
    async with silent_server() as port:
        t0 = time.monotonic()
        assert await target_run_id(Endpoint(addrs=(("127.0.0.1", port),)), timeout=0.3) is None
        assert time.monotonic() - t0 < 2


# --- find_conflict ---------------------------------------------------------------------------

@dataclass
class StandIn:
    """What the manager's Task offers find_conflict."""

    spec: TaskSpec
    state: State = State.RUNNING
    target_run_id: str | None = None


async def test_find_conflict_same_target_server(servers: Servers) -> None:
    src, dst, other_dst = servers(), servers(), servers()
    rid = await target_run_id(spec_for(src, dst).target)
    assert rid == run_id(dst)
    abc = StandIn(spec_for(src, dst, task_id="abc", filter={"dbs": [0]}), target_run_id=rid)
    new = spec_for(servers(), f"localhost:{dst.port}", task_id="new")

    text = find_conflict(new, rid, [abc])
    assert text == (
        f"target localhost:{dst.port} db 0 is already written by task 'abc' (source "
        f"{src.addr} -> target {dst.addr}, every key); give disjoint filter.dbs or "
        f"include_prefixes, or set shared_target: true")
    # run_ids unknown on either side: the addresses resolve to one server
    assert find_conflict(new, None, [abc]) == text
    assert find_conflict(new, rid, [StandIn(abc.spec, target_run_id=None)]) == text
    # a task Paused or Failed comes back; one that Succeeded does not
    for state in (State.PAUSED, State.FAILED, State.INITIAL):
        assert find_conflict(new, rid, [StandIn(abc.spec, state, rid)]) == text
    assert find_conflict(new, rid, [StandIn(abc.spec, State.SUCCEEDED, rid)]) is None
    # the task itself (a re-create or its own precheck) is not a conflict
    assert find_conflict(abc.spec, rid, [abc]) is None
    # another target server
    other = spec_for(src, other_dst, task_id="elsewhere")
    assert find_conflict(other, await target_run_id(other.target), [abc]) is None
    # disjoint scopes, or shared_target on either side
    for ok in (spec_for(src, f"localhost:{dst.port}", filter={"dbs": [1]}),
               spec_for(src, f"localhost:{dst.port}", db_mapping={"0": 2},
                        filter={"dbs": [0]}),
               spec_for(src, f"localhost:{dst.port}", shared_target=True)):
        assert find_conflict(ok, rid, [abc]) is None, ok.to_json(mask=True)
    prefixed = StandIn(spec_for(src, dst, task_id="users",
                                filter={"include_prefixes": ["user:"]}), target_run_id=rid)
    assert find_conflict(spec_for(src, f"localhost:{dst.port}",
                                  filter={"include_prefixes": ["order:"]}), rid,
                         [prefixed]) is None
    text = find_conflict(spec_for(src, f"localhost:{dst.port}",
                                  filter={"include_prefixes": ["user:7"]}), rid, [prefixed])
    assert text is not None and "already written (in every db) by task 'users'" in text
    shared = StandIn(spec_for(src, dst, shared_target=True), target_run_id=rid)
    assert find_conflict(new, rid, [shared]) is None
    # the first of several is named
    assert "task 'users'" in (find_conflict(new, rid, [prefixed, abc]) or "")


async def test_find_conflict_by_run_id_and_after_a_restart(servers: Servers) -> None:
    src = servers()
    dst = servers(args=["--bind", "127.0.0.1 127.0.0.2"])
    rid = await target_run_id(spec_for(src, dst).target)
    abc = StandIn(spec_for(src, dst, task_id="abc"), target_run_id=rid)
    # another IP of the same server: only the run_id tells
    new = spec_for(servers(), f"127.0.0.2:{dst.port}", task_id="new")
    new_rid = await target_run_id(new.target)
    assert new_rid == rid
    assert "by task 'abc'" in (find_conflict(new, new_rid, [abc]) or "")
    assert find_conflict(new, None, [abc]) is None          # cannot tell without it
    # the target restarted since task abc learned its run_id: same address, same server
    dst.restart()
    fresh = await target_run_id(spec_for(src, f"localhost:{dst.port}").target)
    assert fresh is not None and fresh != rid
    same_addr = spec_for(servers(), f"localhost:{dst.port}", task_id="new2")
    assert "by task 'abc'" in (find_conflict(same_addr, fresh, [abc]) or "")
    # same_server, the rule find_conflict uses
    one, two = abc.spec.target, new.target
    assert same_server(one, rid, two, rid) and not same_server(one, None, two, None)
    assert same_server(one, "x", same_addr.target, "y")     # run_ids differ, address same
    assert not same_server(one, None, Endpoint(addrs=(("127.0.0.1", src.port),)), None)


# --- through the daemon --------------------------------------------------------------------

def test_task_with_one_server_as_source_and_target_fails(daemon: Daemon,
                                                         servers: Servers) -> None:
    server = servers()
    server.client().set("k", "v")
    port = server.port
    tid = daemon.create(spec(f"127.0.0.1:{port}", f"localhost:{port}",
                             migration_method="incremental_migration", reader="psync"))
    task = daemon.wait_state(tid, "Failed")
    assert "same server" in task["reason"], task["reason"]
    assert f"source 127.0.0.1:{port} and target localhost:{port}" in task["reason"]
    checks = {c["name"]: c for c in task["prechecks"]}
    assert checks["identity"]["status"] == "error"
    # refused before anything was written: no checkpoint key, no replica attached
    client = server.client()
    assert client.keys("*") == [b"k"]
    assert client.info("replication")["connected_slaves"] == 0
