"""Say what a task may write on its target, and whether the writes of two tasks can meet.

A task writes the target dbs its selected source dbs map to (``filter.dbs`` through
``db_mapping``; when ``filter.dbs`` is absent every source db is copied, so every target db
except those only mapped away from) and, in each, only the keys its prefix filter passes.
Two tasks on one target server are disjoint when no (db, key) can be written by both:
their target dbs do not meet, or no key can pass both key filters.

Pure logic, no I/O: the manager asks it before creating a task (``conflicts``), the
stale-key cleanup of a full resync asks it before deleting a key (``in_scope``). Which
tasks share a target server is for the caller to say (see ``cdcd.identity``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .markers import is_cdcd_key
from .spec import Filter, TaskSpec

# How many dbs a conflict sentence lists before it says "...".
_SHOW_DBS = 8


def writes_db(spec: TaskSpec, db: int) -> bool:
    """Say whether the task may write target db ``db`` (some copied source db maps there)."""
    if spec.filter.dbs is not None:
        return any(spec.target_db(d) == db for d in spec.filter.dbs)
    return db not in spec.db_mapping or db in spec.db_mapping.values()


def target_dbs(spec: TaskSpec) -> frozenset[int] | None:
    """Return the target dbs the task may write, or None when it copies every source db
    (then every db except the few ``db_mapping`` only maps away from: see ``writes_db``)."""
    if spec.filter.dbs is None:
        return None
    return frozenset(spec.target_db(d) for d in spec.filter.dbs)


def shared_dbs(a: TaskSpec, b: TaskSpec) -> frozenset[int] | None:
    """Return the target dbs both tasks may write: a set (empty when none), or None when
    both copy every source db (they then share every db but a few mapped away from)."""
    da, db_ = target_dbs(a), target_dbs(b)
    if da is None and db_ is None:
        # db_mapping holds at most 1024 entries per task, the db range is 16000 wide:
        # two unbounded tasks always share dbs.
        return None
    if da is None:
        assert db_ is not None
        return frozenset(d for d in db_ if writes_db(a, d))
    if db_ is None:
        return frozenset(d for d in da if writes_db(b, d))
    return da & db_


def dbs_overlap(a: TaskSpec, b: TaskSpec) -> bool:
    """Say whether some target db may be written by both tasks."""
    shared = shared_dbs(a, b)
    return shared is None or bool(shared)


def keys_disjoint(fa: Filter, fb: Filter) -> bool:
    """Say whether it is certain that no key passes both prefix filters.

    The keys a filter passes are those under one of its include prefixes (every key when
    it has none) and under none of its exclude prefixes. Keys under both an include prefix
    ``p`` of one filter and ``q`` of the other exist only when one of ``p``, ``q`` starts
    with the other, and they are then exactly the keys under the longer one, ``r``. All of
    those are excluded (by either filter) only when an exclude prefix starts ``r`` itself,
    since the key ``r`` is one of them. So: disjoint when every such ``r`` starts with an
    exclude prefix of either filter. Exact, not only safe.
    """
    excluded = fa.exclude_prefixes + fb.exclude_prefixes

    def covered(r: bytes) -> bool:
        return bool(excluded) and r.startswith(excluded)

    for p in fa.include_prefixes or (b"",):
        if covered(p):          # every key under p is excluded, so is every longer r
            continue
        for q in fb.include_prefixes or (b"",):
            if q.startswith(p):
                r = q
            elif p.startswith(q):
                r = p
            else:
                continue
            if not covered(r):
                return False
    return True


def disjoint(a: TaskSpec, b: TaskSpec) -> bool:
    """Say whether two tasks writing one target server can never write the same key
    (their target dbs do not meet, or their key filters cannot both pass a key)."""
    return not dbs_overlap(a, b) or keys_disjoint(a.filter, b.filter)


def in_scope(spec: TaskSpec, target_db: int, key: bytes) -> bool:
    """Say whether ``key`` in target db ``target_db`` could have been written by the task.

    cdcd's own keys (``markers.is_cdcd_key``: checkpoints, big keys being rebuilt) never
    are, whatever the filter says: the stale-key cleanup of a resync must not delete
    another task's checkpoint.
    """
    return (writes_db(spec, target_db) and spec.filter.key_ok(key)
            and not is_cdcd_key(key))


@dataclass(frozen=True, kw_only=True)
class Overlap:
    """Another task that may write the same keys: which task, and in which target dbs
    (None: every db)."""

    other: TaskSpec
    dbs: frozenset[int] | None

    def describe(self, spec: TaskSpec) -> str:
        """Say, for an operator creating ``spec``, what already writes where and the way out."""
        o = self.other
        target = spec.target.display
        if self.dbs is None:
            where = f"target {target} is already written (in every db)"
        elif len(self.dbs) == 1:
            where = f"target {target} db {min(self.dbs)} is already written"
        else:
            shown = sorted(self.dbs)
            more = ", ..." if len(shown) > _SHOW_DBS else ""
            where = (f"target {target} dbs {', '.join(map(str, shown[:_SHOW_DBS]))}{more} "
                     f"are already written")
        return (f"{where} by task '{o.task_id}' (source {o.source.display} -> target "
                f"{o.target.display}, {describe_keys(o.filter)}); give disjoint filter.dbs or "
                f"include_prefixes, or set shared_target: true")


def describe_keys(flt: Filter) -> str:
    """Name the keys a filter passes: 'every key', "keys under 'user:' except 'user:tmp:'"."""
    def names(prefixes: tuple[bytes, ...]) -> str:
        shown = ", ".join(repr(p.decode("utf-8", "backslashreplace")) for p in prefixes[:4])
        return shown + (", ..." if len(prefixes) > 4 else "")

    text = f"keys under {names(flt.include_prefixes)}" if flt.include_prefixes else "every key"
    if flt.exclude_prefixes:
        text += f" except under {names(flt.exclude_prefixes)}"
    return text


def conflicts(spec: TaskSpec, others: Iterable[TaskSpec]) -> list[Overlap]:
    """Return the other tasks that may write a key ``spec`` may write, in the given order.

    ``others`` are tasks that write the same target server (the caller decides that); the
    task itself (same ``task_id``) is skipped, and so is every pair where either task says
    ``shared_target: true``.
    """
    out: list[Overlap] = []
    if spec.shared_target:
        return out
    for other in others:
        if other.task_id == spec.task_id or other.shared_target:
            continue
        dbs = shared_dbs(spec, other)
        if (dbs is not None and not dbs) or keys_disjoint(spec.filter, other.filter):
            continue
        out.append(Overlap(other=other, dbs=dbs))
    return out
