"""The HTTP contract of API.md: envelope, every request type, every error path, masking,
idempotency, limits, and restart recovery of task states.

Pure request validation runs against the aiohttp app in-process (fast); everything that
involves a task's lifecycle runs against the real daemon subprocess and real servers.
"""

from __future__ import annotations

import asyncio
import copy
import io
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from cdcd.config import Config
from cdcd.server import make_app
from cdcd.store import Store, StoreError

from .compare import assert_same, fill_bulk, write_commands
from .daemon import Daemon, spec
from .servers import RedisServer, free_port, wait_for

FUTURE = "2099-01-01T00:00:00Z"
# Privileged ports nobody listens on (free_port() never hands them to a test server):
# connecting there fails at once.
DEAD_SRC = "127.0.0.1:1"
DEAD_DST = "127.0.0.1:2"


def base_spec(**kw: Any) -> dict[str, Any]:
    """A valid spec whose task waits for start_at, so it never touches a server; many of
    them share the dead target, which only ``shared_target`` allows."""
    return {"source": {"addrs": DEAD_SRC}, "target": {"addrs": DEAD_DST},
            "start_at": FUTURE, "shared_target": True, **kw}


def check_error(status: int, doc: Any, code: int, *needles: str) -> None:
    assert status == code, (status, doc)
    assert isinstance(doc, dict), doc
    assert doc.get("code") == code, doc
    assert isinstance(doc.get("error"), str) and doc["error"], doc
    msg = doc.get("message")
    assert isinstance(msg, str) and msg, doc
    assert "Traceback" not in msg and "File \"" not in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)


# --- in-process app -------------------------------------------------------------------------

class Api:
    def __init__(self, client: TestClient) -> None:  # type: ignore[type-arg]
        self.client = client

    async def raw(self, body: bytes, headers: dict[str, str] | None = None,
                  path: str = "/cdc") -> tuple[int, Any]:
        # a BytesIO: aiohttp warns (an error here) about large raw bytes bodies
        resp = await self.client.post(path, data=io.BytesIO(body), headers=headers or {})
        text = await resp.read()
        assert resp.content_type == "application/json", (resp.status, text[:200])
        return resp.status, json.loads(text)

    async def call(self, request_type: str, data: Any = None, **kw: Any) -> tuple[int, Any]:
        body = {"request_type": request_type}
        if data is not None:
            body["request_data"] = data
        return await self.raw(json.dumps(body).encode(), **kw)

    async def ok(self, request_type: str, data: Any = None) -> Any:
        status, doc = await self.call(request_type, data)
        assert status == 200 and doc["code"] == 200, (status, doc)
        return doc["data"]


@pytest.fixture
async def api(aiohttp_client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
              ) -> AsyncIterator[Api]:
    monkeypatch.delenv("CDCD_AUTH_TOKEN", raising=False)
    app = make_app(Config(data_dir=str(tmp_path / "data"), max_tasks=3))
    yield Api(await aiohttp_client(app))


ENVELOPE_ERRORS: list[tuple[bytes, str]] = [
    (b"", "JSON"),
    (b"{", "JSON"),
    (b"\xff\xfe\x00", "JSON"),
    (b"{'request_type': 'list'}", "JSON"),
    (b"[]", "object"),
    (b'"list"', "object"),
    (b"null", "object"),
    (b"42", "object"),
    (b"{}", "request_type"),
    (b'{"request_type": 5}', "request_type"),
    (b'{"request_type": null}', "request_type"),
    (b'{"request_type": "frobnicate"}', "request_type"),
    (b'{"request_type": "LIST"}', "request_type"),
    (b'{"request_type": "list", "extra": 1}', "extra"),
    (b'{"request_type": "list", "request_data": []}', "request_data"),
    (b'{"request_type": "list", "request_data": "x"}', "request_data"),
    (b'{"request_type": "list", "request_data": {"state": "Bogus"}}', "request_data.state"),
    (b'{"request_type": "list", "request_data": {"state": 1}}', "request_data.state"),
    (b'{"request_type": "list", "request_data": {"foo": 1}}', "request_data.foo"),
    (b'{"request_type": "get", "request_data": {}}', "request_data.task_id"),
    (b'{"request_type": "get"}', "request_data.task_id"),
    (b'{"request_type": "get", "request_data": {"task_id": 5}}', "request_data.task_id"),
    (b'{"request_type": "get", "request_data": {"task_id": ""}}', "request_data.task_id"),
    (b'{"request_type": "get", "request_data": {"task_id": "a", "x": 1}}', "request_data.x"),
    (b'{"request_type": "pause", "request_data": {}}', "request_data.task_id"),
    (b'{"request_type": "pause", "request_data": {"task_id": "a", "force": true}}',
     "request_data.force"),
    (b'{"request_type": "resume", "request_data": {"task_id": ["a"]}}', "request_data.task_id"),
    (b'{"request_type": "delete", "request_data": {}}', "request_data.task_id"),
    (b'{"request_type": "delete", "request_data": {"task_id": "a", "ignore_not_found": "yes"}}',
     "request_data.ignore_not_found"),
    (b'{"request_type": "delete", "request_data": {"task_id": "a", "ignore_not_found": 1}}',
     "request_data.ignore_not_found"),
    (b'{"request_type": "create"}', "request_data.source"),
    (b'{"request_type": "create", "request_data": []}', "request_data"),
]


@pytest.mark.parametrize("body,needle", ENVELOPE_ERRORS,
                         ids=[f"e{i}" for i in range(len(ENVELOPE_ERRORS))])
async def test_envelope_errors_are_400_naming_the_field(api: Api, body: bytes, needle: str
                                                        ) -> None:
    status, doc = await api.raw(body)
    check_error(status, doc, 400, needle)
    assert doc["error"] == "invalid_request"


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """Set (or, with value DELETE, remove) a dotted path in a spec."""
    def apply(d: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        for p in parents:
            d = d.setdefault(p, {})
        if value is DELETE:
            d.pop(last, None)
        else:
            d[last] = value
    return apply


DELETE = object()

SPEC_ERRORS: list[tuple[str, Any, str]] = [
    ("source", DELETE, "request_data.source: required"),
    ("target", DELETE, "request_data.target: required"),
    ("source.addrs", DELETE, "request_data.source.addrs: required"),
    ("source", "127.0.0.1:6379", "request_data.source"),
    ("target", None, "request_data.target: required"),
    ("sourec", {"addrs": "127.0.0.1:1"}, "request_data.sourec: unknown field"),
    ("source.pasword", "pw", "request_data.source.pasword: unknown field"),
    ("target.db", 1, "request_data.target.db: unknown field"),
    ("filter.db", [0], "request_data.filter.db: unknown field"),
    ("source.tls", "yes", "request_data.source.tls"),
    ("source.tls", 1, "request_data.source.tls"),
    ("source.password", 123, "request_data.source.password"),
    ("source.username", ["u"], "request_data.source.username"),
    ("name", 5, "request_data.name"),
    ("migration_method", "bogus", "request_data.migration_method"),
    ("migration_method", 1, "request_data.migration_method"),
    ("reader", "rdb", "request_data.reader"),
    ("resume_mode", "sometimes", "request_data.resume_mode"),
    ("existing_keys", "overwrite", "request_data.existing_keys"),
    ("bandwidth_limit_mb", 0, "request_data.bandwidth_limit_mb"),
    ("bandwidth_limit_mb", 10241, "request_data.bandwidth_limit_mb"),
    ("bandwidth_limit_mb", -1, "request_data.bandwidth_limit_mb"),
    ("bandwidth_limit_mb", 1.5, "request_data.bandwidth_limit_mb"),
    ("bandwidth_limit_mb", "10", "request_data.bandwidth_limit_mb"),
    ("bandwidth_limit_mb", True, "request_data.bandwidth_limit_mb"),
    ("start_at", "tomorrow", "request_data.start_at"),
    ("start_at", "2026-12-01T02:00:00", "request_data.start_at"),
    ("start_at", "2026-13-01T02:00:00Z", "request_data.start_at"),
    ("start_at", 1767225600, "request_data.start_at"),
    ("start_at", "9999-12-31T23:59:59-05:00", "request_data.start_at"),
    ("start_at", "0001-01-01T00:00:00+05:00", "request_data.start_at"),
    ("filter", "x", "request_data.filter"),
    ("filter.dbs", "0", "request_data.filter.dbs"),
    ("filter.dbs", [-1], "request_data.filter.dbs"),
    ("filter.dbs", [16000], "request_data.filter.dbs"),
    ("filter.dbs", [True], "request_data.filter.dbs"),
    ("filter.dbs", [1.0], "request_data.filter.dbs"),
    ("filter.include_prefixes", "user:", "request_data.filter.include_prefixes"),
    ("filter.include_prefixes", [""], "request_data.filter.include_prefixes"),
    ("filter.include_prefixes", [1], "request_data.filter.include_prefixes"),
    ("filter.exclude_prefixes", [None], "request_data.filter.exclude_prefixes"),
    ("db_mapping", [], "request_data.db_mapping"),
    ("db_mapping", {"a": 1}, "request_data.db_mapping"),
    ("db_mapping", {"1": -1}, "request_data.db_mapping"),
    ("db_mapping", {"1": "2"}, "request_data.db_mapping"),
    ("db_mapping", {"1": 16000}, "request_data.db_mapping"),
    ("db_mapping", {"-1": 0}, "request_data.db_mapping"),
    ("db_mapping", {"\u00b2": 1}, "request_data.db_mapping"),
    ("db_mapping", {"1" * 5000: 1}, "request_data.db_mapping"),
    ("db_mapping", {" 1": 1}, "request_data.db_mapping"),
    ("source.addrs", "localhost", "request_data.source.addrs"),
    ("source.addrs", "host:", "request_data.source.addrs"),
    ("source.addrs", ":6379", "request_data.source.addrs"),
    ("source.addrs", "h:0", "request_data.source.addrs"),
    ("source.addrs", "h:65536", "request_data.source.addrs"),
    ("source.addrs", "h:\u00b2", "request_data.source.addrs"),
    ("source.addrs", "h:" + "9" * 5000, "request_data.source.addrs"),
    ("source.addrs", "", "request_data.source.addrs"),
    ("source.addrs", [], "request_data.source.addrs"),
    ("source.addrs", [1], "request_data.source.addrs"),
    ("source.addrs", "a:1,,b:2", "request_data.source.addrs"),
    ("source.addrs", 6379, "request_data.source.addrs"),
    ("source.addrs", {"h": 1}, "request_data.source.addrs"),
    ("target.addrs", True, "request_data.target.addrs"),
    ("target.addrs", DEAD_SRC, "request_data.target.addrs"),
    ("task_id", "", "request_data.task_id"),
    ("task_id", "bad id", "request_data.task_id"),
    ("task_id", "x" * 129, "request_data.task_id"),
    ("task_id", "abc\n", "request_data.task_id"),
    ("task_id", "../etc", "request_data.task_id"),
    ("task_id", 5, "request_data.task_id"),
]


@pytest.mark.parametrize("path,value,needle", SPEC_ERRORS,
                         ids=[f"{p}-{i}" for i, (p, _, _) in enumerate(SPEC_ERRORS)])
async def test_create_rejects_bad_specs_naming_the_field(api: Api, path: str, value: Any,
                                                         needle: str) -> None:
    data = base_spec(filter={"dbs": [0]})
    _set(path, value)(data)
    status, doc = await api.call("create", data)
    check_error(status, doc, 400, needle)
    assert (await api.ok("list"))["tasks"] == []


async def test_unknown_task_is_404(api: Api) -> None:
    for rt in ("get", "pause", "resume", "delete"):
        status, doc = await api.call(rt, {"task_id": "nope"})
        check_error(status, doc, 404, "nope")
        assert doc["error"] == "task_not_found"
    assert await api.ok("delete", {"task_id": "nope", "ignore_not_found": True}) == \
        {"task_id": "nope"}
    status, doc = await api.call("delete", {"task_id": "nope", "ignore_not_found": False})
    check_error(status, doc, 404, "nope")


async def test_create_get_list_and_idempotent_create(api: Api) -> None:
    data = base_spec(task_id="t-1", name="orders", bandwidth_limit_mb=10240,
                     filter={"dbs": [1, 0], "include_prefixes": ["user:"],
                             "exclude_prefixes": ["tmp:"]},
                     db_mapping={"1": 0}, existing_keys="skip", resume_mode="manual")
    assert await api.ok("create", data) == {"task_id": "t-1"}
    # same id, same spec: idempotent, answers the same id and creates nothing
    assert await api.ok("create", copy.deepcopy(data)) == {"task_id": "t-1"}
    # an equivalent spec with the optional fields spelled differently is the same spec
    same = copy.deepcopy(data)
    same["source"]["addrs"] = [DEAD_SRC]
    same["filter"]["dbs"] = [0, 1]
    assert await api.ok("create", same) == {"task_id": "t-1"}
    # same id, different spec: 409
    other = copy.deepcopy(data)
    other["existing_keys"] = "replace"
    status, doc = await api.call("create", other)
    check_error(status, doc, 409, "t-1")
    assert doc["error"] == "conflict"

    task = (await api.ok("get", {"task_id": "t-1"}))["task"]
    assert task["task_id"] == "t-1" and task["name"] == "orders"
    assert task["state"] == "Initial"
    for key in ("phase", "reason", "created_at", "updated_at", "spec", "progress"):
        assert key in task, key
    s = task["spec"]
    assert s["source"]["addrs"] == DEAD_SRC and s["target"]["addrs"] == DEAD_DST
    assert s["filter"] == {"dbs": [0, 1], "include_prefixes": ["user:"],
                           "exclude_prefixes": ["tmp:"]}
    assert s["db_mapping"] == {"1": 0} and s["existing_keys"] == "skip"
    assert s["bandwidth_limit_mb"] == 10240 and s["start_at"] == "2099-01-01T00:00:00Z"
    snap = task["progress"]["snapshot"]
    assert {"keys_total", "keys_done", "bytes", "percent"} <= set(snap)

    # generated id is a uuid4 hex
    gen = (await api.ok("create", base_spec()))["task_id"]
    assert len(gen) == 32 and int(gen, 16) >= 0
    tasks = (await api.ok("list", {}))["tasks"]
    assert sorted(t["task_id"] for t in tasks) == sorted(["t-1", gen])
    assert (await api.ok("list"))["tasks"] == tasks
    assert [t["task_id"] for t in (await api.ok("list", {"state": "Initial"}))["tasks"]] \
        == [t["task_id"] for t in tasks]
    assert (await api.ok("list", {"state": "Running"}))["tasks"] == []

    # max_tasks is 3 here
    await api.ok("create", base_spec(task_id="t-3"))
    status, doc = await api.call("create", base_spec(task_id="t-4"))
    check_error(status, doc, 409, "max_tasks")
    # an idempotent create is still fine at the limit
    assert await api.ok("create", copy.deepcopy(data)) == {"task_id": "t-1"}
    assert await api.ok("delete", {"task_id": "t-3"}) == {"task_id": "t-3"}
    await api.ok("create", base_spec(task_id="t-4"))


async def test_pause_resume_are_idempotent_on_scheduled_task(api: Api) -> None:
    await api.ok("create", base_spec(task_id="sched"))
    for _ in range(2):
        assert await api.ok("pause", {"task_id": "sched"}) == {"task_id": "sched",
                                                                "state": "Paused"}
        assert (await api.ok("get", {"task_id": "sched"}))["task"]["state"] == "Paused"
    # its start_at is still ahead: resumed, it waits again in Initial (phase scheduled)
    for _ in range(2):
        assert await api.ok("resume", {"task_id": "sched"}) == {"task_id": "sched",
                                                                 "state": "Initial"}
        t = (await api.ok("get", {"task_id": "sched"}))["task"]
        assert (t["state"], t["phase"]) == ("Initial", "scheduled"), t
    assert await api.ok("delete", {"task_id": "sched"}) == {"task_id": "sched"}
    status, doc = await api.call("get", {"task_id": "sched"})
    check_error(status, doc, 404, "sched")


async def test_body_limit_is_413(api: Api) -> None:
    big = json.dumps({"request_type": "list", "request_data": {"x": "a" * (1 << 20)}}).encode()
    status, doc = await api.raw(big)
    check_error(status, doc, 413)
    assert doc["error"] == "payload_too_large"
    # a body of exactly the limit is read and handled (a spec is bounded far below the
    # limit, so JSON white space fills it up)
    body = json.dumps({"request_type": "create", "request_data": base_spec(name="n")}).encode()
    body += b" " * ((1 << 20) - len(body))
    assert len(body) == 1 << 20
    status, doc = await api.raw(body)
    assert status == 200, doc
    status, doc = await api.raw(body + b" ")
    check_error(status, doc, 413)


async def test_secrets_never_in_responses(api: Api) -> None:
    secret_src, secret_dst = "s3cret-SRC-pw", "s3cret-DST-pw"
    data = base_spec(task_id="sec")
    data["source"]["password"] = secret_src
    data["source"]["username"] = "alice"
    data["target"]["password"] = secret_dst
    bodies = [await api.ok("create", data)]
    bodies.append(await api.ok("get", {"task_id": "sec"}))
    bodies.append(await api.ok("list"))
    bodies.append(await api.ok("pause", {"task_id": "sec"}))
    changed = copy.deepcopy(data)
    changed["target"]["password"] = "another-" + secret_dst
    bodies.append((await api.call("create", changed))[1])
    bad = copy.deepcopy(data)
    bad["source"]["password"] = 12345678
    bodies.append((await api.call("create", bad))[1])
    text = json.dumps(bodies)
    assert secret_src not in text and secret_dst not in text and "12345678" not in text
    view = (await api.ok("get", {"task_id": "sec"}))["task"]["spec"]
    assert view["source"]["password"] == "***" and view["target"]["password"] == "***"
    assert view["source"]["username"] == "alice"
    # an unset password is not shown as set
    await api.ok("create", base_spec(task_id="nopw"))
    view = (await api.ok("get", {"task_id": "nopw"}))["task"]["spec"]
    assert view["source"]["password"] == "" and view["target"]["password"] == ""


async def test_bearer_token(aiohttp_client: Any, tmp_path: Path,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CDCD_AUTH_TOKEN", raising=False)
    api = Api(await aiohttp_client(make_app(Config(data_dir=str(tmp_path / "d"),
                                                   auth_token="tok-123"))))
    body = b'{"request_type": "list", "request_data": {}}'
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "tok-123"},
                    {"Authorization": "Basic tok-123"}):
        status, doc = await api.raw(body, headers)
        check_error(status, doc, 401)
        assert "tok-123" not in json.dumps(doc)
    status, doc = await api.raw(body, {"Authorization": "Bearer tok-123"})
    assert status == 200 and doc == {"code": 200, "data": {"tasks": []}}
    # the token is checked before the body is even parsed
    status, doc = await api.raw(b"not json")
    check_error(status, doc, 401)
    resp = await api.client.get("/healthz")
    assert resp.status == 200


# --- the real daemon --------------------------------------------------------------------------

def test_healthz_metrics_and_sigint(daemon: Daemon) -> None:
    with urllib.request.urlopen(daemon.url + "/healthz", timeout=5) as r:
        assert r.status == 200
    with urllib.request.urlopen(daemon.url + "/metrics", timeout=5) as r:
        assert r.status == 200
    assert daemon.ok("list") == {"tasks": []}
    assert daemon.stop(signal.SIGINT) == 0
    assert "Traceback" not in daemon.log_text()


def slow_source(servers: Callable[..., RedisServer], n: int = 40_000) -> RedisServer:
    """A source whose copy takes many seconds at bandwidth_limit_mb 1 (~8 MB to write)."""
    src = servers()
    fill_bulk(src.client(), n, value_size=180)
    return src


def test_lifecycle_on_a_running_snapshot(daemon: Daemon,
                                         servers: Callable[..., RedisServer]) -> None:
    src, dst = slow_source(servers), servers()
    before = write_commands(src.client())
    tid = daemon.create(spec(src, dst, task_id="life", bandwidth_limit_mb=1))
    # get shows the snapshot progressing
    def progressing() -> dict[str, Any] | None:
        t = daemon.task(tid)
        return t if t["progress"]["snapshot"]["keys_done"] > 0 else None

    t = wait_for(progressing, 30, 0.05, what="snapshot progress")
    assert t["state"] == "Running" and t["phase"] == "snapshot"
    snap = t["progress"]["snapshot"]
    assert snap["keys_total"] == 40_000
    assert 0 < snap["keys_done"] < 40_000 and snap["bytes"] > 0
    assert snap["percent"] == round(100 * snap["keys_done"] / 40_000, 1) < 100
    assert [x["task_id"] for x in daemon.ok("list", {"state": "Running"})["tasks"]] == [tid]

    for _ in range(2):
        assert daemon.ok("pause", {"task_id": tid}) == {"task_id": tid, "state": "Paused"}
    paused = daemon.task(tid)
    assert paused["state"] == "Paused"
    done = paused["progress"]["snapshot"]["keys_done"]
    # paused means nothing more is written
    n = dst.client().dbsize()
    time.sleep(0.5)  # a window in which a still-running pipeline would write
    assert dst.client().dbsize() == n
    assert daemon.task(tid)["progress"]["snapshot"]["keys_done"] == done
    assert daemon.ok("list", {"state": "Running"})["tasks"] == []
    assert [x["task_id"] for x in daemon.ok("list", {"state": "Paused"})["tasks"]] == [tid]

    for _ in range(2):
        assert daemon.ok("resume", {"task_id": tid}) == {"task_id": tid, "state": "Running"}
    wait_for(lambda: daemon.task(tid)["progress"]["snapshot"]["keys_done"] > done, 30,
             what="progress after resume")
    # delete stops the running task and leaves the data where it is
    assert daemon.ok("delete", {"task_id": tid}) == {"task_id": tid}
    n = dst.client().dbsize()
    assert n > 0
    time.sleep(0.5)
    assert dst.client().dbsize() == n
    code, doc = daemon.api("get", {"task_id": tid})
    check_error(code, doc, 404, tid)
    assert write_commands(src.client()) == before
    assert src.client().dbsize() == 40_000
    assert daemon.ok("delete", {"task_id": tid, "ignore_not_found": True}) == {"task_id": tid}


def test_succeeded_task_refuses_pause_and_resume(daemon: Daemon,
                                                 servers: Callable[..., RedisServer]) -> None:
    src, dst = servers(), servers()
    src.client().set("k", "v")
    tid = daemon.create(spec(src, dst))
    t = daemon.wait_state(tid, "Succeeded")
    assert t["phase"] == "done"
    for rt in ("pause", "resume"):
        code, doc = daemon.api(rt, {"task_id": tid})
        check_error(code, doc, 409, tid)
    assert daemon.task(tid)["state"] == "Succeeded"


def test_secrets_masked_in_responses_and_log(daemon: Daemon,
                                             servers: Callable[..., RedisServer]) -> None:
    src = servers(password="Src-Secret-1")
    dst = servers(password="Dst-Secret-2")
    src.client().set("k", "v")
    ok = daemon.create(spec(src, dst, task_id="ok", name="masked"))
    t = daemon.wait_state(ok, "Succeeded")
    assert t["spec"]["source"]["password"] == "***"
    assert t["spec"]["target"]["password"] == "***"
    wrong = spec(src, dst, task_id="wrong")
    wrong["source"]["password"] = "Wrong-Secret-3"
    daemon.create(wrong)
    failed = daemon.wait_state("wrong", "Failed")
    assert src.addr in failed["reason"]
    bodies = [daemon.ok("list"), failed, daemon.ok("pause", {"task_id": "wrong"}),
              daemon.ok("resume", {"task_id": "wrong"})]
    conflict = spec(src, dst, task_id="ok")
    conflict["target"]["password"] = "Other-Secret-4"
    bodies.append(daemon.api("create", conflict)[1])
    daemon.wait_state("wrong", "Failed")
    bodies.append(daemon.ok("delete", {"task_id": "wrong"}))
    text = json.dumps(bodies) + daemon.log_text()
    for secret in ("Src-Secret-1", "Dst-Secret-2", "Wrong-Secret-3", "Other-Secret-4"):
        assert secret not in text, secret
    daemon.stop()
    log = daemon.log_text()
    for secret in ("Src-Secret-1", "Dst-Secret-2", "Wrong-Secret-3", "Other-Secret-4"):
        assert secret not in log, secret
    # the store keeps them (it must, to reconnect), hence its mode
    st = daemon.data_dir / "cdcd.json"
    assert stat.S_IMODE(st.stat().st_mode) == 0o600
    assert "Src-Secret-1" in st.read_text()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_restart_keeps_every_state(daemon: Daemon, servers: Callable[..., RedisServer],
                                   sig: int) -> None:
    src, dst, dst2 = slow_source(servers, 20_000), servers(), servers()
    small = servers()
    small.client().set("k", "v")
    succeeded = daemon.create(spec(small, dst2, task_id="succeeded", shared_target=True))
    failed = daemon.create(spec(DEAD_SRC, dst2, task_id="failed", shared_target=True))
    scheduled = daemon.create(spec(small, dst2, task_id="scheduled", start_at=FUTURE,
                                   shared_target=True))
    paused = daemon.create(spec(src, dst, task_id="paused", bandwidth_limit_mb=1))
    wait_for(lambda: daemon.task(paused)["progress"]["snapshot"]["keys_done"] > 0, 30,
             what="snapshot progress")
    daemon.ok("pause", {"task_id": paused})
    daemon.wait_state(succeeded, "Succeeded")
    daemon.wait_state(failed, "Failed")
    before = {t["task_id"]: t for t in daemon.ok("list")["tasks"]}
    assert before[scheduled]["state"] == "Initial"
    paused_done = before[paused]["progress"]["snapshot"]["keys_done"]
    assert 0 < paused_done < 20_000

    store = daemon.store()
    assert store["version"] == 1
    assert set(store["tasks"]) == {succeeded, failed, scheduled, paused}
    assert stat.S_IMODE((daemon.data_dir / "cdcd.json").stat().st_mode) == 0o600

    if sig == signal.SIGKILL:
        daemon.kill()
    else:
        assert daemon.stop() == 0
    daemon.start()
    after = {t["task_id"]: t for t in daemon.ok("list")["tasks"]}
    assert set(after) == set(before)
    for tid, t in before.items():
        assert after[tid]["state"] == t["state"], tid
        assert after[tid]["reason"] == t["reason"], tid
        assert after[tid]["spec"] == t["spec"], tid
        assert after[tid]["created_at"] == t["created_at"], tid
    assert after[paused]["progress"]["snapshot"]["keys_done"] == paused_done
    assert after[succeeded]["phase"] == "done"
    # still paused a moment later: nothing restarted it
    n = dst.client().dbsize()
    time.sleep(0.3)
    assert daemon.task(paused)["state"] == "Paused" and dst.client().dbsize() == n
    # idempotent create still recognises the restored spec
    again = spec(small, dst2, task_id="succeeded", shared_target=True)
    assert daemon.ok("create", again) == {"task_id": "succeeded"}
    code, doc = daemon.api("create", spec(small, dst, task_id="succeeded"))
    check_error(code, doc, 409, "succeeded")

    # the paused task resumes from its checkpoint and finishes exact
    daemon.ok("delete", {"task_id": scheduled})
    daemon.ok("resume", {"task_id": paused})
    t = daemon.wait_state(paused, "Succeeded", timeout=60)
    assert t["phase"] == "done" and t["progress"]["snapshot"]["percent"] == 100.0
    assert_same(src.client(), dst.client())
    assert daemon.store()["tasks"].keys() == {succeeded, failed, paused}


def test_config_file_and_flags(tmp_path: Path, servers: Callable[..., RedisServer]) -> None:
    # config/cdcd.toml in the working directory is read when no --config is given
    work = tmp_path / "work"
    (work / "config").mkdir(parents=True)
    port = free_port()
    (work / "config" / "cdcd.toml").write_text(
        f'[daemon]\nport = {port}\ndata_dir = "meta"\nmax_tasks = 1\n')
    log = open(tmp_path / "serve.log", "wb")
    # the installed console script when there is one, else python -m cdcd
    script = Path(sys.executable).with_name("cdcd")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "cdcd"]
    proc = subprocess.Popen([*cmd, "serve"], cwd=work, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    try:
        d = Daemon(work / "meta")
        d.port = port
        d.proc = proc
        wait_for(d._healthy, 20, what="daemon from config/cdcd.toml")
        d.ok("create", base_spec(task_id="one"))
        code, doc = d.api("create", base_spec(task_id="two"))
        check_error(code, doc, 409, "max_tasks")
        assert (work / "meta" / "cdcd.json").exists()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    # --config FILE, and flags win over it
    cfg = tmp_path / "other.toml"
    cfg.write_text(f'[daemon]\nport = {free_port()}\nmax_tasks = 2\n')
    d = Daemon(tmp_path / "data-flags", extra=["--config", str(cfg), "--host", "127.0.0.1"])
    d.start()
    try:
        d.ok("create", base_spec(task_id="a"))
        d.ok("create", base_spec(task_id="b"))
        check_error(*d.api("create", base_spec(task_id="c")), 409, "max_tasks")
    finally:
        assert d.stop() == 0


@pytest.mark.parametrize("content,needle", [
    ('[daemon]\nmax_taks = 3\n', "max_taks"),
    ('[daemon]\nport = "80"\n', "port"),
    ('[daemon\n', "config"),
    ('[daemon]\nport = 70000\n', "port"),
])
def test_bad_config_exits_with_a_message(tmp_path: Path, content: str, needle: str) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(content)
    r = subprocess.run([sys.executable, "-m", "cdcd", "serve", "--config", str(cfg),
                        "--port", str(free_port()), "--data-dir", str(tmp_path / "d")],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2, r
    assert needle in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_data_dir_in_use_and_port_in_use(daemon: Daemon, tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "cdcd", "serve", "--port", str(free_port()),
                        "--data-dir", str(daemon.data_dir)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "in use" in r.stderr and "Traceback" not in r.stderr, r
    r = subprocess.run([sys.executable, "-m", "cdcd", "serve", "--port", str(daemon.port),
                        "--data-dir", str(tmp_path / "other")],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and str(daemon.port) in r.stderr, r
    assert "Traceback" not in r.stderr, r.stderr
    # the first daemon is unaffected
    assert daemon.ok("list") == {"tasks": []}


def test_bodies_on_the_wire(daemon: Daemon) -> None:
    """413 and 400 through a real socket, with curl --fail semantics (status == code)."""
    code, doc = daemon.request(b"x" * ((1 << 20) + 1))
    check_error(code, doc, 413)
    code, doc = daemon.request(b"{")
    check_error(code, doc, 400, "JSON")
    # a raw socket request with a huge Content-Length is refused without reading it all
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as s:
        s.sendall(b"POST /cdc HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 50000000\r\n\r\n" + b"{" * 65536)
        head = s.recv(65536)
    assert head.startswith(b"HTTP/1.1 413"), head[:200]
    assert daemon.ok("list") == {"tasks": []}


def test_many_bad_requests_never_500(daemon: Daemon) -> None:
    bodies = [body for body, _ in ENVELOPE_ERRORS]
    for path, value, _ in SPEC_ERRORS:
        data = base_spec()
        _set(path, value)(data)
        bodies.append(json.dumps({"request_type": "create", "request_data": data}).encode())
    for body in bodies:
        code, doc = daemon.request(body)
        check_error(code, doc, 400)
    assert daemon.ok("list") == {"tasks": []}
    log = daemon.log_text()
    assert "Traceback" not in log and "internal error" not in log


def test_start_at_waits_in_initial(daemon: Daemon, servers: Callable[..., RedisServer]) -> None:
    src, dst = servers(), servers()
    src.client().set("k", "v")
    soon = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 2))
    tid = daemon.create(spec(src, dst, start_at=soon))
    t = daemon.task(tid)
    assert t["state"] == "Initial" and t["spec"]["start_at"] == soon
    assert dst.client().dbsize() == 0
    t = daemon.wait_state(tid, "Succeeded", timeout=30)
    assert dst.client().get("k") == b"v"
    # a scheduled task survives a restart still scheduled
    far = daemon.create(spec(src, dst, start_at=FUTURE))
    daemon.restart()
    assert daemon.task(far)["state"] == "Initial"
    assert daemon.task(tid)["state"] == "Succeeded"


@pytest.mark.parametrize("content,needle", [
    (b'{"version": 1, "tasks": ', "cdcd.json"),
    (b"[1]", "cdcd.json"),
    (b'{"version": 99, "tasks": {}}', "version"),
    (b'{"tasks": {}}', "version"),
    (b'{"version": 1, "tasks": []}', "tasks"),
])
def test_unreadable_store_stops_the_daemon_with_a_message(tmp_path: Path, content: bytes,
                                                          needle: str) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "cdcd.json").write_bytes(content)
    r = subprocess.run([sys.executable, "-m", "cdcd", "serve", "--port", str(free_port()),
                        "--data-dir", str(data)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2, r
    assert needle in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert (data / "cdcd.json").read_bytes() == content  # never overwritten


def test_unreadable_records_are_skipped_not_lost(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    good = {"spec": {"task_id": "good", "source": {"addrs": DEAD_SRC},
                     "target": {"addrs": DEAD_DST}, "start_at": FUTURE},
            "state": "Paused", "phase": "", "reason": ""}
    tasks = {"good": good, "list": [], "nospec": {"state": "Running"},
             "badspec": {"spec": {"source": 1}}, "badstate": {**good, "state": "Bogus"}}
    (data / "cdcd.json").write_text(json.dumps({"version": 1, "tasks": tasks}))
    (data / ".cdcd.json.12345.tmp").write_text("{torn")
    d = Daemon(data).start()
    try:
        assert [t["task_id"] for t in d.ok("list")["tasks"]] == ["good"]
        assert d.task("good")["state"] == "Paused"
        assert not (data / ".cdcd.json.12345.tmp").exists()
        d.ok("resume", {"task_id": "good"})
        d.ok("pause", {"task_id": "good"})
        # the records it could not read are still in the file after it rewrote it
        assert set(d.store()["tasks"]) == set(tasks)
        assert "Traceback" not in d.log_text()
        for tid in ("list", "nospec", "badspec", "badstate"):
            assert f"task {tid}: stored record is unreadable" in d.log_text()
    finally:
        d.stop()


async def test_store_writes_survive_cancelled_flushes(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A flush cancelled mid-write (a task stopped while persisting) must not race the next
    one on the temp file, nor let an older version land after a newer one."""
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:  # widen the window in which two writes could overlap
        time.sleep(0.005)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    store = Store(tmp_path / "data")
    assert store.open() == {}
    try:
        pending = []
        for i in range(20):
            store.put("t", {"n": i})
            cancelled = asyncio.create_task(store.flush())
            await asyncio.sleep(0)  # it is writing in a thread now
            cancelled.cancel()
            store.put("t", {"n": i + 0.5})
            pending += [cancelled, asyncio.create_task(store.flush())]
            await asyncio.sleep(0)
        results = await asyncio.gather(*pending, return_exceptions=True)
        assert all(r is None or isinstance(r, asyncio.CancelledError) for r in results), results
        store.put("t", {"n": "last"})
        await store.flush()
        path = tmp_path / "data" / "cdcd.json"
        doc = json.loads(path.read_bytes())
        assert doc == {"version": 1, "tasks": {"t": {"n": "last"}}}
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["cdcd.json",
                                                                          "cdcd.lock"]
    finally:
        store.close()
    # a second store on the same dir while the first holds it is refused
    first = Store(tmp_path / "data")
    first.open()
    try:
        with pytest.raises(StoreError, match="in use"):
            Store(tmp_path / "data").open()
    finally:
        first.close()


def test_answers_are_durable_before_they_are_sent(daemon: Daemon) -> None:
    """Whatever the API answered survives a SIGKILL right after the answer."""
    daemon.ok("create", base_spec(task_id="a"))
    daemon.ok("create", base_spec(task_id="b"))
    daemon.ok("create", base_spec(task_id="c"))
    daemon.ok("pause", {"task_id": "b"})
    daemon.ok("pause", {"task_id": "c"})
    daemon.ok("resume", {"task_id": "c"})
    daemon.ok("delete", {"task_id": "a"})
    daemon.kill()
    daemon.start()
    states = {t["task_id"]: t["state"] for t in daemon.ok("list")["tasks"]}
    # c is scheduled (start_at ahead): resumed, it waits in Initial again
    assert states == {"b": "Paused", "c": "Initial"}
