"""Log formats: JSON lines (ts, level, logger, msg, task_id, exc) and the text format,
with control characters escaped in both so that no message can forge a log line."""

from __future__ import annotations

import io
import json
import logging
import re
import sys
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import pytest

from cdcd.logs import JsonFormatter, TextFormatter, escape, setup, task_id_of

from .daemon import Daemon, spec
from .servers import RedisServer

EVIL = "evil\nINFO cdcd: forged line\r\x1b[2J\u2028end"


def record(name: str, msg: str, *args: object, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom\nsecond line")
        except ValueError:
            exc_info = sys.exc_info()
    return logging.LogRecord(name, logging.WARNING, __file__, 1, msg, args, exc_info)


def test_escape() -> None:
    assert escape("plain text é ü 日本") == "plain text é ü 日本"
    assert escape(EVIL) == "evil\\nINFO cdcd: forged line\\r\\x1b[2J\\u2028end"
    assert escape("a\tb\x00c\x7fd\x85e") == "a\\tb\\x00c\\x7fd\\x85e"


def test_task_id_from_the_convention() -> None:
    assert task_id_of(record("cdcd.task", "task %s: phase %s", "t1", "snapshot")) == "t1"
    assert task_id_of(record("cdcd.manager", "task %s: created", "t2")) == "t2"
    assert task_id_of(record("cdcd.reader.psync", "task %s: x", "t3")) == "t3"
    assert task_id_of(record("cdcd.task", "stopped %d tasks", 3)) is None
    assert task_id_of(record("cdcd.server", "task %s: not a task logger", "t4")) is None
    rec = record("cdcd.server", "anything")
    rec.task_id = "t5"
    assert task_id_of(rec) == "t5"


def test_json_formatter() -> None:
    f = JsonFormatter()
    doc = json.loads(f.format(record("cdcd.task", "task %s: name %s", "t1", EVIL)))
    assert set(doc) == {"ts", "level", "logger", "msg", "task_id"}
    assert doc["level"] == "WARNING" and doc["logger"] == "cdcd.task"
    assert doc["task_id"] == "t1"
    assert doc["msg"] == "task t1: name " + escape(EVIL)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", doc["ts"]), doc["ts"]
    assert datetime.fromisoformat(doc["ts"].replace("Z", "+00:00")).tzinfo is not None
    line = f.format(record("cdcd.server", "bug", exc=True))
    assert "\n" not in line and "\u2028" not in line
    doc = json.loads(line)
    assert "task_id" not in doc
    assert doc["exc"].startswith("Traceback") and "ValueError: boom" in doc["exc"]


def test_text_formatter_escapes_the_message_only() -> None:
    out = TextFormatter().format(record("cdcd.task", "task %s: name %s", "t1", EVIL))
    assert "\n" not in out and "\r" not in out and "\x1b" not in out
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} WARNING cdcd\.task: task t1: "
                        r"name evil\\nINFO cdcd: forged line.*end", out), out


@pytest.fixture
def root_logging() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    stream = io.StringIO()
    setup("info", "json", stream)
    yield stream
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


def test_setup_json(root_logging: io.StringIO) -> None:
    logging.getLogger("cdcd.task").info("task %s: %s", "x", "two\nlines")
    logging.getLogger("cdcd.task").debug("not shown")
    (line,) = root_logging.getvalue().splitlines()
    assert json.loads(line)["msg"] == "task x: two\\nlines"


def test_daemon_json_logs(tmp_path: Path, servers: Callable[..., RedisServer]) -> None:
    src, dst = servers(), servers()
    src.client().set("k", "v")
    tasks = tmp_path / "tasks.json"
    tasks.write_text(json.dumps([spec(src, dst, task_id="jl", name=EVIL)]))
    d = Daemon(tmp_path / "data", extra=["--log-format", "json", "--tasks", str(tasks)])
    d.start()
    try:
        d.wait_state("jl", "Succeeded")
        d.wait_ready()
        code, doc = d.api("create", {"task_id": "bad"})   # a 400: logged by nobody
        assert code == 400
    finally:
        assert d.stop() == 0
    docs = [json.loads(line) for line in d.log_text().splitlines()]   # every line parses
    assert docs and all({"ts", "level", "logger", "msg"} <= set(x) for x in docs)
    msgs = [x["msg"] for x in docs]
    assert any(m.startswith("listening on http://127.0.0.1:") for m in msgs), msgs
    assert msgs[-1] == "stopped"
    task_lines = [x for x in docs if x.get("task_id") == "jl"]
    assert any("Succeeded" in x["msg"] for x in task_lines), task_lines
    named = [x for x in task_lines if "created from" in x["msg"]]
    assert named and named[0]["msg"].endswith("(name " + escape(EVIL) + ")"), named
    assert not any(m.startswith("INFO cdcd: forged") for m in msgs)


def test_daemon_text_logs_escape_control_characters(
        tmp_path: Path, servers: Callable[..., RedisServer]) -> None:
    src, dst = servers(), servers()
    tasks = tmp_path / "tasks.json"
    tasks.write_text(json.dumps([spec(src, dst, task_id="tl", name=EVIL)]))
    d = Daemon(tmp_path / "data", extra=["--tasks", str(tasks)])
    d.start()
    try:
        d.wait_ready()
    finally:
        assert d.stop() == 0
    log = d.log_text()
    assert "(name evil\\nINFO cdcd: forged line\\r\\x1b[2J\\u2028end)" in log, log
    stamp = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ [\w.]+: ")
    for line in log.split("\n"):
        assert not line or stamp.match(line), line
