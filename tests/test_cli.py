"""The command-line client (cdcd create|list|get|pause|resume|delete) against a real daemon."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from cdcd.progress import Progress

from .compare import assert_same, fill_bulk
from .daemon import Daemon, spec
from .servers import RedisServer


def cdcd(daemon: Daemon | None, *args: str, stdin: str | None = None,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    url = ["--url", daemon.url] if daemon is not None else []
    cmd = [sys.executable, "-m", "cdcd", *args[:1], *url, *args[1:]]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CDCD_")}
    full_env.update(env or {})
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=60,
                          env=full_env)


def ok(daemon: Daemon | None, *args: str, **kw: object) -> str:
    r = cdcd(daemon, *args, **kw)  # type: ignore[arg-type]
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    return r.stdout


def test_cli_full_cycle(daemon: Daemon, servers: Callable[..., RedisServer]) -> None:
    src, dst = servers(password="cli-src-secret"), servers()
    fill_bulk(src.client(), 500)
    out = ok(daemon, "create", "--task-id", "cli1", "--name", "from-cli", "--source", src.addr,
             "--source-password", "cli-src-secret", "--target", dst.addr,
             "--method", "full_amount_migration", "--reader", "scan")
    assert out.strip() == "cli1"
    daemon.wait_state("cli1", "Succeeded")
    assert_same(src.client(), dst.client())

    # get: human description and raw JSON
    text = ok(daemon, "get", "cli1")
    assert "cli1" in text and "from-cli" in text and "Succeeded" in text
    assert "100.0%" in text and "500/500" in text
    assert src.addr in text and dst.addr in text
    doc = json.loads(ok(daemon, "get", "cli1", "--json"))
    assert doc["code"] == 200 and doc["data"]["task"]["state"] == "Succeeded"
    assert doc["data"]["task"]["spec"]["source"]["password"] == "***"

    # list: a table with a header, and JSON; --state filters
    table = ok(daemon, "list")
    lines = table.strip().splitlines()
    assert lines[0].split()[:4] == ["TASK_ID", "NAME", "STATE", "PHASE"]
    assert any(line.split()[:3] == ["cli1", "from-cli", "Succeeded"] for line in lines[1:])
    doc = json.loads(ok(daemon, "list", "--json"))
    assert [t["task_id"] for t in doc["data"]["tasks"]] == ["cli1"]
    assert ok(daemon, "list", "--state", "Paused").strip().splitlines()[1:] == []
    assert len(ok(daemon, "list", "--state", "Succeeded").strip().splitlines()) == 2

    # pause / resume / delete print "<id> <state>"
    r = cdcd(daemon, "pause", "cli1")
    assert r.returncode == 1 and "409" in r.stderr and "Traceback" not in r.stderr
    ok(daemon, "create", "--task-id", "later", "--source", src.addr, "--target", dst.addr,
       "--source-password", "cli-src-secret", "--reader", "scan")
    assert daemon.wait_state("later", "Succeeded")
    ok(daemon, "delete", "later")
    all_output = ""
    for args in (("get", "cli1"), ("get", "cli1", "--json"), ("list",), ("list", "--json")):
        all_output += ok(daemon, *args)
    assert "cli-src-secret" not in all_output

    assert ok(daemon, "delete", "cli1").strip() == "cli1 deleted"
    r = cdcd(daemon, "get", "cli1")
    assert r.returncode == 1 and "404" in r.stderr and "task_not_found" in r.stderr
    assert "Traceback" not in r.stderr
    r = cdcd(daemon, "delete", "cli1")
    assert r.returncode == 1 and "404" in r.stderr
    assert ok(daemon, "delete", "cli1", "--ignore-not-found").strip() == "cli1 deleted"
    doc = json.loads(ok(daemon, "delete", "cli1", "--ignore-not-found", "--json"))
    assert doc == {"code": 200, "data": {"task_id": "cli1"}}
    assert "cli-src-secret" not in daemon.log_text()


def test_cli_pause_resume_and_spec_file(daemon: Daemon, servers: Callable[..., RedisServer],
                                        tmp_path: Path) -> None:
    src, dst = servers(), servers()
    fill_bulk(src.client(), 20_000, value_size=200)
    data = spec(src, dst, task_id="filed", bandwidth_limit_mb=1)
    f = tmp_path / "spec.json"
    f.write_text(json.dumps(data))
    assert ok(daemon, "create", "-f", str(f)).strip() == "filed"
    # the same spec again (idempotent), this time from stdin
    doc = json.loads(ok(daemon, "create", "--file", "-", "--json", stdin=json.dumps(data)))
    assert doc == {"code": 200, "data": {"task_id": "filed"}}
    daemon.wait_state("filed", "Running")
    assert ok(daemon, "pause", "filed").strip() == "filed Paused"
    assert ok(daemon, "pause", "filed").strip() == "filed Paused"
    table = ok(daemon, "list", "--state", "Paused")
    assert "filed" in table and "Paused" in table
    doc = json.loads(ok(daemon, "resume", "filed", "--json"))
    assert doc == {"code": 200, "data": {"task_id": "filed", "state": "Running"}}
    assert ok(daemon, "resume", "filed").strip() == "filed Running"
    assert ok(daemon, "delete", "filed").strip() == "filed deleted"

    # a spec the daemon rejects: the message names the field, exit status 1
    bad = dict(data, task_id="bad", bandwidth_limit_mb=0)
    f.write_text(json.dumps(bad))
    r = cdcd(daemon, "create", "-f", str(f))
    assert r.returncode == 1 and "400" in r.stderr and "bandwidth_limit_mb" in r.stderr
    r = cdcd(daemon, "create", "-f", str(tmp_path / "missing.json"))
    assert r.returncode == 1 and "missing.json" in r.stderr and "Traceback" not in r.stderr
    f.write_text("{not json")
    r = cdcd(daemon, "create", "-f", str(f))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    r = cdcd(daemon, "create")
    assert r.returncode == 1 and "source" in r.stderr
    r = cdcd(daemon, "create", "-f", "-", "--task-id", "x", stdin="[1]")
    assert r.returncode == 1 and "JSON object" in r.stderr and "Traceback" not in r.stderr


def test_cli_get_watch(daemon: Daemon, servers: Callable[..., RedisServer]) -> None:
    src, dst = servers(), servers()
    src.client().set("k", "v")
    tid = daemon.create(spec(src, dst, task_id="w"))
    daemon.wait_state(tid, "Succeeded")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDCD_")}
    proc = subprocess.Popen([sys.executable, "-m", "cdcd", "get", "--url", daemon.url, "w",
                             "--watch"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("task      w"), first
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0 and "Traceback" not in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_url_token_and_unreachable(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory(token="cli-token-123")
    # the token from the flag or from the environment; the URL from CDCD_URL
    r = cdcd(d, "list")
    assert r.returncode == 1 and "401" in r.stderr
    assert "TASK_ID" in ok(d, "list", "--token", "cli-token-123")
    assert "TASK_ID" in ok(None, "list", env={"CDCD_URL": d.url,
                                              "CDCD_AUTH_TOKEN": "cli-token-123"})
    # no daemon there: a one-line error, not a traceback
    r = cdcd(None, "list", "--url", "http://127.0.0.1:3")
    assert r.returncode == 1 and "cannot reach" in r.stderr and "Traceback" not in r.stderr
    r = cdcd(None, "get", "x", "--url", "http://127.0.0.1:1")
    assert r.returncode == 1 and "cannot reach" in r.stderr
    for url in ("localhost:8444", "http://[bad"):
        r = cdcd(None, "list", "--url", url)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    # usage errors come from argparse (exit 2)
    r = cdcd(None, "pause")
    assert r.returncode == 2
    r = cdcd(None, "frobnicate")
    assert r.returncode == 2


def test_console_script_entry_point() -> None:
    """The installed ``cdcd`` script is the same CLI as ``python -m cdcd``."""
    script = Path(sys.executable).with_name("cdcd")
    if not script.exists():
        script_cmd = [sys.executable, "-m", "cdcd"]
    else:
        script_cmd = [str(script)]
    r = subprocess.run([*script_cmd, "--help"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0
    for word in ("serve", "create", "list", "get", "pause", "resume", "delete", "resync",
                 "precheck", "verify"):
        assert word in r.stdout
    r = subprocess.run([*script_cmd, "serve", "--help"], capture_output=True, text=True,
                       timeout=30)
    for flag in ("--host", "--port", "--data-dir", "--config"):
        assert flag in r.stdout


def test_ops_per_sec_reads_zero_at_once_when_idle_or_stopped(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`get` shows a finished or idle task at 0 ops/s, not a rate decaying for 10 s."""
    now = [1000.0]
    monkeypatch.setattr("cdcd.progress.time.monotonic", lambda: now[0])
    p = Progress()
    assert p.ops_per_sec() == 0.0
    for _ in range(5):              # 100 keys a second, sampled every second
        p.keys_done += 100
        p.sample()
        now[0] += 1.0
    now[0] -= 0.5
    assert p.ops_per_sec() == 100.0
    now[0] += 2.5                   # the last sample is 3 s old: the pipeline stopped
    assert p.ops_per_sec() == 0.0
    p.sample()                      # sampled again, but nothing moved: idle
    assert p.ops_per_sec() == 0.0
    now[0] += 1.0
    p.ops_applied += 30
    p.sample()                      # moving again
    assert p.ops_per_sec() > 0
