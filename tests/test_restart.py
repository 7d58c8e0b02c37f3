"""Kill or stop the daemon in the middle of a SCAN snapshot; the restarted daemon continues
from the cursor checkpoint it saved and the target ends exact."""

from __future__ import annotations

import signal
import stat
from collections.abc import Callable
from typing import Any

import pytest

from .compare import assert_same, fill_bulk, fill_mixed
from .daemon import Daemon, spec
from .servers import RedisServer, wait_for

DB0_KEYS = 6_000
DB1_KEYS = 14_000


def restores(server: RedisServer) -> int:
    stats = server.client().info("commandstats")
    return int(stats.get("cmdstat_restore", {}).get("calls", 0))


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_snapshot_continues_from_saved_cursor(sig: int, daemon_factory: Callable[..., Daemon],
                                              servers: Callable[..., RedisServer]) -> None:
    src, dst = servers(), servers()
    fill_bulk(src.client(0), DB0_KEYS, value_size=200)
    fill_bulk(src.client(1), DB1_KEYS, value_size=200)
    fill_mixed(src.client(1), big=False)
    total = src.client(0).dbsize() + src.client(1).dbsize()
    d = daemon_factory()
    # ~260 bytes per RESTORE at 1 MB/s: about 5 s in all, long enough to stop it midway
    tid = d.create(spec(src, dst, bandwidth_limit_mb=1))

    def checkpoint_in_db1() -> dict[str, Any] | None:
        rec = d.store()["tasks"][tid]
        snap = (rec.get("checkpoint") or {}).get("snapshot") or {}
        if snap.get("db") == 1 and snap.get("cursor") and \
                rec["progress"]["keys_done"] >= DB0_KEYS + 1000:
            return dict(rec)
        return None

    wait_for(checkpoint_in_db1, 60, 0.05, what="a cursor checkpoint in db 1")
    if sig == signal.SIGKILL:
        d.kill()
    else:
        assert d.stop(sig) == 0
    rec = d.store()["tasks"][tid]
    assert stat.S_IMODE((d.data_dir / "cdcd.json").stat().st_mode) == 0o600
    assert d.store()["version"] == 1
    assert rec["state"] == "Running" and rec["phase"] == "snapshot"
    done = rec["progress"]["keys_done"]
    snap = rec["checkpoint"]["snapshot"]
    assert 0 < done < total, (done, total)
    assert snap["db"] == 1 and snap["cursor"] > 0 and 0 in snap["dbs_done"], snap
    assert not rec["progress"]["snapshot_done"]
    # the target holds at least what the checkpoint claims (never less)
    assert dst.client(0).dbsize() == DB0_KEYS
    assert dst.client(1).dbsize() >= done - DB0_KEYS

    dst.client().config_resetstat()
    d.start()
    t = d.wait_state(tid, "Succeeded", timeout=90)
    assert t["phase"] == "done" and t["progress"]["snapshot"]["percent"] == 100.0
    assert t["progress"]["snapshot"]["keys_total"] == total
    # continued from the cursor: only the keys after it were copied again (SCAN batches of
    # 512 keys are the only slack), not the whole dataset
    again = restores(dst)
    assert again <= total - done + 1024, (again, total, done)
    assert "resuming after daemon restart" in d.log_text()
    for db in (0, 1):
        assert_same(src.client(db), dst.client(db))
    # stopping the daemon (again) leaves the Succeeded task as it is
    d.restart()
    assert d.task(tid)["state"] == "Succeeded"
    assert restores(dst) == again


def test_sigint_checkpoints_running_task(daemon_factory: Callable[..., Daemon],
                                         servers: Callable[..., RedisServer]) -> None:
    src, dst = servers(), servers()
    fill_bulk(src.client(), 10_000, value_size=200)
    d = daemon_factory()
    tid = d.create(spec(src, dst, bandwidth_limit_mb=1))
    wait_for(lambda: d.task(tid)["progress"]["snapshot"]["keys_done"] >= 1000, 30,
             what="some progress")
    seen = d.task(tid)["progress"]["snapshot"]["keys_done"]
    assert d.stop(signal.SIGINT) == 0
    rec = d.store()["tasks"][tid]
    # the checkpoint written at shutdown is at least as new as what the API showed
    assert rec["state"] == "Running" and rec["progress"]["keys_done"] >= seen
    assert rec["checkpoint"]["snapshot"]["cursor"] > 0
    assert "Traceback" not in d.log_text()
    d.start()
    d.wait_state(tid, "Succeeded", timeout=60)
    assert_same(src.client(), dst.client())
