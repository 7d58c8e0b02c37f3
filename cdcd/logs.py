"""Log formats of the daemon: text lines (the default) or one JSON object per line.

In both, control characters in a message are escaped (``\\n`` stays two characters), so a
newline in a task name or a server's error can never forge a log line. JSON lines carry
``ts`` (ISO 8601 UTC), ``level``, ``logger``, ``msg``, ``task_id`` when the record concerns
a task, and ``exc`` for an exception.

Which task a record concerns follows the package's convention: the task, manager and
reader modules log ``"task %s: ..."`` with the task id as the first argument. A record may
also carry ``extra={"task_id": ...}``.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import IO, Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Loggers that follow the "task %s: ..." convention.
TASK_LOGGERS = ("cdcd.task", "cdcd.manager", "cdcd.reader", "cdcd.tasksfile")
# C0 and C1 controls, DEL, and the Unicode line and paragraph separators.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_one(m: re.Match[str]) -> str:
    ch = m.group()
    return _NAMED.get(ch) or (f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")


def escape(text: str) -> str:
    """Escape control characters so that ``text`` stays on one line."""
    return text if text.isprintable() else _CONTROL.sub(_escape_one, text)


def task_id_of(record: logging.LogRecord) -> str | None:
    """The task a record concerns, or None."""
    explicit = getattr(record, "task_id", None)
    if explicit is not None:
        return str(explicit)
    if not record.name.startswith(TASK_LOGGERS):
        return None
    if not isinstance(record.msg, str) or not record.msg.startswith("task %s"):
        return None
    args = record.args
    if isinstance(args, tuple) and args:
        return str(args[0])
    return None


class TextFormatter(logging.Formatter):
    """The classic line, with the message's control characters escaped."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape(record.message)
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "msg": escape(record.getMessage()),
        }
        task_id = task_id_of(record)
        if task_id is not None:
            doc["task_id"] = escape(task_id)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            doc["exc"] = record.exc_text
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        # ASCII only: nothing in a line can be taken for a line break by any reader
        return json.dumps(doc, ensure_ascii=True)


def setup(level: str, fmt: str, stream: IO[str] | None = None) -> None:
    """Send every log record to ``stream`` (stderr) in the chosen format."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
