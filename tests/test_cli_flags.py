"""The CLI's flags, messages and printing: in process where no daemon is needed, else
against a real one (``python -m cdcd``)."""

from __future__ import annotations

import argparse
import http.server
import io
import json
import os
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cdcd import cli
from cdcd.spec import parse_spec

from .compare import fill_bulk
from .daemon import Daemon, spec
from .servers import RedisServer, free_port
from .test_cli import cdcd, ok

HOSTILE = "evil\x1b[2J\x1b[31mred\nsecond line\r\u202eright-to-left\x07"


def parse(*argv: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(list(argv))


def built(*argv: str) -> dict[str, Any]:
    return cli.spec_from_args(parse(*argv))


def subparsers() -> dict[str, argparse.ArgumentParser]:
    p = cli.build_parser()
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


# --- flags --------------------------------------------------------------------------------

def test_every_client_flag_says_its_default() -> None:
    for name, parser in subparsers().items():
        if name == "serve":
            continue
        formatter = parser._get_formatter()
        for action in parser._actions:
            if action.help == argparse.SUPPRESS or "-h" in action.option_strings:
                continue
            if not action.option_strings and action.nargs is None:
                continue   # a required ID has no default
            text = formatter._expand_help(action) if action.help else ""
            assert "default" in text, (name, action.option_strings or action.dest, text)
    # --help works for every command and names no token from the environment
    for name, parser in subparsers().items():
        assert "--url" in parser.format_help() or name == "serve"


def test_help_does_not_show_the_token_from_the_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDCD_AUTH_TOKEN", "tok-in-env-777")
    assert "tok-in-env-777" not in subparsers()["list"].format_help()


def test_flags_build_every_spec_field(tmp_path: Path) -> None:
    data = built(
        "create", "--task-id", "t1", "--name", "orders", "--source", "10.0.0.1:6379",
        "--source-username", "app", "--source-password-env", "SRC_PW",
        "--target", "127.0.0.1:6380", "--target-username", "writer",
        "--target-password-file", str(tmp_path / "target.pw"), "--tls",
        "--method", "incremental_migration", "--reader", "psync", "--resume-mode", "manual",
        "--existing-keys", "skip", "--bandwidth-mb", "50", "--start-at",
        "2030-01-01T00:00:00Z", "--shared-target", "--link-timeout-s", "30",
        "--on-target-eviction", "fail", "--write-mode", "rewrite", "--functions", "skip", "--modules", "skip", "--db", "0", "--db", "1", "--include-prefix", "user:",
        "--include-prefix", "order:", "--exclude-prefix", "tmp:", "--map", "1:0",
        "--continuous-verify-sample", "500", "--continuous-verify-every-s", "60")
    assert data == {
        "task_id": "t1", "name": "orders",
        "source": {"addrs": "10.0.0.1:6379", "username": "app",
                   "password": {"env": "SRC_PW"}, "tls": True},
        "target": {"addrs": "127.0.0.1:6380", "username": "writer",
                   "password": {"file": str(tmp_path / "target.pw")}, "tls": True},
        "migration_method": "incremental_migration", "reader": "psync",
        "resume_mode": "manual", "existing_keys": "skip", "write_mode": "rewrite", "functions": "skip", "modules": "skip",
        "bandwidth_limit_mb": 50,
        "start_at": "2030-01-01T00:00:00Z", "shared_target": True, "link_timeout_s": 30,
        "on_target_eviction": "fail",
        "filter": {"dbs": [0, 1], "include_prefixes": ["user:", "order:"],
                   "exclude_prefixes": ["tmp:"]},
        "db_mapping": {"1": 0},
        "continuous_verify": {"sample": 500, "every_s": 60},
    }
    # what the daemon parses, field for field: every top-level spec field has a flag
    parsed = parse_spec(data).to_json(mask=False)
    flagged = {"task_id", "name", "source", "target", "migration_method", "reader",
               "resume_mode", "bandwidth_limit_mb", "start_at", "filter", "db_mapping",
               "existing_keys", "write_mode", "functions", "modules", "shared_target", "link_timeout_s",
               "on_target_eviction", "continuous_verify"}
    assert flagged <= set(parsed)
    assert parsed["source"]["password"] == {"env": "SRC_PW"}
    assert parsed["filter"]["dbs"] == [0, 1] and parsed["db_mapping"] == {"1": 0}
    # --source-tls alone is one side only
    one = built("create", "--source", "a:1", "--target", "b:2", "--target-tls")
    assert one["target"]["tls"] is True and "tls" not in one["source"]


def test_set_takes_dotted_paths_and_json_values(tmp_path: Path) -> None:
    data = built("create", "--source", "a:1", "--target", "b:2",
                 "--set", "filter.dbs=[0,1]", "--set", "target.tls=true",
                 "--set", "name=plain words", "--set", "db_mapping.3=4",
                 "--set", "source.tls_ca_file=/etc/ssl/ca.pem",
                 "--set", "continuous_verify={\"sample\": 10}", "--set", "bandwidth_limit_mb=7")
    assert data["filter"] == {"dbs": [0, 1]}
    assert data["target"] == {"addrs": "b:2", "tls": True}
    assert data["name"] == "plain words"
    assert data["db_mapping"] == {"3": 4}
    assert data["source"] == {"addrs": "a:1", "tls_ca_file": "/etc/ssl/ca.pem"}
    assert data["continuous_verify"] == {"sample": 10}
    assert data["bandwidth_limit_mb"] == 7
    assert built("create", "--set", 'name="123"')["name"] == "123"
    assert built("create", "--set", "name=123")["name"] == 123   # JSON first
    # order: the file, then the flags, then --set
    f = tmp_path / "spec.json"
    f.write_text(json.dumps({"name": "file", "reader": "scan", "bandwidth_limit_mb": 1,
                             "source": {"addrs": "f:1", "username": "u"},
                             "db_mapping": {"5": 6}}))
    data = built("create", "-f", str(f), "--name", "flag", "--source", "g:1", "--map", "1:0",
                 "--set", "name=set")
    assert data["name"] == "set" and data["reader"] == "scan"
    assert data["source"] == {"addrs": "g:1", "username": "u"}
    assert data["db_mapping"] == {"5": 6, "1": 0}
    # a path through something that is not an object, and malformed assignments
    with pytest.raises(cli.ClientError, match="source.addrs is not an object"):
        built("create", "--source", "a:1", "--set", "source.addrs.x=1")
    for bad in ("noequals", "=1", "a..b=1", ".a=1"):
        with pytest.raises(SystemExit) as exc:
            parse("create", "--set", bad)
        assert exc.value.code == 2
    with pytest.raises(SystemExit):
        parse("create", "--map", "1-0")
    with pytest.raises(SystemExit):
        parse("create", "--db", "x")


def test_password_on_argv_warns_and_references_do_not(
        capsys: pytest.CaptureFixture[str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    data = built("create", "--source", "a:1", "--source-password", "s3cret",
                 "--target", "b:2")
    assert data["source"]["password"] == "s3cret"
    err = capsys.readouterr().err
    assert "--source-password" in err and "ps" in err and "--source-password-env" in err
    assert "--source-password-file" in err and "s3cret" not in err
    built("create", "--source", "a:1", "--set", "target.password=x2")
    assert "target.password" in capsys.readouterr().err
    built("create", "--source", "a:1", "--source-password-env", "PW",
          "--set", 'target.password={"env": "T"}')
    assert capsys.readouterr().err == ""
    # a relative file is made absolute (the daemon needs an absolute path)
    monkeypatch.chdir(tmp_path)
    data = built("create", "--source", "a:1", "--source-password-file", "pw.txt")
    assert data["source"]["password"] == {"file": str(tmp_path / "pw.txt")}
    # two ways of giving one password: a usage error
    with pytest.raises(SystemExit) as exc:
        parse("create", "--source-password-env", "A", "--source-password-file", "/x")
    assert exc.value.code == 2


def test_password_prompt(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # not a terminal: one line per password asked, in order source, target
    monkeypatch.setattr("sys.stdin", io.StringIO("src-pw\n\n"))
    data = built("create", "--source", "a:1", "--target", "b:2", "--password-prompt")
    assert data["source"]["password"] == "src-pw" and "password" not in data["target"]
    # a side whose password another flag gave is not asked for
    monkeypatch.setattr("sys.stdin", io.StringIO("dst-pw\n"))
    data = built("create", "--source", "a:1", "--source-password-env", "E", "--target", "b:2",
                 "--password-prompt")
    assert data["source"]["password"] == {"env": "E"} and data["target"]["password"] == "dst-pw"
    # a terminal: getpass, never echoed
    asked: list[str] = []

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    def fake_getpass(prompt: str) -> str:
        asked.append(prompt)
        return f"pw{len(asked)}"

    monkeypatch.setattr("sys.stdin", Tty(""))
    monkeypatch.setattr("getpass.getpass", fake_getpass)
    data = built("precheck", "--source", "a:1", "--target", "b:2", "--password-prompt")
    assert data["source"]["password"] == "pw1" and data["target"]["password"] == "pw2"
    assert asked[0].startswith("source password for a:1")
    # stdin cannot be both the spec and the passwords
    monkeypatch.setattr("sys.stdin", io.StringIO('{"source": {"addrs": "a:1"}}'))
    with pytest.raises(cli.ClientError, match="--file -"):
        built("create", "-f", "-", "--password-prompt")


def test_verify_request_flags() -> None:
    args = parse("verify", "--source", "a:1", "--source-password-env", "S", "--target", "b:2",
                 "--target-tls", "--db", "2", "--map", "2:3", "--sample", "10")
    assert cli.verify_request(args) == {
        "source": {"addrs": "a:1", "password": {"env": "S"}},
        "target": {"addrs": "b:2", "tls": True},
        "filter": {"dbs": [2]}, "db_mapping": {"2": 3}, "sample": 10}
    assert cli.verify_request(parse("verify", "t1", "--examples", "3")) == \
        {"task_id": "t1", "examples": 3}
    for argv in (("verify", "t1", "--source", "a:1"), ("verify", "t1", "--tls"),
                 ("verify", "t1", "--db", "1"), ("verify", "--source", "a:1")):
        with pytest.raises(cli.ClientError):
            cli.verify_request(parse(*argv))


# --- the daemon's address and token ---------------------------------------------------------

def test_url_is_checked_and_explained() -> None:
    with pytest.raises(cli.ClientError) as exc:
        cli.daemon_url("localhost:8444", "--url")
    assert str(exc.value) == ("--url must start with http:// or https:// "
                              "(e.g. http://127.0.0.1:8444)")
    assert cli.daemon_url("http://127.0.0.1:8444/cdc", "--url") == "http://127.0.0.1:8444"
    assert cli.daemon_url(" http://h:1/cdc/ ", "--url") == "http://h:1"
    assert cli.daemon_url("https://proxy.example/cdcd/", "--url") == "https://proxy.example/cdcd"
    assert cli.daemon_url("HTTP://h:1", "--url") == "http://h:1"
    for bad in ("http://[bad", "http://h:port", "http://"):
        with pytest.raises(cli.ClientError, match="e.g. http://127.0.0.1:8444"):
            cli.daemon_url(bad, "--url")


def test_url_and_token_from_the_environment(monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("CDCD_"):
            monkeypatch.delenv(name)

    def resolved(*argv: str) -> tuple[str, str]:
        args = parse("list", *argv)
        cli.resolve_daemon(args)
        return args.url, args.token

    assert resolved() == ("http://127.0.0.1:8444", "")
    monkeypatch.setenv("CDCD_PORT", "9000")
    assert resolved()[0] == "http://127.0.0.1:9000"
    monkeypatch.setenv("CDCD_URL", "http://d:1/cdc")
    assert resolved()[0] == "http://d:1"
    assert resolved("--url", "http://e:2")[0] == "http://e:2"
    monkeypatch.setenv("CDCD_URL", "d:1")
    with pytest.raises(cli.ClientError, match="^CDCD_URL must start with http://"):
        resolved()
    monkeypatch.delenv("CDCD_URL")
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    monkeypatch.setenv("CDCD_AUTH_TOKEN_FILE", str(token_file))
    assert resolved()[1] == "from-file"
    monkeypatch.setenv("CDCD_AUTH_TOKEN", "from-env")
    assert resolved()[1] == "from-env"
    assert resolved("--token", "flag")[1] == "flag"
    assert resolved("--token-file", str(token_file))[1] == "from-file"
    with pytest.raises(cli.ClientError, match="cannot read the token file"):
        resolved("--token-file", str(tmp_path / "missing"))


# --- printing what the daemon says ----------------------------------------------------------

def test_clean_escapes_control_characters() -> None:
    assert cli.clean("plain: ünïcode, 日本") == "plain: ünïcode, 日本"
    out = cli.clean(HOSTILE)
    assert out.isprintable()
    assert "\\x1b[2J" in out and "\\n" in out and "\\r" in out and "\\u202e" in out
    assert cli.clean("bad\udcffbyte") == "bad\\udcffbyte"
    assert cli.clean(7) == "7"


def test_server_text_is_printed_escaped_everywhere() -> None:
    task = {"task_id": "t" + HOSTILE, "name": HOSTILE, "state": "Failed" + HOSTILE,
            "phase": HOSTILE, "reason": HOSTILE,
            "spec": {"source": {"addrs": HOSTILE}, "target": {"addrs": HOSTILE},
                     "migration_method": HOSTILE},
            "progress": {"snapshot": {}, "last_error": HOSTILE,
                         "incremental": {"lag_ms": HOSTILE}}}
    verification = {"verification_id": HOSTILE, "task_id": HOSTILE, "mode": HOSTILE,
                    "source": HOSTILE, "target": HOSTILE, "state": "done", "phase": HOSTILE,
                    "error": HOSTILE,
                    "result": {"keys_checked": 1, "differences": 1, "consistent": False,
                               "missing": 1, "examples": {"missing": [
                                   {"db": 0, "target_db": 0, "key": HOSTILE,
                                    "detail": HOSTILE}]}}}
    outputs = {
        "table": (cli.table([task]), 2),
        "describe": (cli.describe(task), None),
        "checks": (cli.checks_table({"ok": False, "checks": [
            {"name": HOSTILE, "status": "error", "message": HOSTILE}]}), 3),
        "verification": (cli.describe_verification(verification), None),
        "progress": (cli.verification_progress(verification), 1),
    }
    for what, (text, n_lines) in outputs.items():
        assert all(line.isprintable() for line in text.split("\n")), (what, text)
        assert "\\x1b[2J" in text, what
        if n_lines is not None:
            assert len(text.split("\n")) == n_lines, (what, text)


# --- against a real daemon ------------------------------------------------------------------

def test_create_with_flags_and_password_references(
        daemon_factory: Callable[..., Daemon], servers: Callable[..., RedisServer],
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    src, dst = servers(password="ref-src-pw"), servers(password="ref-dst-pw")
    fill_bulk(src.client(), 50)
    src.client(1).set("user:1", "a")
    src.client(1).set("tmp:1", "b")
    pw_file = tmp_path / "dst.pw"
    pw_file.write_text("ref-dst-pw\n")
    monkeypatch.setenv("CLI_TEST_SRC_PW", "ref-src-pw")   # the daemon's environment
    d = daemon_factory()
    out = ok(d, "create", "--task-id", "flags", "--name", "by-flags", "--source", src.addr,
             "--source-password-env", "CLI_TEST_SRC_PW", "--target", dst.addr,
             "--target-password-file", str(pw_file), "--reader", "scan",
             "--existing-keys", "replace", "--db", "1", "--map", "1:2",
             "--exclude-prefix", "tmp:", "--link-timeout-s", "20", "--on-target-eviction",
             "fail", "--resume-mode", "manual", "--set", "bandwidth_limit_mb=100")
    assert out.strip() == "flags"
    d.wait_state("flags", "Succeeded")
    assert dst.client(2).get("user:1") == b"a" and dst.client(2).get("tmp:1") is None
    assert dst.client(0).dbsize() == 0
    view = json.loads(ok(d, "get", "flags", "--json"))["data"]["task"]["spec"]
    assert view["source"]["password"] == {"env": "CLI_TEST_SRC_PW"}
    assert view["target"]["password"] == {"file": str(pw_file)}
    assert view["filter"]["dbs"] == [1] and view["db_mapping"] == {"1": 2}
    assert view["link_timeout_s"] == 20 and view["on_target_eviction"] == "fail"
    assert view["resume_mode"] == "manual" and view["bandwidth_limit_mb"] == 100
    assert "ref-src-pw" not in d.log_text() and "ref-dst-pw" not in d.log_text()
    # precheck with the same flags: the checks pass, exit 0
    r = cdcd(d, "precheck", "--source", src.addr, "--source-password-env", "CLI_TEST_SRC_PW",
             "--target", dst.addr, "--target-password", "ref-dst-pw", "--reader", "scan",
             "--db", "3")
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert "precheck passed" in r.stdout and "visible" not in r.stdout
    assert "--target-password" in r.stderr and "ps" in r.stderr   # the argv warning
    # resync: a Succeeded task goes back to Running and copies again
    assert ok(d, "resync", "flags").strip() == "flags Running"
    d.wait_state("flags", "Succeeded")
    r = cdcd(d, "resync", "nope")
    assert r.returncode == 1 and "task_not_found" in r.stderr


def test_errors_say_what_to_do(daemon_factory: Callable[..., Daemon]) -> None:
    r = cdcd(None, "list", "--url", "localhost:8444")
    assert r.returncode == 1
    assert r.stderr.strip() == ("cdcd: --url must start with http:// or https:// "
                                "(e.g. http://127.0.0.1:8444)")
    port = free_port()
    r = cdcd(None, "list", "--url", f"http://127.0.0.1:{port}")
    assert r.returncode == 1
    assert r.stderr.strip() == (f"cdcd: cannot reach the daemon at http://127.0.0.1:{port}: "
                                f"is `cdcd serve` running? (connection refused)")
    d = daemon_factory(token="errs-token")
    r = cdcd(d, "list")
    assert r.returncode == 1 and "401" in r.stderr
    assert "(set --token or CDCD_AUTH_TOKEN)" in r.stderr
    r = cdcd(d, "list", "--token", "badtok-999")
    assert r.returncode == 1 and "refused the token" in r.stderr and "badtok" not in r.stderr
    # the API's own path as the address: accepted
    assert "TASK_ID" in ok(None, "list", "--url", d.url + "/cdc", "--token", "errs-token")
    # a JSON error body: its code, error and message
    r = cdcd(d, "get", "nope", "--token", "errs-token")
    assert r.returncode == 1
    assert r.stderr.strip() == "cdcd: 404 task_not_found: task 'nope' does not exist"
    r = cdcd(d, "create", "--token", "errs-token", "--source", "a:1", "--target", "b:2",
             "--set", "link_timeout_s=0")
    assert r.returncode == 1 and "400" in r.stderr and "link_timeout_s" in r.stderr


@pytest.fixture
def not_cdcd() -> Iterator[str]:
    """An HTTP server that is not cdcd (answers 404 with HTML to everything)."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.send_response(404)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(b"<html>\x1b[2Jnot here</html>")

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_something_else_at_the_url(not_cdcd: str) -> None:
    r = cdcd(None, "list", "--url", not_cdcd)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "HTTP 404" in r.stderr and "`cdcd serve`" in r.stderr and "\x1b" not in r.stderr


def test_hostile_names_cannot_move_the_terminal(daemon: Daemon,
                                                servers: Callable[..., RedisServer]) -> None:
    src, dst = servers(), servers()
    daemon.create(spec(src, dst, task_id="hostile", name=HOSTILE))
    daemon.wait_state("hostile", "Succeeded")
    for args in (("list",), ("get", "hostile")):
        out = ok(daemon, *args)
        assert "\x1b" not in out and "\r" not in out and "\u202e" not in out, out
        assert "evil\\x1b[2J\\x1b[31mred\\nsecond line" in out
    assert len(ok(daemon, "list").strip().split("\n")) == 2
    doc = json.loads(ok(daemon, "list", "--json"))
    assert doc["data"]["tasks"][0]["name"] == HOSTILE   # --json keeps it exact (escaped JSON)


PROGRESS_LINE = re.compile(r"^\d\d:\d\d:\d\d verification \S+ (pending|running)\b.* "
                           r"\d+\.\d%, \d+/\d+ keys checked$")


def test_verify_wait_prints_progress_lines_when_not_a_terminal(
        daemon: Daemon, servers: Callable[..., RedisServer]) -> None:
    src, dst = servers(), servers()
    fill_bulk(src.client(), 1500)
    fill_bulk(dst.client(), 1500)
    # about 3 s at 500 keys/s: a line at the first poll, then the summary
    out = ok(daemon, "verify", "--source", src.addr, "--target", dst.addr,
             "--keys-per-sec", "500", "--wait")
    lines = out.strip().split("\n")
    progress = [line for line in lines if PROGRESS_LINE.match(line)]
    assert progress, out
    assert lines.index(progress[-1]) < next(i for i, line in enumerate(lines)
                                            if line.startswith("consistent"))
    assert lines[-1] == "consistent   yes"
    # --json: the lines go to stderr, stdout is one JSON document
    r = cdcd(daemon, "verify", "--source", src.addr, "--target", dst.addr,
             "--keys-per-sec", "500", "--wait", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["data"]["verification"]["result"]["consistent"] is True
    assert any(PROGRESS_LINE.match(line) for line in r.stderr.splitlines()), r.stderr
