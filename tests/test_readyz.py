"""GET /readyz: 200 once the stored tasks are loaded, the tasks file reconciled and the
store writable; 503 with the envelope naming what is not ready otherwise."""

from __future__ import annotations

import json
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .daemon import Daemon
from .servers import wait_for
from .test_store_faults import (  # noqa: F401 (daemon_on and disk are fixtures)
    Disk,
    daemon_on,
    disk,
    waiting_spec,
    written,
)

FUTURE = "2099-01-01T00:00:00Z"


def check_not_ready(code: int, doc: Any, *needles: str) -> str:
    assert code == 503, (code, doc)
    assert set(doc) == {"code", "error", "message"}, doc
    assert doc["code"] == 503 and doc["error"] == "not_ready", doc
    for needle in needles:
        assert needle in doc["message"], (needle, doc)
    return str(doc["message"])


def test_ready_with_and_without_a_token(tmp_path: Path) -> None:
    d = Daemon(tmp_path / "open").start()
    try:
        code, doc = d.ready()
        assert code == 200 and doc["code"] == 200, doc
        assert doc["data"]["status"] == "ready" and doc["data"]["tasks"] == 0
        assert doc["data"]["store"] == {"path": str(tmp_path / "open" / "cdcd.json"),
                                        "writable": True}
        assert doc["data"]["tasks_file"] == {"path": None, "results": []}
    finally:
        assert d.stop() == 0

    # with a token: the status needs none; the reconciliation results are shown with it
    d = Daemon(tmp_path / "tok", token="rz-token").start()
    try:
        with urllib.request.urlopen(d.url + "/readyz", timeout=10) as r:
            doc = json.loads(r.read())
        assert r.status == 200 and doc["data"]["status"] == "ready"
        assert "tasks_file" not in doc["data"]
        assert "tasks_file" in d.ready()[1]["data"]
    finally:
        assert d.stop() == 0


@pytest.fixture
def silent_target() -> Iterator[str]:
    """An address that accepts connections (the kernel's backlog) and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        yield f"127.0.0.1:{s.getsockname()[1]}"


def test_not_ready_until_the_tasks_file_is_reconciled(tmp_path: Path,
                                                      silent_target: str) -> None:
    """create asks the target who it is (3 s timeout): meanwhile the daemon is live but
    not ready."""
    tasks = tmp_path / "tasks.json"
    tasks.write_text(json.dumps([{"task_id": "slow", "source": {"addrs": "127.0.0.1:1"},
                                  "target": {"addrs": silent_target}, "start_at": FUTURE}]))
    d = Daemon(tmp_path / "data", extra=["--tasks", str(tasks)]).start()
    try:
        check_not_ready(*d.ready(), f"tasks file {tasks} not reconciled yet (0 of 1 specs "
                                    f"done)")
        data = d.wait_ready(timeout=20)
        assert data["tasks_file"]["results"][0]["result"] == "created"
        assert d.task("slow")["state"] == "Initial"
    finally:
        assert d.stop() == 0


def test_stop_while_reconciling(tmp_path: Path, silent_target: str) -> None:
    tasks = tmp_path / "tasks.json"
    tasks.write_text(json.dumps([{"task_id": f"slow{i}", "source": {"addrs": "127.0.0.1:1"},
                                  "target": {"addrs": silent_target}, "start_at": FUTURE}
                                 for i in range(3)]))
    d = Daemon(tmp_path / "data", extra=["--tasks", str(tasks)]).start()
    assert d.ready()[0] == 503
    assert d.stop(timeout=10) == 0
    log = d.log_text()
    assert "Traceback" not in log and log.rstrip().endswith("INFO cdcd: stopped"), log


def test_not_ready_while_the_store_cannot_be_written(disk: Disk, daemon_on: Daemon) -> None:
    d = daemon_on
    d.create(waiting_spec("a"))
    # its second write (phase scheduled) done: no write in flight frees room after the fill
    wait_for(lambda: written(disk, "a", "scheduled"), 10, what="the task saved")
    assert d.ready()[0] == 200
    disk.fill()
    code, _ = d.api("create", waiting_spec("b"))   # a write, refused
    assert code == 503
    message = check_not_ready(*d.ready(), "the metadata store cannot be written: cannot "
                                          f"write {disk.path / 'cdcd.json'}: No space left "
                                          "on device")
    assert "tasks file" not in message
    with urllib.request.urlopen(d.url + "/healthz", timeout=10) as r:
        assert r.status == 200   # alive, just not ready
    disk.free()
    wait_for(lambda: d.ready()[0] == 200, 15, 0.2, what="ready again once the disk has room")
