"""Pausing, deleting and stopping must work while the source floods the stream."""

from __future__ import annotations

import shutil
import subprocess
import time
from typing import Any

import pytest

from .daemon import Daemon
from .servers import wait_for


def flood(port: int) -> subprocess.Popen[bytes]:
    bench = shutil.which("redis-benchmark")
    if bench is None:
        pytest.skip("redis-benchmark is not installed")
    return subprocess.Popen([bench, "-p", str(port), "-t", "set", "-P", "16", "-n", "3000000",
                             "-r", "100000", "-q"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def test_pause_delete_and_sigterm_under_a_write_flood(servers: Any,
                                                      daemon_factory: Any) -> None:
    src = servers(args=["--repl-backlog-size", "256mb"])
    dst = servers()
    daemon: Daemon = daemon_factory()
    for i, tid in enumerate(("a", "b", "c")):
        # three tasks into one target, each in a db of its own
        daemon.ok("create", {"task_id": tid, "source": {"addrs": src.addr},
                             "target": {"addrs": dst.addr}, "reader": "psync",
                             "db_mapping": {"0": i}, "filter": {"dbs": [0]},
                             "migration_method": "incremental_migration"})
    for tid in ("a", "b", "c"):
        wait_for(lambda: daemon.task(tid)["phase"] == "incremental", 30, what="stream phase")
    load = flood(src.port)
    try:
        wait_for(lambda: daemon.task("a")["progress"]["incremental"]["ops_applied"] > 10_000,
                 30, what="the flood reaching the target")
        started = time.monotonic()
        assert daemon.ok("pause", {"task_id": "a"})["state"] == "Paused"
        assert daemon.ok("delete", {"task_id": "b"})["task_id"] == "b"
        assert time.monotonic() - started < 10
        started = time.monotonic()
        assert daemon.stop(timeout=20) == 0
        assert time.monotonic() - started < 15
    finally:
        load.kill()
        load.wait()
