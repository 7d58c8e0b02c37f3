"""Declarative tasks: ``cdcd serve --tasks PATH`` creates the file's specs at start-up
through the API's create, idempotently by task_id, across restarts; a changed spec is
reported and not applied; a bad file stops the daemon naming the file, index and field."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .compare import assert_same, fill_bulk
from .daemon import Daemon, run_serve, spec
from .servers import RedisServer

FUTURE = "2099-01-01T00:00:00Z"


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    made: list[Daemon] = []
    yield made
    for d in made:
        if d.proc is not None and d.proc.poll() is None:
            assert d.stop() == 0, d.log_text()[-2000:]


def write(path: Path, doc: Any) -> Path:
    path.write_text(json.dumps(doc, indent=2))
    return path


def results(d: Daemon) -> dict[str, str]:
    data = d.wait_ready()
    return {r["task_id"]: r["result"] for r in data["tasks_file"]["results"]}


def test_tasks_file_is_created_and_reconciled_across_restarts(
        tmp_path: Path, daemons: list[Daemon], servers: Callable[..., RedisServer]) -> None:
    src, dst1, dst2 = servers(), servers(), servers()
    fill_bulk(src.client(), 300)
    specs = [spec(src, dst1, task_id="copy1", name="first"),
             spec(src, dst2, task_id="copy2")]
    tasks = write(tmp_path / "tasks.json", specs)
    d = Daemon(tmp_path / "data", extra=["--tasks", str(tasks)])
    daemons.append(d)
    d.start()
    assert results(d) == {"copy1": "created", "copy2": "created"}
    for tid in ("copy1", "copy2"):
        d.wait_state(tid, "Succeeded")
    assert_same(src.client(), dst1.client())
    assert_same(src.client(), dst2.client())
    log = d.log_text()
    assert "task copy1: created from " + str(tasks) + "[0]" in log, log
    assert "tasks file reconciled: 2 created" in log
    before = d.store()["tasks"]

    # a restart with the same file changes nothing (no new task, no second copy)
    d.restart()
    assert results(d) == {"copy1": "unchanged", "copy2": "unchanged"}
    assert [t["state"] for t in d.ok("list")["tasks"]] == ["Succeeded", "Succeeded"]
    assert {k: v["spec"] for k, v in d.store()["tasks"].items()} == \
        {k: v["spec"] for k, v in before.items()}

    # a changed spec is reported, not applied; a spec removed from the file is kept
    write(tasks, [spec(src, dst1, task_id="copy1", name="renamed", bandwidth_limit_mb=5)])
    d.restart()
    data = d.wait_ready()
    (res,) = data["tasks_file"]["results"]
    assert res["task_id"] == "copy1" and res["result"] == "differs", res
    assert res["file"] == str(tasks) and res["index"] == 0
    assert "bandwidth_limit_mb" in res["message"] and "name" in res["message"], res
    assert "not applied" in res["message"]
    t = d.task("copy1")
    assert t["name"] == "first" and t["spec"].get("bandwidth_limit_mb") is None
    assert {t["task_id"] for t in d.ok("list")["tasks"]} == {"copy1", "copy2"}
    assert "task copy1: the spec in " + str(tasks) + "[0] differs from the stored task" in \
        d.log_text()
    assert "Traceback" not in d.log_text()


def test_tasks_directory_and_environment(tmp_path: Path, daemons: list[Daemon],
                                         servers: Callable[..., RedisServer]) -> None:
    src, dst = servers(), servers()
    src.client().set("k", "v")
    folder = tmp_path / "tasks.d"
    folder.mkdir()
    write(folder / "a.json", spec(src, dst, task_id="from-a", filter={"dbs": [0]}))
    write(folder / "b.json", [{"task_id": "later", "source": {"addrs": src.addr},
                               "target": {"addrs": dst.addr}, "start_at": FUTURE,
                               "filter": {"dbs": [1]}}])
    (folder / "notes.txt").write_text("not a spec")
    d = Daemon(tmp_path / "data", env={"CDCD_TASKS": str(folder)})
    daemons.append(d)
    d.start()
    assert results(d) == {"from-a": "created", "later": "created"}
    d.wait_state("from-a", "Succeeded")
    assert dst.client().get("k") == b"v"
    assert d.task("later")["state"] == "Initial"
    d.restart()
    assert results(d) == {"from-a": "unchanged", "later": "unchanged"}


def test_refused_and_failing_tasks_do_not_stop_the_daemon(
        tmp_path: Path, daemons: list[Daemon], servers: Callable[..., RedisServer]) -> None:
    """A 409 (max_tasks) is reported; a task whose server is unreachable is just Failed."""
    src = servers()
    tasks = write(tmp_path / "tasks.json", [
        {"task_id": "dead", "source": {"addrs": src.addr}, "target": {"addrs": "127.0.0.1:1"},
         "reader": "scan"},
        {"task_id": "one-too-many", "source": {"addrs": src.addr},
         "target": {"addrs": "127.0.0.1:2"}, "start_at": FUTURE}])
    d = Daemon(tmp_path / "data", extra=["--tasks", str(tasks), "--max-tasks", "1"])
    daemons.append(d)
    d.start()
    data = d.wait_ready()
    by_id = {r["task_id"]: r for r in data["tasks_file"]["results"]}
    assert by_id["dead"]["result"] == "created"
    assert by_id["one-too-many"]["result"] == "refused"
    assert "max_tasks" in by_id["one-too-many"]["message"]
    t = d.wait_state("dead", "Failed", timeout=30)
    assert "127.0.0.1:1" in t["reason"], t


@pytest.mark.parametrize("content,needle", [
    ('[{"task_id": "a", "source": {"addrs": "127.0.0.1:1"}, "target": {"addrs": '
     '"127.0.0.1:2"}}, {"source": {"addrs": "127.0.0.1:1"}, "target": {"addrs": '
     '"127.0.0.1:3"}}]', "tasks.json[1].task_id: required in a tasks file"),
    ('{"source": {"addrs": "127.0.0.1:1"}, "target": {"addrs": "127.0.0.1:2"}}',
     "tasks.json.task_id: required in a tasks file"),
    ('[{"task_id": "a", "target": {"addrs": "127.0.0.1:2"}}]',
     "tasks.json[0].source: required"),
    ('[{"task_id": "a", "source": {"addrs": "127.0.0.1:1"}, "target": {"addrs": '
     '"127.0.0.1:2"}, "bandwidth_limit_mb": 0}]', "tasks.json[0].bandwidth_limit_mb: must"),
    ('[{"task_id": "a", "source": {"addrs": "127.0.0.1:1"}, "target": {"addrs": '
     '"127.0.0.1:2"}, "colour": "red"}]', "tasks.json[0].colour: unknown field"),
    ('[{"task_id": "a", "source": {"addrs": "127.0.0.1:1"}, "target": {"addrs": '
     '"127.0.0.1:2"}}, {"task_id": "a", "source": {"addrs": "127.0.0.1:1"}, "target": '
     '{"addrs": "127.0.0.1:2"}}]', "tasks.json[1].task_id: 'a' is declared twice"),
    ('[{"task_id": "a",\n "source": }]', "tasks.json: not valid JSON: Expecting value at "
                                         "line 2"),
    ('"a string"', "tasks.json: must hold a task spec"),
    ('[42]', "tasks.json[0]: must be a task spec"),
])
def test_bad_tasks_file_stops_the_daemon(tmp_path: Path, content: str, needle: str) -> None:
    (tmp_path / "tasks.json").write_text(content)
    r = run_serve("--tasks", str(tmp_path / "tasks.json"), "--data-dir",
                  str(tmp_path / "data"), cwd=tmp_path)
    assert r.returncode == 2, r
    assert str(tmp_path / needle) in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and "listening on" not in r.stderr
    assert not (tmp_path / "data").exists()


def test_unreadable_tasks_file(tmp_path: Path) -> None:
    folder = tmp_path / "tasks.d"
    folder.mkdir()
    (folder / "bad.json").write_bytes(b"\xff\xfe")
    r = run_serve("--tasks", str(folder), cwd=tmp_path)
    assert r.returncode == 2 and f"tasks file {folder / 'bad.json'}: not UTF-8" in r.stderr, r
