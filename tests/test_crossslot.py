"""Pure logic of a cluster target: how each replicated command is applied (crossslot.plan)
and what a task resumes from given its slot markers (SlotMarkers.judge)."""

from __future__ import annotations

from cdcd import crossslot as cs
from cdcd.markers import SLOTS, SlotMarkers, slot_tags
from cdcd.readers.psync import StreamPos
from cdcd.topology import key_slot


def test_every_slot_has_a_marker_key_in_it() -> None:
    m = SlotMarkers("t")
    assert len(slot_tags()) == SLOTS
    assert all(key_slot(m.key(s)) == s for s in range(SLOTS))
    assert m.key(5).startswith(b"cdcd:checkpoint:t:{")


def test_single_slot_commands_go_as_they_are() -> None:
    assert cs.plan([b"INCR", b"k"]) == cs.Plan(cs.ONE, key_slot(b"k"))
    assert cs.plan([b"mset", b"{u}a", b"1", b"{u}b", b"2"]).kind == cs.ONE
    assert cs.plan([b"RENAME", b"{u}a", b"{u}b"]).kind == cs.ONE
    assert cs.plan([b"XGROUP", b"CREATE", b"s", b"g", b"$"]).slot == key_slot(b"s")
    assert cs.plan([b"PUBLISH", b"ch", b"m"]).kind == cs.ONE


def test_splittable_commands_split_per_slot() -> None:
    p = cs.plan([b"MSETNX", b"a", b"1", b"b", b"2", b"c", b"3"])
    assert p.kind == cs.SPLIT
    assert all(cmd[0] == b"MSET" for _, cmd in p.parts)    # replicated only on success
    keys = sorted(k for _, cmd in p.parts for k in cmd[1::2])
    assert keys == [b"a", b"b", b"c"]
    assert all(key_slot(cmd[1]) == slot for slot, cmd in p.parts)
    d = cs.plan([b"DEL", b"a", b"b", b"{a}x"])
    assert d.kind == cs.SPLIT and sorted(len(c) for _, c in d.parts) == [2, 3]


def test_moves_and_stores_name_their_keys() -> None:
    r = cs.plan([b"RENAME", b"a", b"b"])
    assert (r.kind, r.src, r.dst) == (cs.RENAME, b"a", b"b")
    assert cs.plan([b"RPOPLPUSH", b"a", b"b"]).kind == cs.LMOVE
    assert cs.plan([b"SMOVE", b"a", b"b", b"m"]).kind == cs.SMOVE
    assert cs.plan([b"COPY", b"a", b"b", b"DB", b"0"]).kind == cs.FATAL
    z = cs.plan([b"ZUNIONSTORE", b"d", b"2", b"a", b"b", b"WEIGHTS", b"1", b"2"])
    assert z.kind == cs.STORE and [k for _, k in z.foreign] == [b"a", b"b"]
    assert [i for i, _ in z.foreign] == [3, 4]
    b = cs.plan([b"BITOP", b"OR", b"d", b"a", b"{d}x"])
    assert b.kind == cs.STORE and [k for _, k in b.foreign] == [b"a"]
    srt = cs.plan([b"SORT", b"a", b"ALPHA", b"STORE", b"d"])
    assert srt.kind == cs.STORE and srt.dst == b"d"
    assert cs.plan([b"SORT", b"a", b"BY", b"w_*", b"STORE", b"d"]).kind == cs.FATAL
    assert cs.plan([b"SORT", b"a", b"BY", b"nosort", b"STORE", b"{a}d"]).kind == cs.ONE


def test_what_cannot_be_applied_on_a_cluster_says_why() -> None:
    assert "db 0 only" in cs.plan([b"SWAPDB", b"0", b"1"]).why
    assert "db 0 only" in cs.plan([b"MOVE", b"k", b"3"]).why
    ev = cs.plan([b"EVAL", b"return 1", b"2", b"a", b"b"])
    assert ev.kind == cs.FATAL and "hash tag" in ev.why
    assert cs.plan([b"EVAL", b"return 1", b"2", b"{a}1", b"{a}2"]).kind == cs.ONE
    assert cs.plan([b"FUNCTION", b"LOAD", b"code"]).kind == cs.ALL
    assert cs.plan([b"FLUSHALL"]).kind == cs.FLUSH


def pos(offset: int) -> StreamPos:
    return StreamPos(replid="r" * 40, offset=offset, db=0)


def test_judge_resumes_from_the_checkpoint_and_skips_per_slot() -> None:
    marks = {s: pos(100) for s in range(SLOTS)}
    marks[7] = pos(150)
    v = SlotMarkers.judge(marks, pos(120), {})
    assert v.resume == pos(120) and v.skip == {7: 150} and not v.lost


def test_judge_goes_back_for_a_changed_master() -> None:
    marks = {s: pos(100) for s in range(SLOTS)}
    marks[3] = pos(40)
    v = SlotMarkers.judge(marks, pos(120), {"m1": [3, 4]})
    assert v.resume is not None and v.resume.offset == 40
    assert v.skip[5] == 100 and 3 not in v.skip
    assert "m1" in v.lost and not v.full
    # a changed master whose slots hold everything: nothing lost
    assert not SlotMarkers.judge(marks, pos(30), {"m1": [3]}).lost


def test_judge_full_sync_when_slots_lost_their_markers() -> None:
    marks = {s: pos(100) for s in range(SLOTS) if not 5000 <= s < 6000}
    v = SlotMarkers.judge(marks, pos(100), {})
    assert v.full and v.resume is None and "5000-5999" in v.lost
    # no checkpoint saved yet but every slot marked: resume from the oldest marker
    full = {s: pos(100 + s % 3) for s in range(SLOTS)}
    v = SlotMarkers.judge(full, None, {})
    assert v.resume == pos(100) and v.skip[1] == 101
    assert SlotMarkers.judge(marks, None, {}).resume is None
