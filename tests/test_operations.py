"""Issue 5, operations: the precheck and verify requests, /metrics, start_at across a restart,
the bearer token, the CLI's precheck/verify/watch, and what the log says.

Request validation runs against the aiohttp app in-process; everything else against the real
daemon subprocess and real servers.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from cdcd.config import Config
from cdcd.server import make_app

from .compare import assert_same, fill_bulk
from .daemon import Daemon, endpoint, spec
from .servers import RedisServer, wait_for
from .test_api import DEAD_DST, DEAD_SRC, Api, base_spec, check_error
from .test_cli import cdcd

Servers = Callable[..., RedisServer]
KINDS = ("missing", "extra", "type_mismatch", "value_mismatch", "ttl_mismatch")


def checks_by_name(data: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {c["name"]: c for c in data["checks"]}


def wait_verification(d: Daemon, vid: str, timeout: float = 60) -> dict[str, Any]:
    def finished() -> dict[str, Any] | None:
        v: dict[str, Any] = d.ok("get", {"verification_id": vid})["verification"]
        return v if v["state"] in ("done", "failed", "cancelled") else None
    v = wait_for(finished, timeout, 0.1, what=f"verification {vid}")
    assert v["state"] == "done", v
    return dict(v)


def verify(d: Daemon, **data: Any) -> dict[str, Any]:
    """Start a verification over the API and return its finished view."""
    vid = d.ok("verify", data)["verification_id"]
    return wait_verification(d, vid)


def counts(result: dict[str, Any]) -> dict[str, Any]:
    return {k: result[k] for k in KINDS}


def http_get(url: str, token: str = "") -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"}
                                 if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def populate(c: redis.Redis[bytes]) -> None:
    """A few keys of every type, one with a TTL, plus 300 plain strings."""
    fill_bulk(c, 300)
    c.set("str", "hello")
    c.set("ttl", "soon", px=600_000)
    c.hset("hash", mapping={"a": "1", "b": "2"})
    c.sadd("set", "x", "y")
    c.zadd("zset", {"m": 1.5})
    c.rpush("list", "a", "b")
    c.xadd("stream", {"f": "v"})


# --- request validation, in-process ------------------------------------------------------------

@pytest.fixture
async def api(aiohttp_client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
              ) -> AsyncIterator[Api]:
    monkeypatch.delenv("CDCD_AUTH_TOKEN", raising=False)
    yield Api(await aiohttp_client(make_app(Config(data_dir=str(tmp_path / "data")))))


@pytest.mark.parametrize(("request_type", "data", "code", "needle"), [
    ("precheck", {}, 400, "request_data.source"),
    ("precheck", {"source": {"addrs": DEAD_SRC}}, 400, "request_data.target"),
    ("precheck", base_spec(bogus=1), 400, "request_data.bogus"),
    ("precheck", base_spec(reader="fast"), 400, "request_data.reader"),
    ("precheck", base_spec(task_id="bad id"), 400, "request_data.task_id"),
    ("verify", {}, 400, "request_data.task_id"),
    ("verify", {"task_id": "nope"}, 404, "nope"),
    ("verify", {"task_id": 5}, 400, "request_data.task_id"),
    ("verify", {"task_id": "t", "source": {"addrs": DEAD_SRC}}, 400, "request_data.source"),
    ("verify", {"source": {"addrs": DEAD_SRC}}, 400, "request_data.target"),
    ("verify", {"source": {"addrs": DEAD_SRC}, "target": {"addrs": "x"}}, 400,
     "request_data.target.addrs"),
    ("verify", {"source": {"addrs": DEAD_SRC}, "target": {"addrs": DEAD_DST}, "filter": {"x": 1}},
     400, "request_data.filter.x"),
    ("verify", {"task_id": "t", "frobnicate": 1}, 400, "request_data.frobnicate"),
    ("verify", {"task_id": "t", "sample": 0}, 400, "request_data.sample"),
    ("verify", {"task_id": "t", "sample": True}, 400, "request_data.sample"),
    ("verify", {"task_id": "t", "sample": "5"}, 400, "request_data.sample"),
    ("verify", {"task_id": "t", "examples": -1}, 400, "request_data.examples"),
    ("verify", {"task_id": "t", "ttl_tolerance_ms": 1.5}, 400, "request_data.ttl_tolerance_ms"),
    ("verify", {"task_id": "t", "keys_per_sec": 0}, 400, "request_data.keys_per_sec"),
    ("get", {"task_id": "t", "verification_id": "v"}, 400, "request_data.verification_id"),
    ("get", {"verification_id": "nope"}, 404, "nope"),
    ("get", {"verification_id": 7}, 400, "request_data.verification_id"),
    ("get", {"verification_id": ""}, 400, "request_data.verification_id"),
    ("get", {"verification_id": "v", "x": 1}, 400, "request_data.x"),
    ("delete", {"verification_id": "nope"}, 404, "nope"),
    ("delete", {"task_id": "t", "verification_id": "v"}, 400, "request_data.verification_id"),
])
async def test_precheck_and_verify_requests_are_validated(
        api: Api, request_type: str, data: dict[str, Any], code: int, needle: str) -> None:
    status, doc = await api.call(request_type, data)
    check_error(status, doc, code, needle)
    if code == 404 and "verification_id" in data:
        assert doc["error"] == "verification_not_found"
    if code == 404 and request_type == "verify":
        assert doc["error"] == "task_not_found"
    # nothing was created on the way
    assert (await api.ok("list")) == {"tasks": []}


async def test_verification_ids_and_ignore_not_found(api: Api) -> None:
    assert await api.ok("delete", {"verification_id": "gone", "ignore_not_found": True}) == \
        {"verification_id": "gone"}
    # a verification of unreachable endpoints is accepted at once, then fails with a sentence
    vid = (await api.ok("verify", {"source": {"addrs": DEAD_SRC},
                                   "target": {"addrs": DEAD_DST}}))["verification_id"]
    assert isinstance(vid, str) and vid
    for _ in range(200):
        v = (await api.ok("get", {"verification_id": vid}))["verification"]
        if v["state"] == "failed":
            break
        await asyncio.sleep(0.05)
    assert v["state"] == "failed" and v["error"] and "Traceback" not in v["error"]
    assert v["task_id"] is None and v["source"] == DEAD_SRC and v["target"] == DEAD_DST
    assert await api.ok("delete", {"verification_id": vid}) == {"verification_id": vid}
    status, doc = await api.call("get", {"verification_id": vid})
    check_error(status, doc, 404, vid)


async def test_live_recheck_waits_for_the_task_to_catch_up(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Keys found different on a Running incremental task are rechecked only once the task
    has applied what the source had written when the recheck began (bounded)."""
    from cdcd import verifications
    from cdcd.progress import Progress

    monkeypatch.setattr(verifications, "RECHECK_DELAY", 0.05)
    monkeypatch.setattr(verifications, "RECHECK_MAX_WAIT", 5.0)

    class FakeTask:
        running = True
        progress = Progress(source_offset=1000, applied_offset=400)

    task = FakeTask()
    wait = asyncio.create_task(verifications.caught_up(task)())  # type: ignore[arg-type]
    await asyncio.sleep(0.3)
    assert not wait.done()
    task.progress.source_offset = 5000     # written after the recheck began: not waited for
    task.progress.applied_offset = 1000
    await asyncio.wait_for(wait, 2)
    # a task that stops running does not hold the verification up
    task.progress.applied_offset = 0
    task.running = False
    await asyncio.wait_for(verifications.caught_up(task)(), 2)  # type: ignore[arg-type]


# --- precheck ----------------------------------------------------------------------------------

def test_precheck_request_passes_and_fails_for_real(daemon: Daemon, servers: Servers) -> None:
    src, dst = servers(password="pc-secret"), servers()
    src.client().set("k", "v")

    # a healthy pair: every check answers, ok is true, no task is created
    good = spec(src, dst, reader="psync", migration_method="incremental_migration")
    data = daemon.ok("precheck", good)
    checks = checks_by_name(data)
    assert data["ok"] is True, data
    for name in ("source.connection", "target.connection", "source.version", "target.version",
                 "dump_compatibility", "source.psync", "target.writable",
                 "target.existing_keys", "source.repl_backlog"):
        assert checks[name]["status"] in ("ok", "warning"), checks[name]
    assert daemon.ok("list") == {"tasks": []}
    # a task_id is accepted and not looked up (nor created)
    assert daemon.ok("precheck", dict(good, task_id="not-a-task"))["ok"] is True
    assert daemon.ok("list") == {"tasks": []}

    # wrong password: HTTP 200, the checks are the answer; the password is never echoed
    bad_pw = dict(spec(src, dst), source=endpoint(src.addr, password="wrong-pw"))
    code, doc = daemon.api("precheck", bad_pw)
    assert code == 200, doc
    assert doc["data"]["ok"] is False
    c = checks_by_name(doc["data"])["source.connection"]
    assert c["status"] == "error", c
    assert "wrong-pw" not in json.dumps(doc) and "pc-secret" not in json.dumps(doc)

    # an ACL user without PSYNC, for the psync reader
    src.client().execute_command("ACL", "SETUSER", "nosync", "on", ">np", "~*", "+@all",
                                 "-psync", "-sync")
    data = daemon.ok("precheck", dict(spec(src, dst, reader="psync"),
                                      source=endpoint(src.addr, username="nosync",
                                                      password="np")))
    assert data["ok"] is False
    c = checks_by_name(data)["source.psync"]
    assert c["status"] == "error" and "nosync" in c["message"], c

    # a target holding keys with existing_keys fail
    dst.client().set("already", "here")
    data = daemon.ok("precheck", spec(src, dst, existing_keys="fail"))
    assert data["ok"] is False
    c = checks_by_name(data)["target.existing_keys"]
    assert c["status"] == "error" and "db 0 holds 1 keys" in c["message"], c
    assert daemon.ok("precheck", spec(src, dst, existing_keys="replace"))["ok"] is True

    # a replica as the target
    replica = servers(args=["--replicaof", "127.0.0.1", str(dst.port)])
    data = daemon.ok("precheck", spec(src, replica))
    assert data["ok"] is False
    c = checks_by_name(data)["target.writable"]
    assert c["status"] == "error" and "replica" in c["message"], c

    # an invalid spec is the only error answer
    code, doc = daemon.api("precheck", dict(good, bandwidth_limit_mb=0))
    check_error(code, doc, 400, "request_data.bandwidth_limit_mb")
    assert daemon.ok("list") == {"tasks": []}
    log = daemon.log_text()
    assert "pc-secret" not in log and "wrong-pw" not in log and "Traceback" not in log


# --- verify ------------------------------------------------------------------------------------

def test_verify_finds_exactly_the_planted_differences(daemon: Daemon, servers: Servers) -> None:
    src, dst = servers(password="vf-secret"), servers()
    populate(src.client())
    n = src.client().dbsize()
    tid = daemon.create(spec(src, dst, task_id="copy"))
    daemon.wait_state(tid, "Succeeded")

    # a correct copy: nothing to report
    v = verify(daemon, task_id=tid)
    r = v["result"]
    assert v["task_id"] == tid and v["mode"] == "full" and v["percent"] == 100.0
    assert v["source"] == src.addr and v["target"] == dst.addr
    assert r["consistent"] is True and r["differences"] == 0, r
    assert counts(r) == dict.fromkeys(KINDS, 0)
    assert r["keys_checked"] == n and r["recheck"]["enabled"] is False

    # plant one difference of each kind on the target
    d = dst.client()
    d.delete("k:7")                       # missing
    d.set("planted:extra", "x")           # extra
    d.delete("hash")
    d.rpush("hash", "not", "a", "hash")   # type_mismatch
    d.set("str", "changed")               # value_mismatch
    d.pexpire("k:8", 900_000)             # ttl_mismatch (no TTL on the source)
    expected = {"missing": ["k:7"], "extra": ["planted:extra"], "type_mismatch": ["hash"],
                "value_mismatch": ["str"], "ttl_mismatch": ["k:8"]}
    v = verify(daemon, task_id=tid)
    r = v["result"]
    assert counts(r) == dict.fromkeys(KINDS, 1), r
    assert r["differences"] == 5 and r["consistent"] is False
    assert {k: [e["key"] for e in r["examples"][k]] for k in KINDS} == expected
    assert r["keys_checked"] == n

    # the two-endpoint form finds the same, and says there is no task
    v = verify(daemon, source=endpoint(src), target=endpoint(dst))
    assert v["task_id"] is None
    assert counts(v["result"]) == dict.fromkeys(KINDS, 1)
    # with a filter: only keys under the prefix are compared
    v = verify(daemon, source=endpoint(src), target=endpoint(dst),
               filter={"include_prefixes": ["k:"]}, examples=0)
    r = v["result"]
    assert counts(r) == {"missing": 1, "extra": 0, "type_mismatch": 0, "value_mismatch": 0,
                         "ttl_mismatch": 1}, r
    assert r["keys_checked"] == 300 and r["examples"]["missing"] == []

    # sampled mode: N random source keys, no extra-key scan
    v = verify(daemon, task_id=tid, sample=50)
    r = v["result"]
    assert v["mode"] == "sample" and r["mode"] == "sample" and r["sample"] == 50
    assert r["keys_checked"] == 50 and r["extra"] is None
    assert 0 <= r["differences"] <= 4
    # a sample larger than the data set compares every key
    r = verify(daemon, task_id=tid, sample=10_000)["result"]
    assert r["keys_checked"] == n and r["missing"] == 1 and r["value_mismatch"] == 1

    # the answers never carry a password
    assert "vf-secret" not in json.dumps(daemon.ok("get", {"verification_id": v[
        "verification_id"]}))
    assert "vf-secret" not in daemon.log_text()
    log = daemon.log_text()
    assert f"verification {v['verification_id']} (task {tid}): done" in log


def test_verify_live_incremental_task_under_writes(daemon: Daemon, servers: Servers) -> None:
    src, dst = servers(), servers()
    fill_bulk(src.client(), 2000)
    tid = daemon.create(spec(src, dst, reader="psync",
                             migration_method="incremental_migration"))
    wait_for(lambda: daemon.task(tid)["phase"] == "incremental", 60, 0.1,
             what="incremental phase")
    stop = threading.Event()
    errors: list[Exception] = []

    def light_writes() -> None:
        rng = random.Random(5)
        c = src.client()
        try:
            while not stop.is_set():   # ~100 writes/s spread over ~4000 keys
                pipe = c.pipeline(transaction=False)
                pipe.set(f"k:{rng.randrange(2000)}", f"new-{time.monotonic()}")
                pipe.incr(f"counter:{rng.randrange(1000)}")
                pipe.hset(f"h:{rng.randrange(1000)}", "f", rng.randrange(100))
                pipe.execute()
                time.sleep(0.03)
        except Exception as exc:  # noqa: BLE001 - reported by the test below
            errors.append(exc)

    writer = threading.Thread(target=light_writes, daemon=True)
    writer.start()
    try:
        time.sleep(0.5)
        v = verify(daemon, task_id=tid)
    finally:
        stop.set()
        writer.join(10)
    assert not errors, errors
    r = v["result"]
    assert r["recheck"]["enabled"] is True
    # the checkpoint key the task keeps on the target is not an extra key
    assert dst.client(15).exists(f"cdcd:checkpoint:{tid}")
    assert r["differences"] == 0, r
    assert r["keys_checked"] >= 2000
    assert daemon.task(tid)["state"] == "Running"


# --- metrics -----------------------------------------------------------------------------------

def scrape(d: Daemon, token: str = "") -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Parse /metrics into {(sample name, sorted labels): value}."""
    status, body = http_get(d.url + "/metrics", token)
    assert status == 200, body
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    names = set()
    for family in text_string_to_metric_families(body.decode()):
        # cdcd's own series, and the process and platform collectors'
        assert family.name.startswith(("cdcd_", "process_", "python_")), family.name
        for s in family.samples:
            assert not s.name.endswith("_created"), s.name
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in out, f"duplicate sample {key}"
            out[key] = s.value
            names.add(s.name)
    return out


def metric(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
           **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_metrics_match_the_task_view(daemon: Daemon, servers: Servers) -> None:
    src, dst = servers(), servers()
    fill_bulk(src.client(), 500)
    tid = daemon.create(spec(src, dst, task_id="live", reader="psync",
                             migration_method="incremental_migration"))
    wait_for(lambda: daemon.task(tid)["phase"] == "incremental", 60, 0.1,
             what="incremental phase")
    c = src.client()
    for i in range(120):
        c.incr("counter")
    wait_for(lambda: daemon.task(tid)["progress"]["incremental"]["ops_applied"] >= 120
             and daemon.task(tid)["progress"]["incremental"]["lag_bytes"] == 0, 30,
             what="120 commands applied")
    assert dst.client().get("counter") == b"120"
    # a task that failed: its error is counted
    failed = daemon.create(spec(src, DEAD_DST, task_id="broken"))
    daemon.wait_state(failed, "Failed")

    before = daemon.task(tid)
    samples = scrape(daemon)
    after = daemon.task(tid)

    def agrees(value: float, *path: str) -> bool:
        """The metric equals the view's value read just before or just after the scrape
        (or lies between them: the source offset moves with the master's PINGs)."""
        a: Any = before["progress"]
        b: Any = after["progress"]
        for key in path:
            a, b = a[key], b[key]
        return bool(min(a, b) - 0.1 <= value <= max(a, b) + 0.1)

    p = before["progress"]
    for s in ("Initial", "Running", "Paused", "Failed", "Succeeded"):
        assert metric(samples, "cdcd_task_state", task_id=tid, state=s) == \
            (1.0 if s == "Running" else 0.0)
        assert metric(samples, "cdcd_task_state", task_id=failed, state=s) == \
            (1.0 if s == "Failed" else 0.0)
    assert metric(samples, "cdcd_snapshot_keys_total", task_id=tid) == \
        p["snapshot"]["keys_done"] == 500
    assert metric(samples, "cdcd_snapshot_keys_expected", task_id=tid) == \
        p["snapshot"]["keys_total"]
    assert metric(samples, "cdcd_snapshot_bytes_total", task_id=tid) == p["snapshot"]["bytes"]
    assert metric(samples, "cdcd_commands_applied_total", task_id=tid) == \
        p["incremental"]["ops_applied"] >= 120
    assert agrees(metric(samples, "cdcd_target_written_bytes_total", task_id=tid),
                  "bytes_written")
    assert agrees(metric(samples, "cdcd_lag_bytes", task_id=tid), "incremental", "lag_bytes")
    if p["incremental"]["lag_ms"] is not None and after["progress"]["incremental"]["lag_ms"]:
        # in seconds, the base unit; the view says milliseconds (rounded to 0.1)
        assert agrees(1000 * metric(samples, "cdcd_lag_seconds", task_id=tid),
                      "incremental", "lag_ms")
    assert metric(samples, "cdcd_retries_total", task_id=tid) == p["retries"] == 0
    assert metric(samples, "cdcd_errors_total", task_id=tid) == p["errors"] == 0
    assert metric(samples, "cdcd_errors_total", task_id=failed) >= 1
    assert daemon.task(failed)["progress"]["errors"] >= 1
    assert metric(samples, "cdcd_full_resyncs_total", task_id=tid) == 0
    # the API itself: requests by type and code, latency by type
    assert metric(samples, "cdcd_api_requests_total", request_type="get", code="200") >= 3
    assert metric(samples, "cdcd_api_requests_total", request_type="create", code="200") == 2
    assert metric(samples, "cdcd_api_request_duration_seconds_count", request_type="get") >= 3
    daemon.api("get", {"task_id": "missing"})
    samples = scrape(daemon)
    assert metric(samples, "cdcd_api_requests_total", request_type="get", code="404") == 1
    # a deleted task leaves the metrics
    daemon.ok("delete", {"task_id": failed})
    assert not any(dict(k[1]).get("task_id") == failed for k in scrape(daemon))


# --- start_at, token ---------------------------------------------------------------------------

def test_start_at_is_honoured_across_a_restart(daemon: Daemon, servers: Servers) -> None:
    src, dst = servers(), servers()
    src.client().set("k", "v")
    start = math.ceil(time.time()) + 5
    start_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start))
    tid = daemon.create(spec(src, dst, start_at=start_at))
    t = daemon.task(tid)
    assert t["state"] == "Initial" and t["spec"]["start_at"] == start_at
    daemon.restart()
    t = daemon.task(tid)
    assert time.time() < start, "the restart took longer than the start_at margin"
    assert t["state"] == "Initial" and t["phase"] == "scheduled", t
    assert dst.client().dbsize() == 0
    t = daemon.wait_state(tid, "Succeeded", timeout=30)
    assert datetime.fromisoformat(t["updated_at"]).timestamp() >= start
    assert dst.client().get("k") == b"v"
    log = daemon.log_text()
    assert f"task {tid}: Initial -> Running" in log
    assert f"task {tid}: Running -> Succeeded" in log


def test_token_on_cdc_and_metrics_not_healthz(daemon_factory: Callable[..., Daemon],
                                              tmp_path: Path) -> None:
    cfg = tmp_path / "tok.toml"
    cfg.write_text("[daemon]\nmetrics_need_token = true\n")
    d = daemon_factory(token="op-token-1", extra=["--config", str(cfg)])
    assert d.ok("list") == {"tasks": []}
    for headers in ({"Authorization": "Bearer nope"}, {"Authorization": "op-token-1"}):
        code, doc = d.request(b'{"request_type": "verify", "request_data": {}}', headers)
        check_error(code, doc, 401)
    assert http_get(d.url + "/healthz")[0] == 200
    code, body = http_get(d.url + "/metrics")
    assert code == 401 and b"op-token-1" not in body
    assert http_get(d.url + "/metrics", "wrong")[0] == 401
    assert any(k[0] == "cdcd_api_requests_total" for k in scrape(d, "op-token-1"))
    # without metrics_need_token /metrics stays open while /cdc needs the token
    open_metrics = daemon_factory(token="op-token-2")
    assert http_get(open_metrics.url + "/metrics")[0] == 200
    code, doc = open_metrics.request(b'{"request_type": "list"}', {"Authorization": "Bearer x"})
    check_error(code, doc, 401)
    assert "op-token" not in d.log_text() + open_metrics.log_text()


# --- CLI ---------------------------------------------------------------------------------------

def run_cli(d: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    r = cdcd(d, *args)
    assert "Traceback" not in r.stderr, r.stderr
    return r


def test_cli_precheck_and_verify(daemon: Daemon, servers: Servers, tmp_path: Path) -> None:
    src, dst = servers(), servers()
    populate(src.client())

    r = run_cli(daemon, "precheck", "--source", src.addr, "--target", dst.addr,
                "--reader", "scan")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0].split() == ["CHECK", "STATUS", "MESSAGE"]
    assert any(line.split()[:2] == ["target.writable", "ok"] for line in lines)
    assert lines[-1].startswith("precheck passed")
    # from a spec file, failing: exit status 1 and the error in the table
    dst.client().set("occupied", "1")
    f = tmp_path / "spec.json"
    f.write_text(json.dumps(spec(src, dst, existing_keys="fail")))
    r = run_cli(daemon, "precheck", "-f", str(f))
    assert r.returncode == 1
    assert any(line.split()[:2] == ["target.existing_keys", "error"]
               for line in r.stdout.splitlines())
    assert "precheck failed: 1 error" in r.stdout
    r = run_cli(daemon, "precheck", "-f", str(f), "--json")
    assert r.returncode == 1 and json.loads(r.stdout)["data"]["ok"] is False
    dst.client().delete("occupied")

    tid = daemon.create(spec(src, dst, task_id="clicopy"))
    daemon.wait_state(tid, "Succeeded")
    r = run_cli(daemon, "verify", tid, "--wait")
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert "consistent   yes" in r.stdout and "differences  0" in r.stdout
    dst.client().delete("str")
    dst.client().set("planted", "x")
    r = run_cli(daemon, "verify", tid, "--wait")
    assert r.returncode == 1
    assert "missing 1" in r.stdout and "extra 1" in r.stdout
    assert "str" in r.stdout and "planted" in r.stdout and "consistent   no" in r.stdout
    # the two-endpoint form, sampled
    r = run_cli(daemon, "verify", "--source", src.addr, "--target", dst.addr, "--sample", "20",
                "--wait", "--json")
    doc = json.loads(r.stdout)["data"]["verification"]
    assert doc["mode"] == "sample" and doc["result"]["keys_checked"] == 20
    assert r.returncode == (0 if doc["result"]["consistent"] else 1)
    # without --wait: the id, then get / delete it
    r = run_cli(daemon, "verify", tid)
    vid = r.stdout.strip()
    assert r.returncode == 0 and len(vid) == 32
    wait_verification(daemon, vid)
    r = run_cli(daemon, "get", vid, "--verification")
    assert r.returncode == 0 and f"verification {vid}" in r.stdout and "missing 1" in r.stdout
    assert run_cli(daemon, "delete", vid, "--verification").stdout.strip() == f"{vid} deleted"
    r = run_cli(daemon, "get", vid, "--verification")
    assert r.returncode == 1 and "verification_not_found" in r.stderr
    # usage mistakes are one-line errors
    r = run_cli(daemon, "verify")
    assert r.returncode == 1 and "task id" in r.stderr
    r = run_cli(daemon, "verify", tid, "--source", src.addr)
    assert r.returncode == 1 and "not both" in r.stderr
    r = run_cli(daemon, "verify", tid, "--sample", "0")
    assert r.returncode == 1 and "request_data.sample" in r.stderr


def test_cli_watch_redraws_a_live_task(daemon: Daemon, servers: Servers) -> None:
    src, dst = servers(), servers()
    fill_bulk(src.client(), 20_000, value_size=200)
    tid = daemon.create(spec(src, dst, task_id="watched", reader="psync",
                             migration_method="incremental_migration", bandwidth_limit_mb=1))
    env = {k: v for k, v in os.environ.items() if k not in ("CDCD_URL", "CDCD_AUTH_TOKEN")}
    proc = subprocess.Popen([sys.executable, "-m", "cdcd", "get", "--url", daemon.url, tid,
                             "--watch"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        assert proc.stdout is not None
        frames: list[list[str]] = [[]]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline().rstrip("\n")
            if line == "":
                frames.append([])
                if len(frames) >= 3 and any("stream" in ln for ln in frames[-2]) and \
                        daemon.task(tid)["phase"] == "incremental":
                    break
                continue
            frames[-1].append(line)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0 and "Traceback" not in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    frames = [f for f in frames if f]
    assert len(frames) >= 2, frames
    for frame in frames:
        assert frame[0] == f"task      {tid}", frame
        assert any(ln.startswith("snapshot  [") and "%" in ln for ln in frame), frame
        assert any(ln.startswith("stream    offset") and "lag" in ln for ln in frame), frame
        assert "Ctrl-C" in frame[-1]
    wait_for(lambda: daemon.task(tid)["phase"] == "incremental", 60, 0.2, what="incremental")
    assert_same(src.client(), dst.client(), ignore=[f"cdcd:checkpoint:{tid}".encode()])
