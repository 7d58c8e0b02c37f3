"""Where a task's marker lives (pure logic; the end-to-end behaviour is in test_faults.py,
test_incremental.py and test_shared_target.py)."""

from __future__ import annotations

from typing import Any

import pytest

from cdcd.markers import Markers, choose_db, is_cdcd_key
from cdcd.scope import writes_db
from cdcd.spec import parse_spec
from cdcd.task import Task


def spec(**kw: Any) -> Any:
    return parse_spec({"source": {"addrs": "127.0.0.1:1"}, "target": {"addrs": "127.0.0.1:2"},
                       "migration_method": "incremental_migration", **kw})


@pytest.mark.parametrize("kw,source_dbs,expected", [
    ({}, [0], 15),                                     # every db may be written: a free one
    ({}, [0, 15], 14),
    ({}, list(range(16)), 0),                          # none free: db 0
    ({"filter": {"dbs": [0, 15]}}, [0], 14),           # the highest db never written
    ({"filter": {"dbs": [3]}, "db_mapping": {"3": 15}}, [3], 14),
    ({"db_mapping": {"15": 0}}, [0, 15], 15),          # db 15 only maps away
])
def test_choose_db(kw: dict[str, Any], source_dbs: list[int], expected: int) -> None:
    s = spec(**kw)
    used = [s.target_db(d) for d in source_dbs if s.filter.db_ok(d)]
    assert choose_db(16, lambda db: writes_db(s, db), used) == expected


def test_records_of_older_versions_keep_the_marker_in_db_0() -> None:
    async def persist(task: Task, lazy: bool) -> None:
        pass
    old = {"state": "Running", "checkpoint": {"stream": {"replid": "r", "offset": 5, "db": 0}}}
    assert Task(spec(task_id="old"), persist, record=old).markers.db == 0
    new = {"state": "Running", "checkpoint": {"marker_db": 15, "started": {"at": "x"}}}
    task = Task(spec(task_id="new"), persist, record=new)
    assert task.markers.db == 15
    assert task.view()["markers"] == ["db 15: cdcd:checkpoint:new"]


def test_marker_format_and_cdcd_keys() -> None:
    from cdcd.readers.psync import StreamPos
    m = Markers("t1", 7)
    assert m.command(StreamPos(replid="abc", offset=42, db=3)) == [b"SET", b"cdcd:checkpoint:t1",
                                                                   b"abc 42 3"]
    assert is_cdcd_key(b"cdcd:checkpoint:x") and is_cdcd_key(b"cdcd:tmp:t:{k}")
    assert not is_cdcd_key(b"cdcd:other") and not is_cdcd_key(b"user:1")
