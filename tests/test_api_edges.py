"""Issue 10, API edges and metrics, through raw sockets against the real daemon: a body
that never arrives (408), the connection cap (503), a client gone mid-body (499, no
traceback), any bytes in Authorization (401 with WWW-Authenticate), JSON error pages,
what aiohttp answers itself, a resumed scheduled task, and /metrics by Prometheus'
conventions."""

from __future__ import annotations

import json
import platform
import selectors
import socket
import struct
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from cdcd import __version__

from .daemon import Daemon, spec
from .servers import RedisServer, wait_for
from .test_api import base_spec, check_error

TOKEN = "edge-token-1"
TIMEOUT = 2          # body_read_timeout_s of these daemons
CAP = 20             # their max_connections
HALF_BODY = (b"POST /cdc HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
             b"Authorization: Bearer " + TOKEN.encode() + b"\r\nContent-Length: 100\r\n\r\n"
             b'{"request_type": ')


@dataclass
class Reply:
    status: int
    headers: dict[str, str] = field(default_factory=dict)   # names lowercased
    body: bytes = b""

    def doc(self) -> Any:
        assert self.headers.get("content-type", "").startswith("application/json"), self
        return json.loads(self.body)


def parse(raw: bytes) -> Reply:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1."), raw[:200]
    reply = Reply(int(lines[0].split()[1]), body=body)
    for line in lines[1:]:
        name, _, value = line.partition(":")
        reply.headers[name.strip().lower()] = value.strip()
    return reply


def read_to_close(s: socket.socket, timeout: float = 10) -> bytes:
    """Everything the daemon sends until it closes the connection (fails on a timeout)."""
    s.settimeout(timeout)
    out = b""
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            return out
        if not chunk:
            return out
        out += chunk


def connect(d: Daemon) -> socket.socket:
    return socket.create_connection(("127.0.0.1", d.port), timeout=10)


def exchange(d: Daemon, data: bytes) -> Reply:
    """Send raw bytes on a new connection; the answer, read until the daemon closes."""
    with connect(d) as s:
        s.sendall(data)
        return parse(read_to_close(s))


def request(method: str, path: str, body: bytes = b"", headers: str = "") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n{headers}"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def scrape(d: Daemon) -> dict[str, Any]:
    """/metrics parsed by prometheus_client: {family name: family}."""
    req = urllib.request.Request(d.url + "/metrics",
                                 headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        text = r.read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(families: dict[str, Any], family: str, sample: str | None = None,
          **labels: str) -> float:
    for s in families[family].samples:
        if s.name == (sample or family) and s.labels == labels:
            return float(s.value)
    raise AssertionError(f"no {sample or family}{labels} in /metrics")


def open_fds(d: Daemon) -> float:
    return value(scrape(d), "process_open_fds")


def edge_daemon(factory: Callable[..., Daemon], tmp_path: Path, *, timeout: int = TIMEOUT,
                cap: int = CAP, extra: str = "") -> Daemon:
    cfg = tmp_path / f"edges-{timeout}-{cap}.toml"
    cfg.write_text(f"[daemon]\nbody_read_timeout_s = {timeout}\nmax_connections = {cap}\n"
                   + extra)
    return factory(token=TOKEN, extra=["--config", str(cfg)])


def assert_clean_log(d: Daemon) -> None:
    log = d.log_text()
    assert "Traceback" not in log and "bug while" not in log and "internal error" not in log, \
        log[-3000:]


# --- the body read timeout ----------------------------------------------------------------------

def test_stalled_or_trickled_body_is_408_and_closed(daemon_factory: Callable[..., Daemon],
                                                    tmp_path: Path) -> None:
    d = edge_daemon(daemon_factory, tmp_path)
    # stalled: the head, a few bytes of the body, then nothing
    with connect(d) as s:
        started = time.monotonic()
        s.sendall(HALF_BODY)
        reply = parse(read_to_close(s, timeout=TIMEOUT + 8))
        took = time.monotonic() - started
    check_error(reply.status, reply.doc(), 408, "body_read_timeout_s")
    assert reply.doc()["error"] == "request_timeout"
    assert reply.headers["connection"] == "close"
    assert TIMEOUT - 0.5 <= took <= TIMEOUT + 3, took
    # trickled: a byte every 0.2 s never makes the deadline longer
    with connect(d) as s:
        started = time.monotonic()
        s.sendall(HALF_BODY)
        s.settimeout(0.2)
        raw = b""
        while time.monotonic() - started < TIMEOUT + 8:
            try:
                s.sendall(b" ")
            except OSError:
                break
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                continue
            except ConnectionResetError:
                break
            if not chunk:
                break
            raw += chunk
        took = time.monotonic() - started
    reply = parse(raw)
    check_error(reply.status, reply.doc(), 408)
    assert TIMEOUT - 0.5 <= took <= TIMEOUT + 3, took
    # a head that never ends is closed by the same timeout (aiohttp's keep-alive timer)
    with connect(d) as s:
        started = time.monotonic()
        s.sendall(b"POST /cdc HTTP/1.1\r\nHost: t\r\nX-Slow: ")
        assert read_to_close(s, timeout=TIMEOUT + 8) == b""
        assert time.monotonic() - started <= TIMEOUT + 3
    families = scrape(d)
    assert value(families, "cdcd_api_requests", "cdcd_api_requests_total",
                 request_type="invalid", code="408") == 2
    assert d.ok("list") == {"tasks": []}
    assert_clean_log(d)


def test_half_sent_bodies_and_silent_sockets_are_bounded(daemon_factory: Callable[..., Daemon],
                                                         tmp_path: Path) -> None:
    """2,000 half-sent bodies: CAP are held until the timeout (408), every other one is
    answered 503 at once and closed; the daemon's open descriptors stay bounded all along.
    Silent connections are closed by the timeout."""
    d = edge_daemon(daemon_factory, tmp_path, timeout=5)
    base = open_fds(d)
    n = 2000
    sel = selectors.DefaultSelector()
    answers: dict[socket.socket, bytes] = {}
    closed_at: dict[socket.socket, float] = {}
    started = time.monotonic()
    socks = []
    try:
        for _ in range(n):
            s = connect(d)
            s.sendall(HALF_BODY)
            s.setblocking(False)
            socks.append(s)
            answers[s] = b""
            sel.register(s, selectors.EVENT_READ)

        def drain(until: Callable[[], bool], deadline: float) -> None:
            while not until() and time.monotonic() < deadline:
                for key, _ in sel.select(timeout=0.2):
                    s = key.fileobj
                    assert isinstance(s, socket.socket)
                    try:
                        chunk = s.recv(65536)
                    except ConnectionResetError:
                        chunk = b""
                    if chunk:
                        answers[s] += chunk
                    else:
                        sel.unregister(s)
                        closed_at[s] = time.monotonic() - started
        # everything over the cap is answered and closed long before the timeout
        drain(lambda: len(closed_at) >= n - CAP, started + 60)
        assert len(closed_at) >= n - CAP
        held = n - len(closed_at)
        during = scrape(d)
        assert held <= CAP
        assert value(during, "cdcd_http_connections") <= CAP + 1   # + this scrape
        assert value(during, "process_open_fds") <= base + CAP + 10, (base, during)
        # then the held ones get their 408 when their body read times out
        drain(lambda: len(closed_at) == n, time.monotonic() + 5 + 10)
        assert len(closed_at) == n, f"{n - len(closed_at)} sockets still open"
    finally:
        sel.close()
        for s in socks:
            s.close()
    statuses: dict[int, int] = {}
    for s, raw in answers.items():
        reply = parse(raw)
        statuses[reply.status] = statuses.get(reply.status, 0) + 1
        if reply.status == 503:
            assert reply.doc()["error"] == "too_many_connections", reply
            assert reply.headers["retry-after"] == "1"
        else:
            assert reply.status == 408, reply
    assert statuses[408] >= CAP and statuses[503] >= n - 3 * CAP, statuses
    assert max(closed_at.values()) <= 60, "a socket was held for more than a minute"
    after = scrape(d)
    assert value(after, "cdcd_http_connections_rejected",
                 "cdcd_http_connections_rejected_total") == statuses[503]
    assert value(after, "process_open_fds") <= base + 5

    # silent connections (no request at all) are closed by the timeout too
    silent = [connect(d) for _ in range(100)]
    started = time.monotonic()
    try:
        for s in silent:
            assert read_to_close(s, timeout=15) == b""
        assert time.monotonic() - started <= 5 + 4
    finally:
        for s in silent:
            s.close()
    assert d.ok("list") == {"tasks": []}
    assert_clean_log(d)


def test_connection_cap_keeps_admitted_connections_and_answers_probes(
        daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    d = edge_daemon(daemon_factory, tmp_path, timeout=30, cap=2)
    body = b'{"request_type": "list"}'
    auth = f"Authorization: Bearer {TOKEN}\r\n"
    keep = (f"POST /cdc HTTP/1.1\r\nHost: t\r\n{auth}Content-Length: {len(body)}\r\n\r\n"
            ).encode() + body

    def ask(s: socket.socket) -> Reply:
        s.sendall(keep)
        s.settimeout(10)
        raw = b""
        while b"\r\n\r\n" not in raw or len(raw.partition(b"\r\n\r\n")[2]) < int(
                parse(raw).headers.get("content-length", "0")):
            chunk = s.recv(65536)
            assert chunk, raw
            raw += chunk
        return parse(raw)

    a, b = connect(d), connect(d)
    try:
        assert ask(a).status == 200 and ask(b).status == 200   # two kept-alive connections
        # a third is refused at once with 503, and closed
        reply = exchange(d, request("POST", "/cdc", body, auth))
        check_error(reply.status, reply.doc(), 503, "max_connections")
        assert reply.headers["retry-after"] == "1"
        # probes and scrapes are still answered, on a connection closed after the answer
        for path in ("/healthz", "/metrics"):
            reply = exchange(d, f"GET {path} HTTP/1.1\r\nHost: t\r\n{auth}\r\n".encode())
            assert reply.status == 200 and reply.headers["connection"] == "close", reply
        # the admitted connections go on working
        assert ask(a).status == 200
        b.close()
        # a closed connection frees its place
        assert wait_for(lambda: exchange(d, request("POST", "/cdc", body, auth)).status == 200,
                        10, 0.1, what="a place freed by the closed connection")
        assert ask(a).status == 200
    finally:
        a.close()
        b.close()
    assert "max_connections (2) are open" in d.log_text()


# --- a client gone mid-body --------------------------------------------------------------------

def test_client_gone_mid_body_is_not_a_bug(daemon_factory: Callable[..., Daemon],
                                           tmp_path: Path) -> None:
    d = edge_daemon(daemon_factory, tmp_path, timeout=30)
    for reset in (False, True):
        s = connect(d)
        s.sendall(HALF_BODY)
        time.sleep(0.3)
        if reset:   # RST instead of FIN
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()

    def counted() -> bool:
        return value(scrape(d), "cdcd_api_requests", "cdcd_api_requests_total",
                     request_type="invalid", code="499") == 2
    wait_for(counted, 10, 0.1, what="two requests counted as 499")
    families = scrape(d)
    codes = {s.labels["code"] for s in families["cdcd_api_requests"].samples}
    assert "500" not in codes, codes
    assert d.ok("list") == {"tasks": []}
    assert_clean_log(d)


# --- Authorization, any bytes ------------------------------------------------------------------

def test_any_authorization_bytes_are_401_with_www_authenticate(
        daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    d = edge_daemon(daemon_factory, tmp_path, extra="metrics_need_token = true\n")
    body = b'{"request_type": "list"}'
    values = [b"Bearer \xe9t\xe9",                  # latin-1
              "Bearer tök€n".encode(),              # UTF-8
              b"Bearer \xc3\x28\xff\xfe",           # invalid UTF-8
              b"\xed\xa0\x80 \xed\xb3\xbf",         # encoded surrogates as the scheme
              b"Bearer " + TOKEN.encode() + b"\xff",
              b"bearer",
              b""]
    for raw_value in values:
        head = (b"POST /cdc HTTP/1.1\r\nHost: t\r\nConnection: close\r\nAuthorization: "
                + raw_value + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n")
        reply = exchange(d, head + body)
        check_error(reply.status, reply.doc(), 401)
        assert reply.headers["www-authenticate"] == 'Bearer realm="cdcd"', reply
        # /metrics wants the token too here
        reply = exchange(d, b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
                            b"Authorization: " + raw_value + b"\r\n\r\n")
        check_error(reply.status, reply.doc(), 401)
        assert reply.headers["www-authenticate"] == 'Bearer realm="cdcd"', reply
    # the right token still works
    reply = exchange(d, request("POST", "/cdc", body, f"Authorization: Bearer {TOKEN}\r\n"))
    assert reply.status == 200 and reply.doc() == {"code": 200, "data": {"tasks": []}}
    assert TOKEN not in d.log_text()
    assert_clean_log(d)


# --- error pages ---------------------------------------------------------------------------------

def test_unknown_paths_and_wrong_methods_are_json(daemon_factory: Callable[..., Daemon],
                                                  tmp_path: Path) -> None:
    d = edge_daemon(daemon_factory, tmp_path)
    auth = f"Authorization: Bearer {TOKEN}\r\n"
    for method, path in (("GET", "/nope"), ("POST", "/cdc/"), ("GET", "/"),
                         ("POST", "/" + "x" * 3000)):
        reply = exchange(d, request(method, path, b"{}", auth))
        check_error(reply.status, reply.doc(), 404, "POST /cdc")
        assert reply.doc()["error"] == "not_found"
        assert len(reply.body) < 1000
    for method, path, allow in (("GET", "/cdc", "POST"), ("PUT", "/cdc", "POST"),
                                ("DELETE", "/healthz", "GET,HEAD"),
                                ("POST", "/metrics", "GET,HEAD")):
        reply = exchange(d, request(method, path, b"", auth))
        check_error(reply.status, reply.doc(), 405, f"{method} {path}", "use")
        assert reply.doc()["error"] == "method_not_allowed"
        assert set(reply.headers["allow"].split(",")) == set(allow.split(",")), reply
    families = scrape(d)
    assert value(families, "cdcd_api_requests", "cdcd_api_requests_total",
                 request_type="invalid", code="405") == 2       # the two on /cdc
    assert_clean_log(d)


def test_unparsable_requests_get_aiohttps_400_and_a_quiet_log(
        daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    """aiohttp answers a request it cannot parse before any cdcd code runs: 400, text/plain
    (its parser's message), connection closed. The log says so in one line, without a
    traceback or the request's bytes."""
    d = edge_daemon(daemon_factory, tmp_path)
    secret = "sekrit-in-a-broken-header"
    for raw in (b"GARBAGE\r\n\r\n",
                b"GET / HTTP/1.1 extra\r\n\r\n",
                b"GET /healthz HTTP/1.1\r\nHost: t\r\nAuthorization Bearer " + secret.encode()
                + b"\r\n\r\n",
                b"GET /healthz HTTP/1.1\r\nHost: t\r\nX: a\x01b\r\n\r\n",
                b"GET /" + b"a" * 10000 + b" HTTP/1.1\r\nHost: t\r\n\r\n",
                b"POST /cdc HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nContent-Length: 6\r\n"
                b"\r\nhello!"):
        reply = exchange(d, raw)
        assert reply.status == 400, reply
        if reply.headers.get("content-type", "").startswith("application/json"):
            check_error(reply.status, reply.doc(), 400)
    head = (b"POST /cdc HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
            b"Authorization: Bearer " + TOKEN.encode() + b"\r\n")
    # a body cdcd reads but cannot decode: the envelope's 400
    reply = exchange(d, head + b"Content-Encoding: gzip\r\nContent-Length: 10\r\n\r\n"
                            b"not gzip!!")
    check_error(reply.status, reply.doc(), 400, "body")
    # malformed chunks after a head already handed to cdcd: aiohttp queues its 400 behind
    # the request instead of failing the body, so the body read times out (408)
    with connect(d) as s:
        s.sendall(head + b"Transfer-Encoding: chunked\r\n\r\n")
        time.sleep(0.3)
        s.sendall(b"zz\r\nabc\r\n0\r\n\r\n")
        reply = parse(read_to_close(s, timeout=TIMEOUT + 8))
    check_error(reply.status, reply.doc(), 408)
    assert d.ok("list") == {"tasks": []}
    log = d.log_text()
    assert secret not in log
    assert "malformed request (BadHttpMessage)" in log
    assert_clean_log(d)


# --- a resumed scheduled task ------------------------------------------------------------------

def test_resumed_scheduled_task_waits_in_initial(daemon_factory: Callable[..., Daemon],
                                                 tmp_path: Path) -> None:
    d = edge_daemon(daemon_factory, tmp_path)
    tid = d.create(base_spec(task_id="later"))
    t = d.task(tid)
    assert (t["state"], t["phase"]) == ("Initial", "scheduled"), t
    assert d.ok("pause", {"task_id": tid}) == {"task_id": tid, "state": "Paused"}
    assert d.ok("resume", {"task_id": tid}) == {"task_id": tid, "state": "Initial"}
    t = wait_for(lambda: (lambda t: t if t["phase"] == "scheduled" else None)(d.task(tid)),
                 10, 0.1, what="phase scheduled again")
    assert t["state"] == "Initial", t
    assert d.ok("resume", {"task_id": tid}) == {"task_id": tid, "state": "Initial"}
    d.restart()
    t = d.task(tid)
    assert (t["state"], t["phase"]) == ("Initial", "scheduled"), t
    log = d.log_text()
    assert f"task {tid}: Paused -> Initial" in log
    assert f"task {tid}: Paused -> Running" not in log


# --- metrics -----------------------------------------------------------------------------------

def test_metrics_follow_prometheus_conventions(daemon_factory: Callable[..., Daemon],
                                               tmp_path: Path,
                                               servers: Callable[..., RedisServer]) -> None:
    d = edge_daemon(daemon_factory, tmp_path)
    src, dst = servers(), servers()
    tid = d.create(spec(src, dst, task_id="live", reader="psync",
                        migration_method="incremental_migration"))
    wait_for(lambda: d.task(tid)["phase"] == "incremental", 60, 0.1, what="incremental")
    c = src.client()

    def lag_measured() -> bool:
        c.incr("n")
        return d.task(tid)["progress"]["incremental"]["lag_ms"] is not None
    wait_for(lag_measured, 30, 0.2, what="lag measured")
    d.api("get", {"task_id": "missing"})

    before = d.task(tid)["progress"]["incremental"]["lag_ms"]
    families = scrape(d)
    after = d.task(tid)["progress"]["incremental"]["lag_ms"]
    for name, family in families.items():
        assert name.startswith(("cdcd_", "process_", "python_")), name
        for s in family.samples:
            assert not s.name.endswith("_created"), s.name
            if family.type == "counter":
                assert s.name == name + "_total", s.name
            assert "key" not in s.labels, s      # never a key name as a label
    # renamed or dropped for the conventions
    for gone in ("cdcd_lag_milliseconds", "cdcd_ops_per_second", "cdcd_api_request_seconds"):
        assert gone not in families, gone
    assert value(families, "cdcd_build_info", version=__version__,
                 python=platform.python_version()) == 1
    for name in ("process_cpu_seconds", "process_open_fds", "process_resident_memory_bytes",
                 "process_start_time_seconds", "python_info"):
        assert families[name].samples, name
    # lag in seconds, agreeing with the view's milliseconds
    assert families["cdcd_lag_seconds"].type == "gauge"
    lag = value(families, "cdcd_lag_seconds", task_id=tid)
    assert 0 <= lag < 10
    assert min(before, after) - 0.1 <= lag * 1000 <= max(before, after) + 0.1, \
        (before, lag, after)
    # counters for what counts, rate() for per second
    for name in ("cdcd_snapshot_keys", "cdcd_commands_applied", "cdcd_target_written_bytes",
                 "cdcd_snapshot_bytes", "cdcd_api_requests"):
        assert families[name].type == "counter", name
    assert value(families, "cdcd_commands_applied", "cdcd_commands_applied_total",
                 task_id=tid) >= 1
    assert families["cdcd_api_request_duration_seconds"].type == "histogram"
    assert value(families, "cdcd_api_requests", "cdcd_api_requests_total",
                 request_type="get", code="404") == 1
    # bounded labels: one task_id per task, one state per known state
    assert {s.labels["state"] for s in families["cdcd_task_state"].samples} == \
        {"Initial", "Running", "Paused", "Failed", "Succeeded"}
    assert {s.labels["task_id"] for s in families["cdcd_task_state"].samples} == {tid}
