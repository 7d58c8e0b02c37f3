"""The metadata store never corrupts: a full, read-only or failing disk leaves the previous
``cdcd.json`` whole, the daemon keeps running, lifecycle requests answer 503, and the first
write the disk accepts again saves everything.

The daemon tests put its data dir on a tiny tmpfs (root only; skipped otherwise), fill it
or make it read-only while tasks run, and free it again. The store's own write path is
tested in-process with ``os.write``/``os.fsync`` made to fail.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import json
import os
import re
import signal
import subprocess
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cdcd.store import Store, StoreError

from .daemon import Daemon, endpoint
from .servers import RedisServer, wait_for

FUTURE = "2099-01-01T00:00:00Z"
DISK_SIZE = "256k"


# Privileged ports nobody listens on, one target each, so tasks never share a target.
_dead_ports = itertools.count(2)


def waiting_spec(task_id: str) -> dict[str, Any]:
    """A task that waits for start_at: it writes its record once, then nothing."""
    return {"task_id": task_id, "source": {"addrs": "127.0.0.1:1"},
            "target": {"addrs": f"127.0.0.1:{next(_dead_ports)}"}, "start_at": FUTURE}


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30)


def _mounted(path: Path) -> bool:
    return _run("mountpoint", "-q", str(path)).returncode == 0


class Disk:
    """A tmpfs of DISK_SIZE bytes that a test can fill, free, make read-only and writable."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.filler = path / "filler"
        self.ro_layers = 0

    def fill(self) -> None:
        """Write a filler file until not one more byte fits."""
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        chunk = 64 * 1024
        try:
            while chunk:
                try:
                    os.write(fd, b"\0" * chunk)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    chunk //= 2
        finally:
            os.close(fd)

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)

    def readonly(self) -> None:
        """Cover the dir with a read-only bind mount of itself (the daemon's open lock file
        keeps the tmpfs itself from being remounted read-only)."""
        r = _run("mount", "--bind", str(self.path), str(self.path))
        assert r.returncode == 0, r
        self.ro_layers += 1
        r = _run("mount", "-o", "remount,bind,ro", str(self.path))
        assert r.returncode == 0, r

    def writable(self) -> None:
        while self.ro_layers:
            r = _run("umount", "-l", str(self.path))
            assert r.returncode == 0, r
            self.ro_layers -= 1

    def store_doc(self) -> dict[str, Any]:
        """cdcd.json as it is on disk: it must always be whole, valid JSON."""
        return dict(json.loads((self.path / "cdcd.json").read_bytes()))

    def temp_files(self) -> list[Path]:
        return list(self.path.glob(".cdcd.json.*.tmp"))


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Disk]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs data dir needs root")
    mnt = tmp_path / "data"
    mnt.mkdir(mode=0o700)
    r = _run("mount", "-t", "tmpfs", "-o", f"size={DISK_SIZE},mode=0700", "tmpfs", str(mnt))
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    d = Disk(mnt)
    try:
        yield d
    finally:
        d.writable()
        while _mounted(mnt):
            if _run("umount", "-l", str(mnt)).returncode != 0:
                break


@pytest.fixture
def daemon_on(disk: Disk) -> Iterator[Daemon]:
    """The real daemon with its data dir on the tmpfs (stopped before it is unmounted)."""
    d = Daemon(disk.path)
    try:
        yield d.start()
    finally:
        disk.writable()
        disk.free()
        try:
            d.stop(timeout=30)
        except Exception:
            d.kill()


def metric(d: Daemon, name: str) -> float:
    with urllib.request.urlopen(d.url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def healthz(d: Daemon) -> int:
    with urllib.request.urlopen(d.url + "/healthz", timeout=10) as r:
        return int(r.status)


def check_503(status: int, doc: Any, *needles: str) -> str:
    assert status == 503, (status, doc)
    assert doc["code"] == 503 and doc["error"] == "store_unavailable", doc
    msg = doc["message"]
    assert isinstance(msg, str) and "Traceback" not in msg, doc
    assert msg.startswith("metadata store cannot be written (cannot write "), msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    return str(msg)


NOT_SAVED = "the change was not saved; retry when the disk has room"
SAVED_LATER = "the change is applied but not yet saved; it will be written when the disk " \
              "accepts it"
ENOSPC = "No space left on device"
EROFS = "Read-only file system"


def running_task(d: Daemon, src: RedisServer, dst: RedisServer) -> str:
    """An incremental psync task following the source: it checkpoints every second."""
    tid = d.create({"task_id": "live", "source": endpoint(src), "target": endpoint(dst),
                    "migration_method": "incremental_migration", "reader": "psync"})
    wait_for(lambda: d.task(tid)["phase"] == "incremental", 30, 0.1,
             what="the live task in its incremental phase")
    return tid


def written(disk: Disk, task_id: str, phase: str) -> bool:
    rec = disk.store_doc()["tasks"].get(task_id)
    return rec is not None and rec["phase"] == phase


def test_disk_full_keeps_previous_store_answers_503_and_recovers(
        disk: Disk, daemon_on: Daemon, servers: Callable[..., RedisServer]) -> None:
    d = daemon_on
    src, dst = servers(), servers()
    tid = running_task(d, src, dst)
    d.create(waiting_spec("waiting"))
    wait_for(lambda: written(disk, "waiting", "scheduled"), 10, what="the waiting task saved")
    errors_before = metric(d, "cdcd_store_write_errors_total")
    counter = src.client()

    def refused(n: int) -> bool:
        counter.incr("n")   # changes to follow, so checkpoints to write
        return metric(d, "cdcd_store_write_errors_total") >= errors_before + n

    disk.fill()
    wait_for(lambda: refused(1), 10, what="a refused checkpoint write")
    on_disk = disk.store_doc()   # whole, parseable, while the disk is full
    assert on_disk["version"] == 1 and set(on_disk["tasks"]) == {tid, "waiting"}
    wait_for(lambda: refused(3), 10, what="more refused checkpoint writes")
    assert disk.store_doc() == on_disk   # nothing torn, nothing half-written landed
    wait_for(lambda: not disk.temp_files(), 5, what="no temp file left")
    assert metric(d, "cdcd_store_healthy") == 0
    assert healthz(d) == 200

    status, doc = d.api("create", waiting_spec("new"))
    check_503(status, doc, ENOSPC, str(disk.path / "cdcd.json"), NOT_SAVED)
    assert "new" not in {t["task_id"] for t in d.ok("list")["tasks"]}
    status, doc = d.api("pause", {"task_id": "waiting"})
    check_503(status, doc, ENOSPC, NOT_SAVED)
    assert d.task("waiting")["state"] == "Initial"   # refused before anything changed
    assert d.task(tid)["state"] == "Running"

    disk.free()
    wait_for(lambda: metric(d, "cdcd_store_healthy") == 1, 10, what="the store healthy again")
    wait_for(lambda: disk.store_doc()["tasks"][tid]["checkpoint"] !=
             on_disk["tasks"][tid]["checkpoint"], 10, what="a newer checkpoint on disk")
    d.create(waiting_spec("new"))
    assert d.ok("pause", {"task_id": "waiting"})["state"] == "Paused"
    saved = disk.store_doc()["tasks"]
    assert saved["new"]["state"] == "Initial" and saved["waiting"]["state"] == "Paused"
    # the doctor says so at its next look (a checkpoint write may have been first)
    wait_for(lambda: "metadata store writable again" in d.log_text(), 5,
             what="the recovery logged")
    log = d.log_text()
    assert log.count("metadata store cannot be written: ") == 1, log[-3000:]
    assert "Traceback" not in log


def test_change_applied_while_disk_full_is_saved_when_it_frees(disk: Disk,
                                                               daemon_on: Daemon) -> None:
    d = daemon_on
    for tid in ("a", "b"):
        d.create(waiting_spec(tid))
    wait_for(lambda: written(disk, "a", "scheduled") and written(disk, "b", "scheduled"), 10,
             what="both tasks saved")
    disk.fill()
    assert metric(d, "cdcd_store_healthy") == 1   # no write tried yet
    # the store looked healthy, so the pause is made; only its write fails
    status, doc = d.api("pause", {"task_id": "a"})
    check_503(status, doc, ENOSPC, SAVED_LATER)
    assert d.task("a")["state"] == "Paused"
    assert disk.store_doc()["tasks"]["a"]["state"] == "Initial"
    # now the store is known unwritable: the delete is refused before it changes anything
    status, doc = d.api("delete", {"task_id": "b"})
    check_503(status, doc, ENOSPC, NOT_SAVED)
    assert d.task("b")["state"] == "Initial"
    status, doc = d.api("resume", {"task_id": "a"})
    check_503(status, doc, NOT_SAVED)
    assert d.task("a")["state"] == "Paused"
    assert not disk.temp_files()

    disk.free()   # the doctor writes the pause kept in memory, without any request
    wait_for(lambda: disk.store_doc()["tasks"]["a"]["state"] == "Paused", 10,
             what="the pause saved by the store doctor")
    assert metric(d, "cdcd_store_healthy") == 1
    assert metric(d, "cdcd_store_write_errors_total") >= 2
    d.ok("delete", {"task_id": "b"})
    assert set(disk.store_doc()["tasks"]) == {"a"}
    assert d.stop() == 0
    log = d.log_text()
    assert "metadata store writable again" in log   # the doctor itself wrote it
    assert "stopped 0 running task(s), 0 with their checkpoint saved (1 task(s) in the store)" \
        in log, log[-2000:]


def test_read_only_data_dir_answers_503_and_recovers(disk: Disk, daemon_on: Daemon) -> None:
    d = daemon_on
    d.create(waiting_spec("a"))
    wait_for(lambda: written(disk, "a", "scheduled"), 10, what="the task saved")
    before = disk.store_doc()
    disk.readonly()
    status, doc = d.api("create", waiting_spec("b"))
    check_503(status, doc, EROFS, NOT_SAVED)
    assert [t["task_id"] for t in d.ok("list")["tasks"]] == ["a"]
    status, doc = d.api("pause", {"task_id": "a"})
    check_503(status, doc, EROFS, NOT_SAVED)
    assert d.task("a")["state"] == "Initial"
    assert metric(d, "cdcd_store_healthy") == 0
    assert healthz(d) == 200
    assert disk.store_doc() == before and not disk.temp_files()

    disk.writable()
    wait_for(lambda: metric(d, "cdcd_store_healthy") == 1, 10, what="the store healthy again")
    assert d.ok("pause", {"task_id": "a"})["state"] == "Paused"
    d.create(waiting_spec("b"))
    assert set(disk.store_doc()["tasks"]) == {"a", "b"}


@pytest.mark.parametrize("fault", ["full", "readonly"])
def test_sigterm_with_unwritable_store_exits_nonzero(fault: str, disk: Disk,
                                                     daemon_on: Daemon) -> None:
    d = daemon_on
    d.create(waiting_spec("a"))
    wait_for(lambda: written(disk, "a", "scheduled"), 10, what="the task saved")
    before = disk.store_doc()
    if fault == "full":
        disk.fill()
    else:
        disk.readonly()
    assert d.stop(signal.SIGTERM) == 1
    log = d.log_text()
    cause = ENOSPC if fault == "full" else EROFS
    assert (f"cdcd: stopped, but the metadata store could not be written: cannot write "
            f"{disk.path / 'cdcd.json'}: {cause}") in log, log[-2000:]
    assert "Traceback" not in log
    assert disk.store_doc() == before


def test_running_task_shows_store_error(disk: Disk, daemon_on: Daemon,
                                        servers: Callable[..., RedisServer]) -> None:
    """A refused checkpoint write is an outage of the task: shown in last_error, retried,
    and the task stays Running (cdcd/task.py's handling of StoreError)."""
    d = daemon_on
    src, dst = servers(), servers()
    tid = running_task(d, src, dst)
    disk.fill()

    def shown() -> bool:
        src.client().incr("n")
        return ENOSPC in d.task(tid)["progress"]["last_error"]

    wait_for(shown, 10, what="the store error in the task's last_error")
    assert d.task(tid)["state"] == "Running"
    disk.free()
    wait_for(lambda: metric(d, "cdcd_store_healthy") == 1, 10, what="the store healthy again")
    d.wait_state(tid, "Running")


async def test_store_write_is_whole_or_not_made(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Short writes are continued; a refused write (ENOSPC mid-file, EIO at fsync) leaves
    the previous file as it was and no temp file; the next write saves everything."""
    data = tmp_path / "data"
    path = data / "cdcd.json"
    store = Store(data)
    store.open()
    real_write, real_fsync = os.write, os.fsync
    try:
        store.put("t", {"n": 1})
        await store.flush()

        def short_write(fd: int, buf: Any) -> int:   # at most 7 bytes per call
            return real_write(fd, bytes(buf[:7]))

        monkeypatch.setattr(os, "write", short_write)
        store.put("t", {"n": 2, "pad": "x" * 500})
        await store.flush()
        assert json.loads(path.read_bytes()) == {"version": 1,
                                                 "tasks": {"t": {"n": 2, "pad": "x" * 500}}}
        previous = path.read_bytes()

        calls = []

        def enospc_write(fd: int, buf: Any) -> int:   # half the data, then a full disk
            calls.append(len(buf))
            if len(calls) == 1:
                return real_write(fd, bytes(buf[:len(buf) // 2]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(os, "write", enospc_write)
        store.put("t", {"n": 3})
        with pytest.raises(StoreError) as info:
            await store.flush()
        assert info.value.message == f"cannot write {path}: No space left on device"
        assert info.value.code == 503 and info.value.error == "store_unavailable"
        assert path.read_bytes() == previous
        assert sorted(p.name for p in data.iterdir()) == ["cdcd.json", "cdcd.lock"]
        assert not store.healthy and store.write_errors == 1
        assert re.fullmatch(rf"cannot write {re.escape(str(path))}: No space left on device "
                            r"\(at \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\)", store.last_error)
        await asyncio.wait_for(store.wait_failed(), 1)   # at once while unhealthy

        monkeypatch.setattr(os, "write", real_write)

        def eio_fsync(fd: int) -> None:
            raise OSError(errno.EIO, os.strerror(errno.EIO))

        monkeypatch.setattr(os, "fsync", eio_fsync)
        with pytest.raises(StoreError, match="Input/output error"):
            await store.flush()   # unhealthy: tried again although nothing new was put
        assert path.read_bytes() == previous and store.write_errors == 2
        assert sorted(p.name for p in data.iterdir()) == ["cdcd.json", "cdcd.lock"]

        monkeypatch.setattr(os, "fsync", real_fsync)
        await store.flush()   # nothing new was put since: the records in memory are saved
        assert store.healthy
        assert json.loads(path.read_bytes()) == {"version": 1, "tasks": {"t": {"n": 3}}}
    finally:
        store.close()
