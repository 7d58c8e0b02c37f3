"""Daemon settings from flags, CDCD_* variables and the config file (in that order), bad
values refused naming the setting and its origin, absolute paths logged, "listening" only
once bound, and the refusal to serve a non-loopback address without a token."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from cdcd.config import SETTINGS, Config, ConfigError, is_loopback, load, settings_table

from .daemon import Daemon, run_serve
from .servers import free_port, wait_for

DEAD = {"source": {"addrs": "127.0.0.1:1"}, "start_at": "2099-01-01T00:00:00Z"}
_dead_targets = iter(range(2, 1000))


def waiting(task_id: str) -> dict[str, object]:
    """A spec that waits for start_at: creating it touches no server."""
    return {"task_id": task_id, **DEAD, "target": {"addrs": f"127.0.0.1:{next(_dead_targets)}"}}


@pytest.fixture
def started() -> Iterator[list[Daemon]]:
    """Daemons a test starts, stopped (SIGTERM, exit status 0) after it."""
    made: list[Daemon] = []
    yield made
    for d in made:
        if d.proc is not None and d.proc.poll() is None:
            assert d.stop() == 0, d.log_text()[-2000:]


def start(started: list[Daemon], data_dir: Path, port: int, **kw: object) -> Daemon:
    d = Daemon(data_dir, flags=False, **kw)  # type: ignore[arg-type]
    d.port = port
    started.append(d)
    return d.start()


def setting_lines(d: Daemon) -> str:
    m = re.search(r"settings not at their default: (.*)", d.log_text())
    return m.group(1) if m else ""


# --- in-process: the merge itself -------------------------------------------------------

def test_precedence_flag_over_env_over_file(tmp_path: Path) -> None:
    file = tmp_path / "c.toml"
    file.write_text('[daemon]\nport = 1111\nmax_tasks = 5\nlog_level = "debug"\n'
                    'data_dir = "d-file"\nmetrics_need_token = true\n')
    env = {"CDCD_CONFIG": str(file), "CDCD_PORT": "2222", "CDCD_MAX_TASKS": "6",
           "CDCD_METRICS_NEED_TOKEN": "no"}
    cfg = load({"port": "3333"}, env)
    assert cfg.port == 3333 and cfg.origin("port") == "--port"
    assert cfg.max_tasks == 6 and cfg.origin("max_tasks") == "CDCD_MAX_TASKS"
    assert cfg.metrics_need_token is False
    assert cfg.log_level == "DEBUG" and cfg.origin("log_level") == f"{file}: log_level"
    assert cfg.data_dir == str(Path.cwd() / "d-file")
    assert cfg.config == str(file)
    assert cfg.host == "127.0.0.1" and cfg.origin("host") == "default"
    assert cfg.body_read_timeout_s == 30 and cfg.max_connections == 256
    # an empty variable counts as unset
    assert load({}, {"CDCD_PORT": ""}).port == 8444


def test_bool_words() -> None:
    for word, value in (("true", True), ("YES", True), ("1", True), ("false", False),
                        ("No", False), ("0", False)):
        assert load({}, {"CDCD_INSECURE_BIND": word}).insecure_bind is value
    with pytest.raises(ConfigError, match=r"CDCD_INSECURE_BIND: must be a boolean .*'on'"):
        load({}, {"CDCD_INSECURE_BIND": "on"})


def test_token_from_the_stronger_place(tmp_path: Path) -> None:
    tok = tmp_path / "tok"
    tok.write_text("from-file\n")
    assert load({}, {"CDCD_AUTH_TOKEN": "from-env"}).token() == "from-env"
    assert load({"auth_token_file": str(tok)}, {"CDCD_AUTH_TOKEN": "env"}).token() == "from-file"
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text(f'auth_token_file = "{tok}"\n')
    assert load({"config": str(cfg_file)}, {"CDCD_AUTH_TOKEN": "env"}).token() == "env"
    cfg_file.write_text(f'auth_token = "x"\nauth_token_file = "{tok}"\n')
    with pytest.raises(ConfigError, match="not both"):
        load({"config": str(cfg_file)}, {})
    # an in-process Config (the tests' make_app) keeps working without origins
    assert Config(auth_token="t").token() == "t"


def test_is_loopback() -> None:
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost", "LOCALHOST", "[::1]",
                 "::ffff:127.0.0.1"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "10.0.0.1", "192.168.1.1", "example.com", "localhost.com"):
        assert not is_loopback(host), host


def test_every_setting_is_documented() -> None:
    fields = set(Config.__dataclass_fields__) - {"origins", "ranks", "warnings"}
    assert {s.name for s in SETTINGS} == fields
    table = settings_table()
    toml = (Path(__file__).parent.parent / "config" / "cdcd.toml").read_text()
    for s in SETTINGS:
        assert f"`{s.env}`" in table and s.range in table
        assert s.env in toml, f"{s.name} is not in config/cdcd.toml"


# --- the real daemon --------------------------------------------------------------------

def test_flag_env_file_precedence_in_the_daemon(tmp_path: Path, started: list[Daemon]) -> None:
    p_file, p_env, p_flag = free_port(), free_port(), free_port()
    file = tmp_path / "cdcd.toml"
    file.write_text(f'[daemon]\nport = {p_file}\nmax_tasks = 1\ndata_dir = "from-file"\n')
    env = {"CDCD_CONFIG": str(file)}

    # the file alone
    d = start(started, tmp_path / "from-file", p_file, env=env)
    d.ok("create", waiting("one"))
    code, doc = d.api("create", waiting("two"))
    assert code == 409 and "max_tasks" in doc["message"], doc
    assert "port (" + str(file) + ": port)" in setting_lines(d)
    assert d.stop() == 0

    # the environment over the file
    env.update({"CDCD_PORT": str(p_env), "CDCD_MAX_TASKS": "3",
                "CDCD_DATA_DIR": str(tmp_path / "from-env")})
    d = start(started, tmp_path / "from-env", p_env, env=env)
    for tid in ("a", "b", "c"):
        d.ok("create", waiting(tid))
    assert d.api("create", waiting("d"))[0] == 409
    lines = setting_lines(d)
    assert "port (CDCD_PORT)" in lines and "max_tasks (CDCD_MAX_TASKS)" in lines, lines
    assert d.stop() == 0

    # flags over both
    d = start(started, tmp_path / "from-flags", p_flag, env=env,
              extra=["--port", str(p_flag), "--data-dir", str(tmp_path / "from-flags"),
                     "--max-tasks", "2"])
    d.ok("create", waiting("x"))
    d.ok("create", waiting("y"))
    assert d.api("create", waiting("z"))[0] == 409
    assert "port (--port)" in setting_lines(d) and "max_tasks (--max-tasks)" in setting_lines(d)
    assert {t["task_id"] for t in d.ok("list")["tasks"]} == {"x", "y"}
    assert d.stop() == 0


@pytest.mark.parametrize("args,env,file,needle", [
    ([], {"CDCD_PORT": "abc"}, None, "CDCD_PORT: must be an integer 0..65535, got 'abc'"),
    (["--port", "70000"], {}, None, "--port: must be an integer 0..65535, got 70000"),
    ([], {"CDCD_MAX_BODY_BYTES": "0"}, None,
     "CDCD_MAX_BODY_BYTES: must be an integer 1..1073741824, got 0"),
    ([], {"CDCD_MAX_TASKS": "-1"}, None, "CDCD_MAX_TASKS: must be an integer 1..100000"),
    ([], {"CDCD_BODY_READ_TIMEOUT_S": "0"}, None, "CDCD_BODY_READ_TIMEOUT_S: must be an "
                                                  "integer 1..3600, got 0"),
    ([], {"CDCD_MAX_CONNECTIONS": "1.5"}, None, "CDCD_MAX_CONNECTIONS: must be an integer "
                                                "1..65535, got '1.5'"),
    ([], {"CDCD_METRICS_NEED_TOKEN": "maybe"}, None, "CDCD_METRICS_NEED_TOKEN: must be a "
                                                     "boolean"),
    ([], {"CDCD_LOG_FORMAT": "xml"}, None, "CDCD_LOG_FORMAT: must be one of text, json"),
    ([], {"CDCD_RDB_PROCESSES": "-2"}, None, "CDCD_RDB_PROCESSES: must be an integer "
                                             "-1..256, got -2"),
    (["--rdb-processes", "many"], {}, None, "--rdb-processes: must be an integer -1..256"),
    (["--log-level", "loud"], {}, None, "--log-level: must be one of DEBUG, INFO"),
    ([], {}, "max_tasks = 0\n", "max_tasks: must be an integer 1..100000, got 0"),
    ([], {}, 'port = "80"\n', "port: must be an integer 0..65535, got '80'"),
    ([], {}, "max_taks = 3\n", "unknown setting 'max_taks'; did you mean max_tasks?"),
    ([], {}, 'config = "x.toml"\n', "unknown setting 'config'"),
    ([], {}, 'data_dir = ""\n', "data_dir: must not be empty"),
    ([], {}, "[daemon.extra]\nx = 1\n", "unknown setting 'extra'"),
    ([], {"CDCD_CONFIG": "/nonexistent/cdcd.toml"}, None,
     "CDCD_CONFIG: config file /nonexistent/cdcd.toml does not exist"),
    ([], {"CDCD_AUTH_TOKEN_FILE": "/nonexistent/token"}, None,
     "CDCD_AUTH_TOKEN_FILE: cannot read the token file /nonexistent/token"),
    ([], {"CDCD_TASKS": "/nonexistent/tasks.json"}, None,
     "tasks /nonexistent/tasks.json: no such file or directory"),
])
def test_bad_values_are_refused_naming_the_setting(tmp_path: Path, args: list[str],
                                                   env: dict[str, str], file: str | None,
                                                   needle: str) -> None:
    if file is not None:
        (tmp_path / "c.toml").write_text("[daemon]\n" + file)
        args = [*args, "--config", str(tmp_path / "c.toml")]
    env = {"CDCD_DATA_DIR": str(tmp_path / "data"), **env}
    r = run_serve(*args, env=env, cwd=tmp_path)
    assert r.returncode == 2, r
    assert needle in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert "listening on" not in r.stderr
    assert not (tmp_path / "data").exists()   # refused before touching anything


def test_empty_token_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "tok").write_text("  \n")
    r = run_serve("--auth-token-file", str(tmp_path / "tok"), cwd=tmp_path)
    assert r.returncode == 2 and f"--auth-token-file: the token file {tmp_path / 'tok'} is " \
        "empty" in r.stderr, r


def test_paths_are_absolute_and_logged(tmp_path: Path, started: list[Daemon]) -> None:
    """The defaults (./data, config/cdcd.toml) are relative to where serve runs; the log
    says which absolute paths they are. An unknown CDCD_* variable is warned about."""
    work = tmp_path / "work"
    (work / "config").mkdir(parents=True)
    port = free_port()
    (work / "config" / "cdcd.toml").write_text(f"[daemon]\nport = {port}\n")
    d = start(started, work / "data", port, env={"CDCD_DATADIR": "/elsewhere"})
    log = d.log_text()
    assert f"data dir {work / 'data'}, config {work / 'config' / 'cdcd.toml'}" in log, log
    assert "CDCD_DATADIR is not a cdcd setting and is ignored; did you mean CDCD_DATA_DIR?" \
        in log, log
    assert d.ok("list") == {"tasks": []}
    assert d.stop() == 0
    log = d.log_text()
    assert re.search(r"stopping: 0 task\(s\), 0 running.*\n.*stopped 0 running task.*\n"
                     r".*INFO cdcd: stopped$", log, re.M), log[-1000:]

    # no config file at all
    other = tmp_path / "bare"
    other.mkdir()
    port = free_port()
    d = start(started, other / "data", port, env={"CDCD_PORT": str(port)})
    assert f"data dir {other / 'data'}, config none" in d.log_text()


def test_listening_only_once_bound(tmp_path: Path) -> None:
    # a port in use: exit 2, "cannot listen", never "listening"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        r = run_serve("--port", str(busy), "--data-dir", str(tmp_path / "d"), cwd=tmp_path)
    assert r.returncode == 2, r
    assert f"cannot listen on 127.0.0.1:{busy}" in r.stderr, r.stderr
    assert "listening on" not in r.stderr and "Traceback" not in r.stderr, r.stderr

    # the moment "listening on" is in the log, the socket accepts connections; with port 0
    # the line names the port bound
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cdcd", "serve", "--port", "0",
                                 "--data-dir", str(tmp_path / "zero")],
                                stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        m = wait_for(lambda: re.search(r"listening on http://127\.0\.0\.1:(\d+)",
                                       log.read_text()), 20, 0.005, what="listening")
        with socket.create_connection(("127.0.0.1", int(m.group(1))), timeout=5):
            pass
        text = log.read_text()
        assert text.index("starting: data dir") < text.index("listening on")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_data_dir_error_is_not_a_listen_error(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    r = run_serve("--port", str(free_port()), "--data-dir", str(tmp_path / "afile"),
                  cwd=tmp_path)
    assert r.returncode == 2, r
    assert f"data dir {tmp_path / 'afile'}" in r.stderr and "cannot listen" not in r.stderr, \
        r.stderr
    assert "Traceback" not in r.stderr


def test_non_loopback_needs_a_token(tmp_path: Path, started: list[Daemon]) -> None:
    r = run_serve("--host", "0.0.0.0", "--port", str(free_port()), "--data-dir",
                  str(tmp_path / "d"), cwd=tmp_path)
    assert r.returncode == 2, r
    assert "CDCD_AUTH_TOKEN" in r.stderr and "--insecure-bind" in r.stderr, r.stderr
    assert "listening on" not in r.stderr and not (tmp_path / "d").exists()
    r = run_serve(env={"CDCD_HOST": "10.1.2.3", "CDCD_DATA_DIR": str(tmp_path / "d")},
                  cwd=tmp_path)
    assert r.returncode == 2 and "refusing to listen on 10.1.2.3 (CDCD_HOST)" in r.stderr, r


def _start_on_any(tmp_path: Path, started: list[Daemon], name: str, **kw: object) -> Daemon:
    d = Daemon(tmp_path / name, **kw)  # type: ignore[arg-type]
    d.extra = ["--host", "0.0.0.0", *d.extra]
    started.append(d)
    return d.start()


def test_non_loopback_with_a_token_or_insecure_bind(tmp_path: Path,
                                                    started: list[Daemon]) -> None:
    d = _start_on_any(tmp_path, started, "tok", token="t0ken")
    assert "listening on http://0.0.0.0:" in d.log_text()
    assert d.ok("list") == {"tasks": []}   # via 127.0.0.1, with the token
    req = urllib.request.Request(d.url + "/cdc", data=b'{"request_type": "list"}',
                                 method="POST")
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(req, timeout=10)
    assert exc.value.code == 401
    d = _start_on_any(tmp_path, started, "insecure", extra=["--insecure-bind"])
    assert d.ok("list") == {"tasks": []}
    assert "serving 0.0.0.0 without an auth token" in d.log_text()
    d = _start_on_any(tmp_path, started, "insecure-env", env={"CDCD_INSECURE_BIND": "yes"})
    assert d.ok("list") == {"tasks": []}


def test_metrics_need_token_from_the_environment(tmp_path: Path,
                                                 started: list[Daemon]) -> None:
    d = Daemon(tmp_path / "d", token="tk", env={"CDCD_METRICS_NEED_TOKEN": "yes"})
    started.append(d)
    d.start()
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(d.url + "/metrics", timeout=10)
    assert exc.value.code == 401
    req = urllib.request.Request(d.url + "/metrics", headers={"Authorization": "Bearer tk"})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 200 and b"cdcd_" in r.read()
