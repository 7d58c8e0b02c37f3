"""verify with a Redis Cluster target: every read goes to the master of its key's slot,
every master is SCANned for extra keys, only db 0 exists, and a redirect (a slot moved or
being moved meanwhile) is followed once."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from cdcd.spec import TaskSpec, parse_spec
from cdcd.topology import key_slot
from cdcd.verifications import checkpoint_excluded
from cdcd.verify import Verification

from .cluster import Cluster, running_cluster
from .compare import fill_bulk, fill_mixed
from .servers import RedisServer, running
from .test_verify import counts, example_keys, verify

pytestmark = pytest.mark.timeout(180)

DB_ONLY_0 = ("target is a Redis Cluster: source db 3 maps to target db 3, but a cluster "
             "has db 0 only; give db_mapping")


def spec_for(src: RedisServer, target: str, **kw: Any) -> TaskSpec:
    return parse_spec({"source": {"addrs": src.addr}, "target": {"addrs": target}, **kw})


def fill(c: redis.Redis[bytes]) -> list[bytes]:
    """Every type (fill_mixed), a string long enough for GETRANGE windows, hash-tagged keys,
    TTLs, and 300 small keys so that every master holds some."""
    fill_mixed(c, big=False)
    c.set(b"str:600k", b"s" * 600_000)
    c.set(b"{user:1}:name", b"ada", px=500_000)
    c.hset(b"{user:1}:profile", mapping={b"lang": b"en", b"tz": b"UTC"})
    c.expire(b"{user:1}:profile", 7200)
    fill_bulk(c, 300, prefix=b"k:")
    return sorted(c.scan_iter(count=1000))


def copy_into(src: RedisServer, rc: redis.RedisCluster, db: int = 0) -> int:
    """Copy every key of source db ``db`` into the cluster (DUMP/RESTORE, TTLs kept)."""
    s = src.client(db)
    n = 0
    for key in s.scan_iter(count=1000):
        rc.restore(key, max(s.pttl(key), 0), s.dump(key), replace=True)
        n += 1
    return n


def node_id(node: RedisServer) -> Any:
    return node.client().execute_command("CLUSTER", "MYID")


def other_master(cluster: Cluster, node: RedisServer) -> RedisServer:
    return next(m for m in cluster.masters if m is not node)


def move_slot(cluster: Cluster, slot: int, a: RedisServer, b: RedisServer) -> None:
    """Move ``slot`` with its keys from master ``a`` to master ``b`` (what resharding does)."""
    bid = node_id(b)
    b.client().execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", node_id(a))
    a.client().execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", bid)
    while keys := a.client().execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
        a.client().migrate("127.0.0.1", b.port, keys, 0, 5000)
    for node in [b, a] + [m for m in cluster.masters if m not in (a, b)]:
        node.client().execute_command("CLUSTER", "SETSLOT", slot, "NODE", bid)


@pytest.fixture(scope="module")
def redis7_pair() -> Iterator[tuple[RedisServer, Cluster]]:
    with running("redis7") as src, running_cluster("redis7", replicas=0) as cluster:
        yield src, cluster


@pytest.fixture
def pair(redis7_pair: tuple[RedisServer, Cluster]) -> tuple[RedisServer, Cluster]:
    """A standalone source and a 3-master cluster, both empty."""
    src, cluster = redis7_pair
    src.client().flushall()
    for node in cluster.masters:
        node.client().flushall()
    return src, cluster


def redirects(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "redirected" in r.getMessage()]


@pytest.mark.parametrize("flavour", ["redis7", "redis6", "valkey8"])
async def test_a_faithful_copy_into_a_cluster_is_consistent(
        flavour: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="cdcd.verify")
    with running(flavour) as src, running_cluster(flavour, replicas=0) as cluster:
        keys = fill(src.client())
        rc = cluster.client()
        try:
            assert copy_into(src, rc) == len(keys)
        finally:
            rc.close()
        assert all(n.client().dbsize() > 0 for n in cluster.masters)   # reads span nodes
        result = await verify(spec_for(src, cluster.addrs))
        assert result["consistent"], result["examples"]
        assert result["keys_checked"] == len(keys)
        assert [(d["db"], d["target_db"]) for d in result["dbs"]] == [(0, 0)]
        # one address of a cluster node is a cluster too (cluster_enabled:1); small chunks
        # send every type through the chunked reads (HSCAN + HMGET, LRANGE windows, ...)
        one = await verify(spec_for(src, cluster.masters[1].addr), chunk=50)
        assert one["consistent"], one["examples"]
        assert one["keys_checked"] == len(keys)
    assert redirects(caplog) == []      # every read went to its slot's master at once


async def test_planted_differences_and_samples(pair: tuple[RedisServer, Cluster]) -> None:
    src, cluster = pair
    keys = fill(src.client())
    rc = cluster.client()
    try:
        copy_into(src, rc)
        rc.hset(b"hash:small", b"a", b"changed")                # value mismatch
        rc.delete(b"str:short")                                 # missing
        rc.set(b"only:on:cluster", b"x")                        # extra
        rc.set(b"cdcd:checkpoint:orders", b"replid 1 0")        # cdcd's own keys: left out
        rc.set(b"cdcd:tmp:orders:{k:1}", b"half")
        spec = checkpoint_excluded(spec_for(src, cluster.addrs))
        result = await verify(spec)
        assert counts(result) == {"missing": 1, "extra": 1, "type_mismatch": 0,
                                  "value_mismatch": 1, "ttl_mismatch": 0}, result["examples"]
        assert result["keys_checked"] == len(keys)
        assert example_keys(result, "missing") == ["str:short"]
        assert example_keys(result, "extra") == ["only:on:cluster"]
        assert example_keys(result, "value_mismatch") == ["hash:small"]
        assert result["examples"]["value_mismatch"][0]["detail"] == "hash field a differs"
        assert result["examples"]["extra"][0]["detail"] == \
            "on target db 0 only, not in source db 0"
        # without the exclusion cdcd's keys are extras like any other
        assert (await verify(spec_for(src, cluster.addrs)))["extra"] == 3

        for i in range(0, 300, 2):
            rc.delete(b"k:%d" % i)                              # half the small keys missing
        sampled = await verify(spec, sample=100)
    finally:
        rc.close()
    assert sampled["mode"] == "sample" and sampled["keys_checked"] == 100
    assert sampled["extra"] is None
    assert 15 < sampled["missing"] < 85
    assert all(k.startswith("k:") and int(k[2:]) % 2 == 0 or k == "str:short"
               for k in example_keys(sampled, "missing"))


async def test_a_cluster_has_db_0_only(pair: tuple[RedisServer, Cluster]) -> None:
    src, cluster = pair
    src.client(3).mset({b"three:%d" % i: b"%d" % i for i in range(50)})
    rc = cluster.client()
    try:
        copy_into(src, rc, db=3)
    finally:
        rc.close()
    out = await Verification(spec_for(src, cluster.addrs)).run()
    assert out["state"] == "failed" and out["error"] == DB_ONLY_0
    result = await verify(spec_for(src, cluster.addrs, db_mapping={"3": 0}))
    assert result["consistent"] and result["keys_checked"] == 50
    # source db 0 maps onto target db 0 as well (empty here, but its keys would not be extra)
    assert [(d["db"], d["target_db"], d["keys_checked"]) for d in result["dbs"]] == [
        (0, 0, 0), (3, 0, 50)]


async def test_a_slot_moved_meanwhile_is_followed(pair: tuple[RedisServer, Cluster],
                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="cdcd.verify")
    src, cluster = pair
    s = src.client()
    s.set(b"moving", b"v")
    fill_bulk(s, 100)
    rc = cluster.client()
    try:
        copy_into(src, rc)
        rc.set(b"moving", b"lagging")           # found different, so compared again
        slot = key_slot(b"moving")
        owner = cluster.owner(slot)

        async def catch_up() -> None:           # before the second look: fixed, and moved
            rc.set(b"moving", b"v")
            move_slot(cluster, slot, owner, other_master(cluster, owner))

        result = await verify(spec_for(src, cluster.addrs), recheck=catch_up)
    finally:
        rc.close()
    assert result["consistent"], result["examples"]
    assert result["recheck"]["rechecked"] == 1 and result["recheck"]["resolved"] == 1
    assert cluster.owner(slot) is not owner
    assert [m for m in redirects(caplog) if "MOVED" in m]


async def test_ask_is_followed_and_a_second_redirect_fails(
        pair: tuple[RedisServer, Cluster]) -> None:
    src, cluster = pair
    fill_bulk(src.client(), 100)
    rc = cluster.client()
    try:
        copy_into(src, rc)
    finally:
        rc.close()
    spec = spec_for(src, cluster.addrs)
    key = b"k:7"
    slot = key_slot(key)
    a = cluster.owner(slot)
    b = other_master(cluster, a)
    # half-way through a migration: the key already on b, the slot still a's (a says ASK)
    b.client().execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", node_id(a))
    a.client().execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", node_id(b))
    a.client().migrate("127.0.0.1", b.port, [key], 0, 5000)
    result = await verify(spec)
    assert result["consistent"] and result["keys_checked"] == 100, result["examples"]

    # b no longer imports: a's ASK leads to b's MOVED back to a
    b.client().execute_command("CLUSTER", "SETSLOT", slot, "STABLE")
    out = await Verification(spec).run()
    assert out["state"] == "failed", out
    assert "k:7 was redirected again" in out["error"] and "resharded" in out["error"]
    assert "Traceback" not in out["error"]

    # the migration finishes: consistent again, the slot now b's
    b.client().execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", node_id(a))
    for node in [b, a, *[m for m in cluster.masters if m not in (a, b)]]:
        node.client().execute_command("CLUSTER", "SETSLOT", slot, "NODE", node_id(b))
    assert (await verify(spec))["consistent"]
