"""The HTTP API: POST /cdc with the request envelope, GET /healthz, GET /metrics.

Errors become envelope codes here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from .config import Config
from .errors import AuthError, CdcdError, PayloadTooLarge, RequestError, StoreError
from .manager import Manager
from .metrics import Metrics
from .precheck import failed, run_prechecks
from .spec import parse_spec
from .store import Store

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


def _reply(code: int, body: dict[str, Any]) -> web.Response:
    return web.Response(status=code, body=orjson.dumps(body), content_type="application/json")


def error_reply(exc: CdcdError) -> web.Response:
    return _reply(exc.code, {"code": exc.code, "error": exc.error, "message": exc.message})


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
    _fields(data, {"task_id", "verification_id", "ignore_not_found"})
    ignore = data.get("ignore_not_found", False)
    if not isinstance(ignore, bool):
        raise RequestError("request_data.ignore_not_found: must be a boolean")
    if _task_or_verification(data) == "verification_id":
        vid = await m.verifications.delete(data["verification_id"], ignore)
        return {"verification_id": vid}
    return {"task_id": await m.delete(data.get("task_id"), ignore)}


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
}


def check_token(request: web.Request, token: str) -> None:
    if not token:
        return
    given = request.headers.get("Authorization", "")
    scheme, _, value = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(),
                                                              token.encode()):
        raise AuthError("missing or wrong bearer token (Authorization: Bearer <token>)")


async def handle_cdc(request: web.Request) -> web.Response:
    app = request.app
    metrics = app[METRICS]
    started = time.perf_counter()
    request_type = "invalid"
    try:
        check_token(request, app[TOKEN])
        limit = app[CONFIG].max_body_bytes
        too_large = PayloadTooLarge(f"request body is larger than {limit} bytes")
        # refuse a declared oversize body at once, without waiting for it to arrive
        if request.content_length is not None and request.content_length > limit:
            raise too_large
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise too_large from None
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
    except CdcdError as exc:
        response = error_reply(exc)
    except Exception as exc:
        log.exception("bug while handling a %s request", request_type)
        response = error_reply(CdcdError(f"internal error while handling {request_type}: "
                                         f"{type(exc).__name__}"))
    metrics.observe_request(request_type, response.status, time.perf_counter() - started)
    return response


async def handle_health(request: web.Request) -> web.Response:
    return _reply(200, {"code": 200, "data": {"status": "ok"}})


async def handle_metrics(request: web.Request) -> web.Response:
    app = request.app
    if app[CONFIG].metrics_need_token:
        try:
            check_token(request, app[TOKEN])
        except AuthError as exc:
            return error_reply(exc)
    body, content_type = app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": content_type})


TOKEN: web.AppKey[str] = web.AppKey("token", str)


def make_app(cfg: Config) -> web.Application:
    app = web.Application(client_max_size=cfg.max_body_bytes)
    app[CONFIG] = cfg
    app[TOKEN] = cfg.token()
    app[SHUTDOWN] = Shutdown()

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        manager = Manager(Store(cfg.data_dir), max_tasks=cfg.max_tasks)
        app[MANAGER] = manager
        app[METRICS] = Metrics(manager)
        await manager.start()
        yield
        try:
            await manager.stop()
        except StoreError as exc:   # every task is stopped; only the final write failed
            app[SHUTDOWN].store_error = exc.message

    app.cleanup_ctx.append(lifecycle)
    app.router.add_post("/cdc", handle_cdc)
    app.router.add_get("/healthz", handle_health)
    app.router.add_get("/metrics", handle_metrics)
    return app
