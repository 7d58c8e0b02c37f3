"""Run the real daemon (``python -m cdcd serve``) as a subprocess and talk to its API."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from .servers import RedisServer, free_port, wait_for


def endpoint(server: RedisServer | str, **kw: Any) -> dict[str, Any]:
    """The source/target part of a spec for a test server (or a bare "host:port")."""
    if isinstance(server, str):
        return {"addrs": server, **kw}
    out: dict[str, Any] = {"addrs": server.addr}
    if server.password:
        out["password"] = server.password
    out.update(kw)
    return out


def spec(source: RedisServer | str, target: RedisServer | str, **kw: Any) -> dict[str, Any]:
    """A create request_data for a full SCAN copy between two servers; kw overrides."""
    return {"source": endpoint(source), "target": endpoint(target),
            "migration_method": "full_amount_migration", "reader": "scan", **kw}


class Daemon:
    def __init__(self, data_dir: Path, *, token: str = "", extra: list[str] | None = None,
                 env: dict[str, str] | None = None, flags: bool = True) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.token = token
        self.extra = extra or []
        self.env = env or {}   # added to the daemon's environment
        # False: no --port/--data-dir flags (they come from env or a config file; set
        # .port to the port the daemon will listen on)
        self.flags = flags
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = data_dir.parent / f"daemon-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Daemon:
        env = dict(os.environ)
        if self.token:
            env["CDCD_AUTH_TOKEN"] = self.token
        env.update(self.env)
        logf = open(self.log, "ab")
        flags = ["--port", str(self.port), "--data-dir", str(self.data_dir)] if self.flags \
            else []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cdcd", "serve", *flags, *self.extra],
            stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=self.data_dir.parent)
        logf.close()
        wait_for(self._healthy, 20, what=f"daemon on {self.port} (log {self.log})")
        return self

    def _healthy(self) -> bool:
        if self.proc and self.proc.poll() is not None:
            raise AssertionError(f"daemon exited: {self.log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(self.url + "/healthz", timeout=2) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def get(self, path: str) -> tuple[int, Any]:
        """GET ``path`` (e.g. /readyz): the status and the JSON body."""
        hdrs = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        req = urllib.request.Request(self.url + path, headers=hdrs)
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def ready(self) -> tuple[int, Any]:
        """GET /readyz: (200, body) when ready, (503, body) otherwise."""
        return self.get("/readyz")

    def wait_ready(self, timeout: float = 30) -> dict[str, Any]:
        """Wait until /readyz answers 200; return its data."""
        def ready() -> dict[str, Any] | None:
            code, doc = self.ready()
            return dict(doc["data"]) if code == 200 else None
        return dict(wait_for(ready, timeout, 0.1, what=f"daemon on {self.port} ready"))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self) -> None:
        self.stop()
        self.start()

    def request(self, body: bytes, headers: dict[str, str] | None = None,
                path: str = "/cdc") -> tuple[int, Any]:
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        if self.token and "Authorization" not in hdrs:
            hdrs["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(self.url + path, data=body, method="POST", headers=hdrs)
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def api(self, request_type: str, data: dict[str, Any] | None = None) -> tuple[int, Any]:
        return self.request(json.dumps({"request_type": request_type,
                                        "request_data": data or {}}).encode())

    def ok(self, request_type: str, data: dict[str, Any] | None = None) -> Any:
        code, doc = self.api(request_type, data)
        assert code == 200, (code, doc)
        return doc["data"]

    def create(self, data: dict[str, Any]) -> str:
        return str(self.ok("create", data)["task_id"])

    def store(self) -> dict[str, Any]:
        """The daemon's JSON store as it is on disk now."""
        return dict(json.loads((self.data_dir / "cdcd.json").read_bytes()))

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def task(self, task_id: str) -> dict[str, Any]:
        return dict(self.ok("get", {"task_id": task_id})["task"])

    def wait_state(self, task_id: str, *states: str, timeout: float = 60) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            t = self.task(task_id)
            if t["state"] in states:
                return t
            if t["state"] == "Failed" and "Failed" not in states:
                raise AssertionError(f"task {task_id} failed: {t['reason']}")
            return None
        return dict(wait_for(reached, timeout, 0.1, what=f"task {task_id} in {states}"))


def run_serve(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
              timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run ``cdcd serve ARGS`` that is expected to exit by itself (a refused start), with
    no CDCD_* variable but those of ``env``."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("CDCD_")}
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "cdcd", "serve", *args], env=full, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)
