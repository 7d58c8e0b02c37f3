"""Declarative tasks: the specs of a tasks file, created at start-up idempotently.

The tasks setting names a JSON file holding one task spec or a list of them, or a
directory whose ``*.json`` files each do. Every spec needs a ``task_id``. The file is read
and every spec validated before the daemon starts (a bad file stops it, naming the file,
the index and the field); once the stored tasks are loaded and the socket bound, each
spec goes through the manager's ``create``, the API's code path:

- no task with that id: created (a 409, e.g. ``max_tasks`` reached or another task writing
  the same target dbs, is reported and the start goes on);
- a task with that id and the same spec: left alone;
- a task with that id and another spec: reported, never applied (change it with the API).

Removing a spec from the file never deletes its task.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ConfigError
from .errors import CdcdError, StoreError
from .manager import Manager
from .spec import TaskSpec, parse_spec, same_spec

log = logging.getLogger("cdcd.tasksfile")

# While the store cannot be written, a create is tried again this often.
STORE_RETRY_S = 2.0


class TasksFileError(ConfigError):
    pass


@dataclass(frozen=True, kw_only=True)
class Declared:
    """One spec of the tasks file and where it is written."""

    file: str
    index: int | None      # position in the file's list; None when the file holds an object
    data: dict[str, Any]
    spec: TaskSpec

    @property
    def where(self) -> str:
        return self.file if self.index is None else f"{self.file}[{self.index}]"


def files_of(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.glob("*.json") if p.is_file())
    if path.is_file():
        return [path]
    raise TasksFileError(f"tasks {path}: no such file or directory")


def load(path: str) -> list[Declared]:
    """Read and validate every spec of the tasks file or directory at ``path``."""
    out: list[Declared] = []
    seen: dict[str, str] = {}
    for file in files_of(Path(path)):
        try:
            text = file.read_bytes().decode()
        except OSError as exc:
            raise TasksFileError(f"tasks file {file}: {exc.strerror or exc}") from exc
        except UnicodeDecodeError as exc:
            raise TasksFileError(f"tasks file {file}: not UTF-8 ({exc.reason})") from exc
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TasksFileError(f"tasks file {file}: not valid JSON: {exc.msg} at line "
                                 f"{exc.lineno} column {exc.colno}") from exc
        items: list[tuple[int | None, Any]]
        if isinstance(doc, dict):
            items = [(None, doc)]
        elif isinstance(doc, list):
            items = list(enumerate(doc))
        else:
            raise TasksFileError(f"tasks file {file}: must hold a task spec (a JSON object) "
                                 f"or a list of them")
        for index, data in items:
            where = str(file) if index is None else f"{file}[{index}]"
            if not isinstance(data, dict):
                raise TasksFileError(f"{where}: must be a task spec (a JSON object)")
            if "task_id" not in data:
                raise TasksFileError(f"{where}.task_id: required in a tasks file (it makes "
                                     f"start-up idempotent)")
            try:
                spec = parse_spec(data, path=where)
            except CdcdError as exc:
                raise TasksFileError(exc.message) from None
            if spec.task_id in seen:
                raise TasksFileError(f"{where}.task_id: {spec.task_id!r} is declared twice "
                                     f"(also in {seen[spec.task_id]})")
            seen[spec.task_id] = where
            out.append(Declared(file=str(file), index=index, data=data, spec=spec))
        _warn_if_readable(file, items)
    return out


def _warn_if_readable(file: Path, items: list[tuple[int | None, Any]]) -> None:
    """Say so when a file holding passwords can be read by other users."""
    has_secret = any(_holds_secret(d.get(side)) for _, d in items
                     for side in ("source", "target"))
    try:
        mode = os.stat(file).st_mode
    except OSError:
        return
    if has_secret and mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning("tasks file %s holds passwords and is readable by other users "
                    "(chmod 600 it)", file)


def _holds_secret(endpoint: Any) -> bool:
    """A password in clear: a string (a {"env"}/{"file"} reference is not a secret), or
    credentials inside a redis:// URL."""
    if not isinstance(endpoint, dict):
        return False
    if isinstance(endpoint.get("password"), str) and endpoint["password"]:
        return True
    addrs = endpoint.get("addrs")
    items = addrs if isinstance(addrs, list) else [addrs]
    return any(isinstance(a, str) and "://" in a and "@" in a for a in items)


def changed_fields(old: TaskSpec, new: TaskSpec) -> list[str]:
    """Which fields differ (names only: values may be secrets)."""
    a, b = old.to_json(mask=False), new.to_json(mask=False)
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if x == y:
            continue
        if isinstance(x, dict) and isinstance(y, dict):
            out += [f"{key}.{k}" for k in sorted(set(x) | set(y)) if x.get(k) != y.get(k)]
        else:
            out.append(key)
    return out


async def reconcile_one(manager: Manager, d: Declared) -> dict[str, Any]:
    """Create one declared task unless it exists; say what happened."""
    task_id = d.spec.task_id
    result = {"task_id": task_id, "file": d.file, "index": d.index}
    existing = manager.tasks.get(task_id)
    if existing is not None:
        if same_spec(existing.spec, d.spec):
            log.info("task %s: declared in %s, exists with the same spec", task_id, d.where)
            return {**result, "result": "unchanged", "message": "exists with the same spec"}
        fields = ", ".join(changed_fields(existing.spec, d.spec)) or "?"
        message = (f"exists with a different spec (differs in {fields}); not applied: "
                   f"change the task with the API or delete it to have it created again")
        log.warning("task %s: the spec in %s differs from the stored task (%s); not "
                    "applied", task_id, d.where, fields)
        return {**result, "result": "differs", "message": message}
    while True:
        try:
            await manager.create(d.data)
        except StoreError as exc:
            log.warning("task %s: declared in %s, not created yet: %s; trying again in %g s",
                        task_id, d.where, exc.message, STORE_RETRY_S)
            await asyncio.sleep(STORE_RETRY_S)
            continue
        except CdcdError as exc:
            log.warning("task %s: declared in %s, refused: %s", task_id, d.where,
                        exc.message)
            return {**result, "result": "refused", "message": exc.message}
        log.info("task %s: created from %s (name %s)", task_id, d.where, d.spec.name or "-")
        return {**result, "result": "created", "message": "created"}


async def reconcile(manager: Manager, declared: list[Declared],
                    results: list[dict[str, Any]]) -> None:
    """Reconcile every declared spec in order, appending each outcome to ``results``."""
    for d in declared:
        results.append(await reconcile_one(manager, d))
    counts: dict[str, int] = {}
    for r in results:
        counts[r["result"]] = counts.get(r["result"], 0) + 1
    summary = ", ".join(f"{n} {what}" for what, n in sorted(counts.items())) or "no specs"
    log.info("tasks file reconciled: %s", summary)
