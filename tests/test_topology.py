"""Cluster topology discovery against real clusters: masters, replicas and slot ranges
from CLUSTER SHARDS (7.0+) or CLUSTER SLOTS (6.2), host mapping of announced addresses,
and the error that names an announced address cdcd cannot dial."""

from __future__ import annotations

import pytest

from cdcd.errors import EndpointError
from cdcd.resp import Connection
from cdcd.spec import Endpoint
from cdcd.topology import (
    SLOTS,
    HostMapping,
    check_reachable,
    discover,
    key_slot,
    read_topology,
)

from .cluster import Cluster, running_cluster

pytestmark = pytest.mark.timeout(120)


def endpoint(cluster: Cluster) -> Endpoint:
    return Endpoint(addrs=tuple(("127.0.0.1", n.port) for n in cluster.masters))


@pytest.mark.parametrize("flavour", ["redis7", "redis6", "valkey8"])
async def test_discovery_finds_masters_replicas_and_every_slot(flavour: str) -> None:
    with running_cluster(flavour) as cluster:
        topo = await discover(endpoint(cluster), HostMapping(), role="target")
        assert sorted(m.dial[1] for m in topo.masters) == sorted(n.port for n in
                                                                 cluster.masters)
        assert topo.uncovered() == []
        assert all(len(s.replicas) == 1 for s in topo.shards)
        assert {s.replicas[0].dial[1] for s in topo.shards} == {n.port for n in
                                                               cluster.replicas}
        # the owner of a key's slot is the node that accepts it
        rc = cluster.client()
        for key in (b"a", b"{user}:1", b"\xff\x00bin", b""):
            slot = key_slot(key)
            assert slot == rc.keyslot(key)
            assert topo.master_for_slot(slot).dial[1] == cluster.owner(slot).port
        view = topo.view()
        assert len(view) == 3 and view[0]["slots"] and view[0]["replicas"]


async def test_a_seed_that_does_not_answer_is_skipped() -> None:
    with running_cluster("redis7", replicas=0) as cluster:
        ep = Endpoint(addrs=(("127.0.0.1", 1), ("127.0.0.1", cluster.masters[1].port)))
        topo = await discover(ep, HostMapping(), role="source")
        assert len(topo.masters) == 3


@pytest.mark.parametrize("flavour", ["redis7", "redis6"])
async def test_announced_addresses_need_a_host_mapping(flavour: str) -> None:
    # every node announces 127.0.0.2:<1..3>, where nothing listens
    with running_cluster(flavour, replicas=0, announce_ip="127.0.0.2",
                         announce_port_base=1) as cluster:
        ep = endpoint(cluster)
        topo = await discover(ep, HostMapping(), role="target")
        assert sorted(m.announced for m in topo.masters) == [("127.0.0.2", i)
                                                             for i in (1, 2, 3)]
        with pytest.raises(EndpointError) as err:
            await check_reachable(topo, ep, role="target")
        msg = err.value.message
        assert "127.0.0.2:" in msg and "target.host_mapping" in msg, msg
        mapping = HostMapping({f"127.0.0.2:{i + 1}": f"127.0.0.1:{n.port}"
                               for i, n in enumerate(cluster.masters)})
        topo = await discover(ep, mapping, role="target")
        await check_reachable(topo, ep, role="target")
        conn = await Connection.open(*topo.masters[0].dial, role="target")
        try:
            again = await read_topology(conn, mapping)
        finally:
            conn.close()
        assert sorted(m.dial for m in again.masters) == sorted(m.dial for m in topo.masters)
        assert sum(b - a + 1 for s in again.shards for a, b in s.ranges) == SLOTS


def test_host_mapping_forms() -> None:
    m = HostMapping({"10.0.0.5:6379": "127.0.0.1:7000", "node-b": "127.0.0.9"})
    assert m.dial(("10.0.0.5", 6379)) == ("127.0.0.1", 7000)
    assert m.dial(("10.0.0.5", 6380)) == ("10.0.0.5", 6380)
    assert m.dial(("node-b", 6379)) == ("127.0.0.9", 6379)
    with pytest.raises(ValueError):
        HostMapping({"10.0.0.5:6379": "127.0.0.1"})
