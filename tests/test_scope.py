"""A task's write scope on its target (cdcd.scope): pure logic, no servers."""

from __future__ import annotations

import itertools
import random
from typing import Any

import pytest

from cdcd.markers import PREFIX as MARKER_PREFIX
from cdcd.markers import TMP_PREFIX
from cdcd.scope import (
    conflicts,
    dbs_overlap,
    describe_keys,
    disjoint,
    in_scope,
    keys_disjoint,
    shared_dbs,
    target_dbs,
    writes_db,
)
from cdcd.spec import Filter, TaskSpec, parse_spec

_ids = itertools.count()


def task(dbs: list[int] | None = None, inc: tuple[str, ...] = (), exc: tuple[str, ...] = (),
         mapping: dict[str, int] | None = None, **kw: Any) -> TaskSpec:
    """A spec through the API parser; only the write scope varies."""
    data: dict[str, Any] = {"task_id": kw.pop("task_id", f"t{next(_ids)}"),
                            "source": {"addrs": "127.0.0.1:7001"},
                            "target": {"addrs": "127.0.0.1:7002"},
                            "filter": {"include_prefixes": list(inc),
                                       "exclude_prefixes": list(exc)},
                            "db_mapping": mapping or {}, **kw}
    if dbs is not None:
        data["filter"]["dbs"] = dbs
    return parse_spec(data)


def flt(inc: tuple[str, ...] = (), exc: tuple[str, ...] = ()) -> Filter:
    return Filter(include_prefixes=tuple(p.encode() for p in inc),
                  exclude_prefixes=tuple(p.encode() for p in exc))


# --- dbs -------------------------------------------------------------------------------------

def test_target_dbs_follow_the_mapping() -> None:
    assert target_dbs(task()) is None
    assert target_dbs(task([0, 1])) == frozenset({0, 1})
    assert target_dbs(task([0, 1], mapping={"1": 5})) == frozenset({0, 5})
    assert target_dbs(task([0, 1], mapping={"0": 3, "1": 3})) == frozenset({3})
    # every source db: a db only mapped away from is not written, one mapped to is
    every = task(mapping={"1": 0, "2": 9})
    assert [d for d in range(12) if writes_db(every, d)] == [0, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    assert writes_db(task(), 15_999)


@pytest.mark.parametrize(("a", "b", "shared"), [
    (task([0]), task([1]), set()),
    (task([0, 1]), task([1, 2]), {1}),
    (task([1], mapping={"1": 0}), task([0]), {0}),            # mapped onto the other's db
    (task([1], mapping={"1": 2}), task([1]), set()),          # mapped away from it
    (task([3]), task(), {3}),                                 # bounded vs every db
    (task([1]), task(mapping={"1": 0}), set()),               # db 1 only mapped away from
    (task([0]), task(mapping={"1": 0}), {0}),
    (task([4, 7]), task(mapping={"4": 5}), {7}),
    (task(), task(), None),                                   # both unbounded
    (task(mapping={"0": 1}), task(mapping={"1": 0}), None),
])
def test_shared_dbs(a: TaskSpec, b: TaskSpec, shared: set[int] | None) -> None:
    assert shared_dbs(a, b) == shared
    assert shared_dbs(b, a) == shared
    assert dbs_overlap(a, b) is (shared is None or bool(shared))
    assert dbs_overlap(b, a) is dbs_overlap(a, b)


# --- keys ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("fa", "fb", "expected"), [
    # no include prefix means every key
    (flt(), flt(), False),
    (flt(), flt(inc=("a",)), False),
    (flt(exc=("a",)), flt(inc=("a",)), True),                 # the other excludes all of it
    (flt(exc=("a",)), flt(inc=("ab",)), True),                # 'ab' is under excluded 'a'
    (flt(exc=("ab",)), flt(inc=("a",)), False),               # 'a', 'ac' pass both
    (flt(exc=("a", "b")), flt(inc=("a", "b")), True),
    (flt(exc=("a",)), flt(inc=("a", "b")), False),
    # disjoint and nested include prefixes
    (flt(inc=("a",)), flt(inc=("b",)), True),
    (flt(inc=("a",)), flt(inc=("ab",)), False),               # 'ab...' passes both
    (flt(inc=("ab",)), flt(inc=("a",)), False),
    (flt(inc=("ab",)), flt(inc=("ac",)), True),
    (flt(inc=("user:",)), flt(inc=("user",)), False),
    (flt(inc=("user:",)), flt(inc=("users:",)), True),
    (flt(inc=("a",)), flt(inc=("a",)), False),
    (flt(inc=("x", "a")), flt(inc=("b", "ab")), False),
    (flt(inc=("x", "y")), flt(inc=("a", "b", "xa")), False),
    # an exclude prefix (of either filter) removes the shared keys
    (flt(inc=("a",), exc=("ab",)), flt(inc=("ab",)), True),   # own exclude covers the other
    (flt(inc=("ab",)), flt(inc=("a",), exc=("ab",)), True),
    (flt(inc=("a",), exc=("abc",)), flt(inc=("ab",)), False), # 'ab', 'abd' pass both
    (flt(inc=("a",)), flt(inc=("a",), exc=("a",)), True),     # the other passes nothing
    (flt(inc=("a",), exc=("ab", "ac")), flt(inc=("ab", "ac")), True),
    (flt(inc=("a",), exc=("ab",)), flt(inc=("ab", "ac")), False),
    (flt(inc=("ab",), exc=("x",)), flt(inc=("a",), exc=("y",)), False),
    (flt(inc=("a",)), flt(exc=("a",)), True),
    (flt(inc=("a",)), flt(exc=("b",)), False),
    # an exclude longer than the other's include does not cover it
    (flt(inc=("a",)), flt(exc=("aa",)), False),
    # bytes that are not UTF-8 compare as bytes
    (Filter(include_prefixes=(b"\xff",)), Filter(include_prefixes=(b"\xfe",)), True),
    (Filter(include_prefixes=(b"\xff",)), Filter(include_prefixes=(b"\xff\x00",)), False),
])
def test_keys_disjoint(fa: Filter, fb: Filter, expected: bool) -> None:
    assert keys_disjoint(fa, fb) is expected
    assert keys_disjoint(fb, fa) is expected


KEYS = [b"", b"a", b"ab", b"abc", b"abd", b"ac", b"b", b"ba", b"user:1", b"users:1", b"x",
        b"xa", b"y", b"\xff", b"\xff\x00"]


@pytest.mark.parametrize(("fa", "fb"), [
    (flt(inc=("a",), exc=("abc",)), flt(inc=("ab",))),
    (flt(inc=("a",), exc=("ab", "ac")), flt(inc=("ab", "ac"))),
    (flt(exc=("a",)), flt(inc=("ab",))),
    (flt(inc=("x", "y")), flt(inc=("a", "b", "xa"))),
    (flt(inc=("ab",)), flt(inc=("ac",))),
])
def test_keys_disjoint_agrees_with_key_ok(fa: Filter, fb: Filter) -> None:
    """When keys_disjoint says False a key passing both exists among KEYS, and never one
    when it says True (the cases are built so that KEYS holds a witness)."""
    both = [k for k in KEYS if fa.key_ok(k) and fb.key_ok(k)]
    assert keys_disjoint(fa, fb) is (not both), both


def test_keys_disjoint_matches_brute_force() -> None:
    """Random small filters over the alphabet 'ab': keys_disjoint is exact, so it agrees
    with trying every key up to 4 bytes (a shared key, when any, is an include prefix)."""
    rng = random.Random(7)
    keys = [bytes(p) for n in range(5) for p in itertools.product(b"abc", repeat=n)]

    def prefixes(most: int) -> tuple[bytes, ...]:
        return tuple({bytes(rng.choice(b"ab") for _ in range(rng.randint(1, 3)))
                      for _ in range(rng.randint(0, most))})

    for _ in range(2000):
        fa = Filter(include_prefixes=prefixes(3), exclude_prefixes=prefixes(2))
        fb = Filter(include_prefixes=prefixes(3), exclude_prefixes=prefixes(2))
        both = [k for k in keys if fa.key_ok(k) and fb.key_ok(k)]
        assert keys_disjoint(fa, fb) is (not both), (fa, fb, both[:3])


def test_many_prefixes_stay_fast() -> None:
    a = flt(inc=tuple(f"a{i}:" for i in range(256)), exc=tuple(f"x{i}" for i in range(256)))
    b = flt(inc=tuple(f"b{i}:" for i in range(256)), exc=tuple(f"y{i}" for i in range(256)))
    assert keys_disjoint(a, b)


# --- tasks -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("a", "b", "expected"), [
    (task(), task(), False),
    (task([0]), task([1]), True),
    (task([0], inc=("user:",)), task([0], inc=("order:",)), True),
    (task([0], inc=("user:",)), task([1], inc=("user:",)), True),
    (task([0], inc=("user:",)), task([0, 1], inc=("user:1",)), False),
    (task([1], mapping={"1": 0}, inc=("a",)), task([0], inc=("a",)), False),
    (task(inc=("a",)), task(exc=("a",)), True),
    (task(mapping={"0": 1}), task([0]), True),                # db 0 only mapped away from
])
def test_disjoint(a: TaskSpec, b: TaskSpec, expected: bool) -> None:
    assert disjoint(a, b) is expected
    assert disjoint(b, a) is expected


def test_in_scope() -> None:
    spec = task([1, 2], mapping={"2": 0}, inc=("user:",), exc=("user:tmp:",))
    assert in_scope(spec, 1, b"user:1")
    assert in_scope(spec, 0, b"user:1")                       # source db 2 lands in db 0
    assert not in_scope(spec, 2, b"user:1")                   # nothing lands in db 2
    assert not in_scope(spec, 3, b"user:1")
    assert not in_scope(spec, 1, b"order:1")
    assert not in_scope(spec, 1, b"user:tmp:1")
    every = task()
    assert in_scope(every, 0, b"") and in_scope(every, 15, b"anything")
    # no task's checkpoint key is ever in scope: a resync must not delete another's
    assert not in_scope(every, 0, MARKER_PREFIX + b"other-task")
    assert not in_scope(every, 0, MARKER_PREFIX + spec.task_id.encode())
    assert not in_scope(every, 0, TMP_PREFIX + b"other-task:{big}")
    assert in_scope(every, 0, b"cdcd:other")


def test_conflicts_names_the_overlapping_tasks() -> None:
    new = task([0], inc=("user:",), task_id="new")
    others = [
        task([1], task_id="other-db"),
        task([0], inc=("order:",), task_id="other-keys"),
        task(task_id="everything"),
        task([0], inc=("user:",), shared_target=True, task_id="shared"),
        task([0], task_id="new"),                             # itself: a re-create
        task([0, 3], inc=("user:9",), task_id="narrower"),
    ]
    found = conflicts(new, others)
    assert [(o.other.task_id, o.dbs) for o in found] == [("everything", frozenset({0})),
                                                          ("narrower", frozenset({0}))]
    assert conflicts(task([0], inc=("user:",), shared_target=True), others) == []


def test_conflict_sentence() -> None:
    other = task([0, 1], inc=("user:",), exc=("user:tmp:",), task_id="abc")
    new = task([0], task_id="new", target={"addrs": "localhost:7002"})
    (overlap,) = conflicts(new, [other])
    assert overlap.describe(new) == (
        "target localhost:7002 db 0 is already written by task 'abc' (source 127.0.0.1:7001 "
        "-> target 127.0.0.1:7002, keys under 'user:' except under 'user:tmp:'); give "
        "disjoint filter.dbs or include_prefixes, or set shared_target: true")
    (overlap,) = conflicts(task([0, 1, 2]), [other])
    assert "dbs 0, 1 are already written by task 'abc'" in overlap.describe(new)
    (overlap,) = conflicts(task(), [task(task_id="all")])
    text = overlap.describe(new)
    assert text.startswith("target localhost:7002 is already written (in every db) by task "
                           "'all' (source 127.0.0.1:7001 -> target 127.0.0.1:7002, every key)")
    assert describe_keys(flt(exc=("tmp:",))) == "every key except under 'tmp:'"
