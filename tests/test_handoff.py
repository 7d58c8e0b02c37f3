"""The ordering rules of handoff.py, as pure logic: no server (a slot's history is given,
so no fence is read from a master)."""

from __future__ import annotations

import asyncio

import pytest

from cdcd.entry import COMMAND, Batch
from cdcd.handoff import Handoff, HandoffDeadlock
from cdcd.readers.psync import StreamPos
from cdcd.spec import Endpoint
from cdcd.topology import SLOTS, key_slot

K = b"user:1"
S = key_slot(K)
OTHER = b"order:7"


def handoff(owner_of_s: str, moved: dict[int, list[tuple[str, int]]] | None = None
            ) -> Handoff:
    owner = ["a"] * SLOTS
    owner[S] = owner_of_s
    owner[key_slot(OTHER)] = "a"
    return Handoff(owner, {}, Endpoint(addrs=(("127.0.0.1", 1),)), moved)


def unit(shard: str, offset: int, *args: bytes) -> Batch:
    return Batch([(COMMAND, 0, list(args), offset)],
                 StreamPos(replid="r", offset=offset, db=0, shard=shard))


def test_clear_is_at_once_for_a_shards_own_slot_and_its_own_older_events() -> None:
    h = handoff("b", moved={S: [("a", 100)]})
    assert h.clear("a", key_slot(OTHER), 5)          # its slot, never moved
    assert h.clear("a", S, 90)                       # before it gave the slot away
    assert not h.clear("a", S, 150)                  # after: the slot is b's now
    assert not h.clear("b", S, 10)                   # the new owner waits for a's
    assert not h.clear("c", S, 10)
    plain = handoff("a")
    assert plain.clear("a", S, 1) and not plain.clear("b", S, 1)


async def test_the_new_owners_event_waits_for_the_previous_owners_older_ones() -> None:
    h = handoff("b", moved={S: [("a", 100)]})
    passed: list[tuple[str, bytes]] = []

    def sink(name: str):  # type: ignore[no-untyped-def]
        async def put(batch: Batch | None) -> None:
            assert batch is not None
            passed.extend((name, e[2][0]) for e in batch.entries)
        return put
    ga, gb = h.gate("a", sink("a")), h.gate("b", sink("b"))
    tasks = [asyncio.create_task(g.run()) for g in (ga, gb)]
    await gb.put(unit("b", 40, b"RESTORE", K, b"0", b"x"), True)
    await asyncio.sleep(0.01)
    assert passed == []                      # a has not read up to its fence yet
    await ga.put(unit("a", 90, b"DEL", K))
    await ga.put(unit("a", 120, b"SET", OTHER, b"1"))
    for _ in range(100):
        if len(passed) == 3:
            break
        await asyncio.sleep(0.01)
    assert passed.index(("a", b"DEL")) < passed.index(("b", b"RESTORE")), passed
    assert h.waits == {"b": 1}
    h.tick()
    assert S not in h.moved                  # settled: b's events in S go at once again
    assert h.clear("b", S, 50)
    for t in tasks:
        t.cancel()


async def test_two_shards_holding_what_the_other_waits_for_is_a_deadlock() -> None:
    t = b"cart:3"
    owner = ["a"] * SLOTS
    owner[S] = "b"
    owner[key_slot(t)] = "a"
    h = Handoff(owner, {}, Endpoint(addrs=(("127.0.0.1", 1),)),
                {S: [("a", 100)], key_slot(t): [("b", 100)]})
    ga, gb = h.gate("a", lambda batch: asyncio.sleep(0)), h.gate("b",
                                                                 lambda b: asyncio.sleep(0))
    # each holds, at its head, an event of a slot the other gave away, and behind it an
    # older event of its own in the slot the other waits for
    await ga.put(unit("a", 80, b"SET", t, b"1"), True)
    await ga.put(unit("a", 90, b"SET", K, b"1"))
    await gb.put(unit("b", 85, b"SET", K, b"1"), True)
    await gb.put(unit("b", 95, b"SET", t, b"1"))
    h.parsed.update({"a": 200, "b": 200})
    runs = [asyncio.create_task(g.run()) for g in (ga, gb)]
    with pytest.raises(HandoffDeadlock, match="wait for each other"):
        await asyncio.wait_for(asyncio.gather(*runs), 5)
    for t in runs:
        t.cancel()
