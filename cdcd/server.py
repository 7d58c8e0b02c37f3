"""The HTTP API: POST /cdc with the request envelope, GET /healthz, GET /metrics.

Errors become envelope codes here and nowhere else, including the HTTP layer's own: a body
that does not arrive in time (408), the connection cap (503), unknown paths and methods
(404, 405). Only a request aiohttp cannot parse at all gets aiohttp's plain-text 400.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler as WebHandler
from aiohttp.web_protocol import RequestHandler

from .config import Config
from .errors import (
    AuthError,
    CdcdError,
    PayloadTooLarge,
    RequestError,
    RequestTimeout,
    StoreError,
    TooManyConnections,
)
from .manager import Manager
from .metrics import Metrics
from .precheck import failed, run_prechecks
from .spec import parse_spec
from .store import Store
from .tasksfile import Declared, reconcile

log = logging.getLogger("cdcd.server")

MANAGER: web.AppKey[Manager] = web.AppKey("manager", Manager)
CONFIG: web.AppKey[Config] = web.AppKey("config", Config)
METRICS: web.AppKey[Metrics] = web.AppKey("metrics", Metrics)

Handler = Callable[[Manager, dict[str, Any]], Awaitable[dict[str, Any]]]


@dataclasses.dataclass(kw_only=True)
class Shutdown:
    """How the daemon's stop went, for ``cdcd serve``'s exit status (aiohttp only logs an
    error raised while cleaning up, so the lifecycle records it here)."""

    store_error: str = ""   # the final metadata write failed: why


SHUTDOWN: web.AppKey[Shutdown] = web.AppKey("shutdown", Shutdown)


@dataclasses.dataclass(kw_only=True)
class Readiness:
    """What ``GET /readyz`` needs to know beyond the store's health: whether the stored
    tasks are loaded and the tasks file reconciled (and how)."""

    loaded: bool = False                     # store open, stored tasks loaded
    tasks_file: str = ""                     # the tasks setting ("" = none)
    declared: list[Declared] = dataclasses.field(default_factory=list)
    results: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    reconciled: bool = False
    reconciler: asyncio.Task[None] | None = None


READINESS: web.AppKey[Readiness] = web.AppKey("readiness", Readiness)


class ClientGone(Exception):
    """The client closed its connection before its request body arrived (nobody to answer;
    counted as code 499, nginx's "client closed request")."""


def _reply(code: int, body: dict[str, Any]) -> web.Response:
    return web.Response(status=code, body=orjson.dumps(body), content_type="application/json")


def error_reply(exc: CdcdError) -> web.Response:
    response = _reply(exc.code, {"code": exc.code, "error": exc.error, "message": exc.message})
    if exc.code == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="cdcd"'
    return response


async def answer_and_close(request: web.Request, response: web.Response) -> web.Response:
    """Send ``response`` now and close the socket right after it, instead of letting aiohttp
    linger up to 10 s reading the rest of a body nobody will handle (a client too slow to
    send its body, or one over the connection cap)."""
    response.force_close()
    try:
        await response.prepare(request)
        await response.write_eof()
    except ConnectionError:
        pass   # the client is gone already
    request.protocol.force_close()
    return response


class Connections:
    """The connection cap: count the open connections that have sent a request (handling
    it, or idle between keep-alive requests) and refuse a new one over ``limit``.

    aiohttp has no cap of its own and admits a connection before anything is known about
    it, so a connection is counted at its first request; one that never completes a request
    head is closed by the keep-alive timer (``body_read_timeout_s``).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.rejected = 0
        self._open: set[RequestHandler] = set()
        self._warned_at = -math.inf

    def admit(self, protocol: RequestHandler) -> bool:
        """Count the connection if it is new; False when the cap is reached."""
        if protocol in self._open:
            return True
        if len(self._open) >= self.limit:
            self._forget_closed()
            if len(self._open) >= self.limit:
                return False
        self._open.add(protocol)
        return True

    def reject(self) -> None:
        """Count a refused connection; say so in the log at most once a minute."""
        self.rejected += 1
        now = time.monotonic()
        if now - self._warned_at >= 60:
            self._warned_at = now
            log.warning("max_connections (%d) are open: new connections are answered 503 "
                        "(%d so far)", self.limit, self.rejected)

    def count(self) -> int:
        self._forget_closed()
        return len(self._open)

    def _forget_closed(self) -> None:
        self._open = {p for p in self._open
                      if p.transport is not None and not p.transport.is_closing()}


CONNECTIONS: web.AppKey[Connections] = web.AppKey("connections", Connections)
# Answered even at the cap (probes and scrapes matter most when the daemon is busy), on a
# connection that is then closed: they never hold a socket beyond their answer.
PROBES = frozenset({"/healthz", "/readyz", "/metrics"})
HTTP_ERRORS = {404: "not_found", 405: "method_not_allowed"}


def http_error_reply(request: web.Request, exc: web.HTTPException) -> web.Response:
    """The envelope for an error aiohttp's router raises (unknown path, wrong method)."""
    path = request.path if len(request.path) <= 200 else request.path[:200] + "..."
    if exc.status == 404:
        routes = sorted({f"{r.method} {r.resource.canonical}" for r in request.app.router.routes()
                         if r.resource is not None and r.method != "HEAD"})
        message = f"no such path {path}; the API answers " + ", ".join(routes)
    elif exc.status == 405:
        message = (f"{request.method} {path}: method not allowed; use "
                   f"{exc.headers.get('Allow', '')}")
    else:
        message = f"{exc.status} {exc.reason}"
    error = HTTP_ERRORS.get(exc.status) or "_".join(exc.reason.lower().split()) or "http_error"
    response = _reply(exc.status, {"code": exc.status, "error": error, "message": message})
    if "Allow" in exc.headers:
        response.headers["Allow"] = exc.headers["Allow"]
    return response


@web.middleware
async def http_edges(request: web.Request, handler: WebHandler) -> web.StreamResponse:
    """The connection cap, and the envelope for every error page (404, 405, a bug's 500)."""
    connections = request.app[CONNECTIONS]
    admitted = connections.admit(request.protocol)
    if not admitted and not (request.method in ("GET", "HEAD") and request.path in PROBES):
        connections.reject()
        response = error_reply(TooManyConnections(
            f"{connections.limit} connections are open (max_connections); retry later"))
        response.headers["Retry-After"] = "1"
        _count_cdc(request, 503)
        return await answer_and_close(request, response)
    answer: web.StreamResponse
    try:
        answer = await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        answer = http_error_reply(request, exc)
        _count_cdc(request, answer.status)
    except Exception as exc:
        log.exception("bug while handling %s %s", request.method, request.path)
        answer = error_reply(CdcdError(f"internal error while handling {request.method} "
                                       f"{request.path}: {type(exc).__name__}"))
        _count_cdc(request, answer.status)
    if not admitted:
        answer.force_close()
    return answer


def _count_cdc(request: web.Request, status: int) -> None:
    """Count an answer the middleware gave on /cdc (handle_cdc counts its own)."""
    metrics = request.app.get(METRICS)
    if metrics is not None and request.path == "/cdc":
        metrics.observe_request("invalid", status, 0.0)


class HttpLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """aiohttp's protocol logger. A malformed request (a bad request line or header that
    aiohttp answers 400 itself, a body it cannot decode while discarding it after our
    answer) is the client's fault: one line at INFO, without a traceback or the offending
    bytes (they may hold a token). Anything else is logged as aiohttp logs it."""

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info")
        if isinstance(exc, (HttpProcessingError, web.RequestPayloadError)):
            text = str(msg) % args if args else str(msg)
            super().log(min(level, logging.INFO), "%s: malformed request (%s)", text,
                        type(exc).__name__)
            return
        super().log(level, msg, *args, **kwargs)


def _fields(data: dict[str, Any], allowed: set[str]) -> None:
    for key in data:
        if key not in allowed:
            raise RequestError(f"request_data.{key}: unknown field")


async def op_create(m: Manager, data: dict[str, Any]) -> dict[str, Any]:
    task = await m.create(data)
    return {"task_id": task.spec.task_id}


async def op_list(m: Manager, data: dict[str, Any]) -> dict[str, Any]:
    _fields(data, {"state"})
    state = data.get("state")
    if state is not None and not isinstance(state, str):
        raise RequestError("request_data.state: must be a string")
    return {"tasks": [t.view() for t in m.list(state)]}


def _task_or_verification(data: dict[str, Any]) -> str:
    """Say which of task_id / verification_id a get or delete names (exactly one)."""
    if "task_id" in data and "verification_id" in data:
        raise RequestError("request_data.verification_id: give task_id or verification_id, "
                           "not both")
    return "verification_id" if "verification_id" in data else "task_id"


async def op_get(m: Manager, data: dict[str, Any]) -> dict[str, Any]:
    _fields(data, {"task_id", "verification_id"})
    if _task_or_verification(data) == "verification_id":
        return {"verification": m.verifications.get(data["verification_id"]).view()}
    if "task_id" not in data:
        raise RequestError("request_data.task_id: required (a string), or "
                           "request_data.verification_id")
    return {"task": m.get(data.get("task_id")).view()}


async def op_pause(m: Manager, data: dict[str, Any]) -> dict[str, Any]:
    _fields(data, {"task_id"})
    task = await m.pause(data.get("task_id"))
    return {"task_id": task.spec.task_id, "state": task.state.value}


async def op_resume(m: Manager, data: dict[str, Any]) -> dict[str, Any]:
    _fields(data, {"task_id"})
    task = await m.resume(data.get("task_id"))
    return {"task_id": task.spec.task_id, "state": task.state.value}


async def op_delete(m: Manager, data: dict[str, Any]) -> dict[str, Any]:
    _fields(data, {"task_id", "verification_id", "ignore_not_found", "purge_markers"})
    ignore = data.get("ignore_not_found", False)
    if not isinstance(ignore, bool):
        raise RequestError("request_data.ignore_not_found: must be a boolean")
    purge = data.get("purge_markers", False)
    if not isinstance(purge, bool):
        raise RequestError("request_data.purge_markers: must be a boolean")
    if _task_or_verification(data) == "verification_id":
        if purge:
            raise RequestError("request_data.purge_markers: only with task_id")
        vid = await m.verifications.delete(data["verification_id"], ignore)
        return {"verification_id": vid}
    return {"task_id": await m.delete(data.get("task_id"), ignore, purge_markers=purge)}


async def op_update(m: Manager, data: dict[str, Any]) -> dict[str, Any]:
    task = await m.update(data)
    return {"task_id": task.spec.task_id, "state": task.state.value,
            "spec": task.spec.to_json(mask=True)}


async def op_resync(m: Manager, data: dict[str, Any]) -> dict[str, Any]:
    _fields(data, {"task_id"})
    task = await m.resync(data.get("task_id"))
    return {"task_id": task.spec.task_id, "state": task.state.value}


async def op_precheck(m: Manager, data: dict[str, Any]) -> dict[str, Any]:
    """Run a task's prechecks for a spec without creating the task; failing checks are
    the answer (HTTP 200), only an invalid spec is an error."""
    spec = parse_spec(data)
    checks = await run_prechecks(spec, fresh=True)
    return {"checks": [c.to_json() for c in checks], "ok": not failed(checks)}


async def op_verify(m: Manager, data: dict[str, Any]) -> dict[str, Any]:
    return {"verification_id": m.verify(data).id}


OPERATIONS: dict[str, Handler] = {
    "create": op_create, "list": op_list, "get": op_get,
    "pause": op_pause, "resume": op_resume, "delete": op_delete,
    "precheck": op_precheck, "verify": op_verify, "resync": op_resync,
    "update": op_update,
}


def check_token(request: web.Request, token: str) -> None:
    if not token:
        return
    given = request.headers.get("Authorization", "")
    scheme, _, value = given.partition(" ")
    # Header values are str decoded with surrogateescape (any bytes: latin-1, invalid
    # UTF-8); surrogatepass encodes every str, both sides alike.
    if scheme.lower() != "bearer" or not hmac.compare_digest(
            value.strip().encode("utf-8", "surrogatepass"),
            token.encode("utf-8", "surrogatepass")):
        raise AuthError("missing or wrong bearer token (Authorization: Bearer <token>)")


async def handle_cdc(request: web.Request) -> web.Response:
    app = request.app
    metrics = app[METRICS]
    started = time.perf_counter()
    request_type = "invalid"
    close_now = False
    try:
        check_token(request, app[TOKEN])
        limit = app[CONFIG].max_body_bytes
        too_large = PayloadTooLarge(f"request body is larger than {limit} bytes")
        # refuse a declared oversize body at once, without waiting for it to arrive
        if request.content_length is not None and request.content_length > limit:
            raise too_large
        timeout = float(app[CONFIG].body_read_timeout_s)
        try:
            async with asyncio.timeout(timeout):
                body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise too_large from None
        except TimeoutError:
            raise RequestTimeout(f"the request body did not arrive within {timeout:g} s "
                                 f"(body_read_timeout_s)") from None
        except ConnectionError:
            raise ClientGone() from None
        except web.RequestPayloadError:
            raise RequestError("body: cannot be decoded (Content-Encoding, chunks)") from None
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise RequestError("body is not valid JSON") from None
        if not isinstance(doc, dict):
            raise RequestError("body must be a JSON object")
        for key in doc:
            if key not in ("request_type", "request_data"):
                raise RequestError(f"{key}: unknown field")
        rt = doc.get("request_type")
        if not isinstance(rt, str):
            raise RequestError("request_type: required (a string)")
        op = OPERATIONS.get(rt)
        if op is None:
            raise RequestError(f"request_type: unknown value {rt!r}; use one of "
                               + ", ".join(OPERATIONS))
        request_type = rt
        data = doc.get("request_data", {})
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise RequestError("request_data: must be an object")
        result = await op(app[MANAGER], data)
        response = _reply(200, {"code": 200, "data": result})
    except PayloadTooLarge as exc:
        response = error_reply(exc)
        response.force_close()  # the rest of the body is never read
    except RequestTimeout as exc:
        response = error_reply(exc)
        close_now = True
    except ClientGone:
        log.debug("a client closed its connection before sending its whole request body")
        response = _reply(499, {"code": 499, "error": "client_closed_request",
                                "message": "the client closed the connection"})
        response.force_close()
    except CdcdError as exc:
        response = error_reply(exc)
    except Exception as exc:
        log.exception("bug while handling a %s request", request_type)
        response = error_reply(CdcdError(f"internal error while handling {request_type}: "
                                         f"{type(exc).__name__}"))
    metrics.observe_request(request_type, response.status, time.perf_counter() - started)
    if close_now:
        return await answer_and_close(request, response)
    return response


async def handle_health(request: web.Request) -> web.Response:
    return _reply(200, {"code": 200, "data": {"status": "ok"}})


async def handle_readyz(request: web.Request) -> web.Response:
    """200 once the stored tasks are loaded, the tasks file reconciled and the store
    writable; 503 naming what is not. The reconciliation results are shown to a caller
    with the token (or when none is set); the status needs none, like /healthz."""
    app = request.app
    ready = app[READINESS]
    manager = app.get(MANAGER)
    store = manager.store if manager is not None and ready.loaded else None
    problems = []
    if store is None:
        problems.append("the metadata store is not open and the stored tasks not loaded yet")
    elif not store.healthy:
        problems.append(f"the metadata store cannot be written: {store.last_error}")
    if not ready.reconciled:
        problems.append(f"tasks file {ready.tasks_file} not reconciled yet "
                        f"({len(ready.results)} of {len(ready.declared)} specs done)")
    if problems:
        return _reply(503, {"code": 503, "error": "not_ready",
                            "message": "not ready: " + "; ".join(problems)})
    assert manager is not None
    data: dict[str, Any] = {"status": "ready", "tasks": len(manager.tasks),
                            "store": {"path": str(manager.store.path), "writable": True}}
    try:
        check_token(request, app[TOKEN])
    except AuthError:
        return _reply(200, {"code": 200, "data": data})
    data["tasks_file"] = {"path": ready.tasks_file or None, "results": ready.results}
    return _reply(200, {"code": 200, "data": data})


async def start_reconciliation(app: web.Application) -> None:
    """Create the tasks file's specs in the background (``cdcd serve`` calls this once the
    socket is bound; the lifecycle's cleanup cancels and awaits it)."""
    ready = app[READINESS]
    if ready.reconciled or ready.reconciler is not None:
        return

    async def run() -> None:
        try:
            await reconcile(app[MANAGER], ready.declared, ready.results)
        except Exception:
            log.exception("tasks file %s: reconciliation failed", ready.tasks_file)
            raise
        ready.reconciled = True

    ready.reconciler = asyncio.create_task(run(), name="cdcd-tasks-file")


async def handle_metrics(request: web.Request) -> web.Response:
    app = request.app
    if app[CONFIG].metrics_need_token:
        try:
            check_token(request, app[TOKEN])
        except AuthError as exc:
            return error_reply(exc)
    app[METRICS].observe_connections(app[CONNECTIONS].count(), app[CONNECTIONS].rejected)
    body, content_type = app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": content_type})


TOKEN: web.AppKey[str] = web.AppKey("token", str)


def make_app(cfg: Config, declared: list[Declared] | None = None) -> web.Application:
    """The daemon's app; ``declared`` are the tasks file's specs (already validated),
    created once ``start_reconciliation`` is called."""
    client_timeout = float(cfg.body_read_timeout_s)
    app = web.Application(
        client_max_size=cfg.max_body_bytes, middlewares=[http_edges],
        # keepalive_timeout also closes a connection that sends no complete request head
        handler_args={"keepalive_timeout": client_timeout,
                      "logger": HttpLog(logging.getLogger("cdcd.http"))})
    app[CONFIG] = cfg
    app[TOKEN] = cfg.token()
    app[SHUTDOWN] = Shutdown()
    app[CONNECTIONS] = Connections(cfg.max_connections)
    app[READINESS] = ready = Readiness(tasks_file=cfg.tasks, declared=declared or [],
                                       reconciled=not declared)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        manager = Manager(Store(cfg.data_dir), max_tasks=cfg.max_tasks)
        app[MANAGER] = manager
        app[METRICS] = Metrics(manager)
        await manager.start()
        ready.loaded = True
        yield
        ready.loaded = False
        if ready.reconciler is not None:
            ready.reconciler.cancel()
            # gather: our own cancellation still propagates, the task's is its result
            await asyncio.gather(ready.reconciler, return_exceptions=True)
        try:
            await manager.stop()
        except StoreError as exc:   # every task is stopped; only the final write failed
            app[SHUTDOWN].store_error = exc.message

    app.cleanup_ctx.append(lifecycle)
    app.router.add_post("/cdc", handle_cdc)
    app.router.add_get("/healthz", handle_health)
    app.router.add_get("/readyz", handle_readyz)
    app.router.add_get("/metrics", handle_metrics)
    return app
