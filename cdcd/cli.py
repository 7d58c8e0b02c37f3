"""Command line: ``cdcd serve`` runs the daemon (serve.py); the other commands talk to one.

Everything the daemon sends back (names, reasons, keys, error messages) is printed through
``clean``, so a task name holding ESC[2J or a newline cannot move the terminal.
"""

from __future__ import annotations

import argparse
import getpass
import http.client
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from . import __version__
from .compat import WRITE_MODES
from .serve import add_serve_parser, serve
from .spec import (
    EVICTION_ACTIONS,
    EXISTING_KEYS,
    FUNCTIONS,
    LINK_TIMEOUT_S,
    METHODS,
    MODULES,
    READERS,
    RESUME_MODES,
)

DEFAULT_URL = "http://127.0.0.1:8444"
URL_EXAMPLE = "e.g. http://127.0.0.1:8444"
TIMEOUT_S = 30
PROGRESS_EVERY_S = 5.0   # verify --wait: a progress line this often when not on a terminal
SIDES = ("source", "target")

CREATE_EXAMPLES = """\
examples:
  cdcd create --source 10.0.0.1:6379 --source-password-env SRC_PW \\
      --target 127.0.0.1:6380 --method incremental_migration --db 0 --include-prefix user:
  cdcd create -f spec.json --set bandwidth_limit_mb=50 --set target.tls=true
  cdcd precheck --source 10.0.0.1:6379 --target 127.0.0.1:6380 --password-prompt

A password is best given by reference, read by the daemon when it connects:
--source-password-env NAME (the daemon's environment) or --source-password-file PATH (a
file on the daemon's machine); --password-prompt asks for it without putting it on the
command line. --set FIELD=VALUE sets any spec field (dotted path, JSON value, else a
string) after the file and the other flags."""


# --- printing what the daemon said -----------------------------------------------------------

def clean(value: object) -> str:
    """Return text from the daemon safe to print: control characters escaped (``\\x1b``,
    ``\\n``, ``\\u202e``), so no server-provided string can move or restyle the terminal."""
    text = value if isinstance(value, str) else str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c == " " else
                   c.encode("unicode_escape").decode("ascii") for c in text)


def lines_out(lines: list[str]) -> str:
    return "\n".join(clean(line) for line in lines)


def dumps(doc: Any) -> str:
    """--json output: json.dumps escapes every control character (ensure_ascii)."""
    return json.dumps(doc, indent=2)


def warn(text: str) -> None:
    print(f"cdcd: warning: {text}", file=sys.stderr)


# --- the parser -------------------------------------------------------------------------------

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Say every flag's default: the value argparse has, or "off" for a switch; a flag whose
    default is the daemon's (or an environment variable) names it in its own help."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if action.default is False or action.nargs == 0:
            return text + " (default: off)"
        if action.default is None:
            return text
        return super()._get_help_string(action)


def _db_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a db number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a db number")
    return value


def _db_map(text: str) -> tuple[str, int]:
    src, sep, dst = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r}: use SRC:DST, e.g. --map 1:0")
    return str(_db_number(src)), _db_number(dst)


def _assignment(text: str) -> tuple[list[str], Any]:
    path, sep, raw = text.partition("=")
    keys = path.strip().split(".")
    if not sep or not all(keys):
        raise argparse.ArgumentTypeError(
            f"{text!r}: use FIELD=VALUE with a dotted FIELD, e.g. --set filter.dbs=[0,1]")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw   # not JSON: a plain string (quote it as JSON to force a string: '"123"')
    return keys, value


def add_connection_flags(c: argparse.ArgumentParser) -> None:
    g = c.add_argument_group("daemon")
    g.add_argument("--url", help="the daemon's address, http:// or https:// (default: "
                   "$CDCD_URL, else http://127.0.0.1:$CDCD_PORT, else " + DEFAULT_URL + ")")
    g.add_argument("--token", help="bearer token; on a command line `ps` shows it, prefer "
                   "--token-file or the environment (default: $CDCD_AUTH_TOKEN)")
    g.add_argument("--token-file", metavar="PATH", help="file holding the bearer token "
                   "(default: $CDCD_AUTH_TOKEN_FILE, when $CDCD_AUTH_TOKEN is not set)")
    c.add_argument("--json", action="store_true",
                   help="print the daemon's raw JSON answer instead of a table")


def add_endpoint_flags(c: argparse.ArgumentParser, *, what: str) -> None:
    """--source/--target and how to log in to each; shared by create, precheck, verify."""
    g = c.add_argument_group("endpoints")
    for side in SIDES:
        g.add_argument(f"--{side}", metavar="ADDRS",
                       help=f"{side} host:port[,host:port] (default: {what})")
        g.add_argument(f"--{side}-username", metavar="USER",
                       help=f"{side} ACL user (default: none, the default user)")
        pw = g.add_mutually_exclusive_group()
        pw.add_argument(f"--{side}-password-env", metavar="NAME",
                        help=f"the daemon reads the {side} password from its environment "
                             f"variable NAME (default: none)")
        pw.add_argument(f"--{side}-password-file", metavar="PATH",
                        help=f"the daemon reads the {side} password from this file on its "
                             f"machine; a relative PATH is made absolute (default: none)")
        pw.add_argument(f"--{side}-password", metavar="PASSWORD",
                        help=f"the {side} password itself: visible in `ps` and shell "
                             f"history, prefer the -env/-file forms (default: none)")
        g.add_argument(f"--{side}-tls", action="store_true", help=f"TLS to the {side}")
    g.add_argument("--tls", action="store_true", help="TLS to both source and target")
    g.add_argument("--password-prompt", action="store_true",
                   help="ask for the source and target passwords not given otherwise "
                        "(getpass on a terminal, else one line each from stdin; an empty "
                        "answer means no password)")


def add_filter_flags(c: argparse.ArgumentParser) -> None:
    g = c.add_argument_group("what is copied")
    g.add_argument("--db", type=_db_number, action="append", metavar="N",
                   help="copy source db N; repeatable (default: every db)")
    g.add_argument("--include-prefix", action="append", metavar="PREFIX",
                   help="copy only keys starting with PREFIX; repeatable (default: every key)")
    g.add_argument("--exclude-prefix", action="append", metavar="PREFIX",
                   help="skip keys starting with PREFIX; repeatable (default: none)")
    g.add_argument("--map", type=_db_map, action="append", metavar="SRC:DST",
                   help="write source db SRC into target db DST; repeatable "
                        "(default: each db into the same number)")


def add_spec_flags(c: argparse.ArgumentParser) -> None:
    c.add_argument("--file", "-f", metavar="PATH",
                   help="task spec as JSON ('-' for stdin); the flags below override its "
                        "fields (default: none, the spec is built from the flags)")
    g = c.add_argument_group("task")
    g.add_argument("--task-id", metavar="ID", help="(default: generated by the daemon)")
    g.add_argument("--name", help="a human label (default: none)")
    g.add_argument("--method", choices=METHODS,
                   help=f"full_amount_migration copies a snapshot, incremental_migration "
                        f"then follows every change (default: {METHODS[0]})")
    g.add_argument("--reader", choices=READERS,
                   help=f"psync (replica protocol), scan, or auto: psync, else scan "
                        f"(default: {READERS[0]})")
    g.add_argument("--resume-mode", choices=RESUME_MODES,
                   help=f"after an error: auto retries, manual goes Failed and waits for "
                        f"`cdcd resume` (default: {RESUME_MODES[0]})")
    g.add_argument("--existing-keys", choices=EXISTING_KEYS,
                   help=f"a key the target already holds (default: {EXISTING_KEYS[0]})")
    g.add_argument("--write-mode", choices=WRITE_MODES,
                   help="restore (DUMP payloads), rewrite (values as commands: into an older "
                        "server), or auto: restore where the target takes the source's "
                        "payloads, else rewrite (default: auto)")
    g.add_argument("--functions", choices=FUNCTIONS,
                   help="the source's function libraries: copy (psync reader) or skip "
                        "(default: copy)")
    g.add_argument("--modules", choices=MODULES,
                   help="a module value where values are written as commands (write_mode "
                        "rewrite): fail the task, or skip the key (listed in the view) "
                        "(default: fail)")
    g.add_argument("--bandwidth-mb", type=int, metavar="MB",
                   help="cap on MB/s written to the target, 1..10240 (default: unlimited)")
    g.add_argument("--start-at", metavar="TIME",
                   help="ISO 8601 time with a zone, e.g. 2026-12-01T02:00:00Z (default: now)")
    g.add_argument("--shared-target", action="store_true",
                   help="allow another task to write the same target dbs")
    g.add_argument("--link-timeout-s", type=int, metavar="S",
                   help=f"seconds without an answer before a link is dead, 1..3600 "
                        f"(default: {LINK_TIMEOUT_S})")
    g.add_argument("--on-target-eviction", choices=EVICTION_ACTIONS,
                   help=f"when the target evicts keys (default: {EVICTION_ACTIONS[0]})")
    g.add_argument("--continuous-verify-sample", type=int, metavar="N",
                   help="while streaming, compare N random keys each period (default: off; "
                        "1000 when --continuous-verify-every-s is given)")
    g.add_argument("--continuous-verify-every-s", type=int, metavar="S",
                   help="period of the continuous verification (default: off; 300 when "
                        "--continuous-verify-sample is given)")
    add_endpoint_flags(c, what="from --file; required")
    add_filter_flags(c)
    c.add_argument("--set", type=_assignment, action="append", metavar="FIELD=VALUE",
                   help="set any spec field, applied last: dotted FIELD, JSON VALUE (else a "
                        "string), e.g. --set filter.dbs=[0,1] --set target.tls=true; "
                        "repeatable (default: none)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cdcd", description="Redis change-data-capture daemon",
                                formatter_class=HelpFormatter)
    p.add_argument("--version", action="version", version=f"cdcd {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    add_serve_parser(sub)

    def client(name: str, help: str, epilog: str | None = None) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help, description=help, epilog=epilog,
                           formatter_class=HelpFormatter)
        add_connection_flags(c)
        return c

    precheck_help = ("run a task's prechecks without creating it (exit status 1 when a "
                     "check fails)")
    for name, text in (("create", "create a task"), ("precheck", precheck_help)):
        add_spec_flags(client(name, text, CREATE_EXAMPLES))
    c = client("list", "list tasks")
    c.add_argument("--state", help="only tasks in this state, e.g. Running "
                                   "(default: every state)")
    helps = {"get": "show a task (or, with --verification, a verification)",
             "pause": "pause a task", "resume": "resume a paused or failed task",
             "delete": "delete a task (never its data) or a verification",
             "resync": "redo a task's snapshot now (target keys the source no longer has "
                       "are removed), then go on"}
    for name, text in helps.items():
        c = client(name, text)
        c.add_argument("task_id", metavar="ID", help="the task's id (with --verification, "
                       "a verification's)" if name in ("get", "delete") else "the task's id")
        if name in ("get", "delete"):
            c.add_argument("--verification", action="store_true",
                           help="ID is a verification id, not a task id")
        if name == "delete":
            c.add_argument("--ignore-not-found", action="store_true",
                           help="succeed when ID does not exist")
        if name == "get":
            c.add_argument("--watch", action="store_true",
                           help="redraw every second until Ctrl-C")
    c = client("verify", "compare a task's target with its source (or two endpoints); "
                         "exit status 1 with --wait when they differ")
    c.add_argument("task_id", nargs="?", metavar="ID",
                   help="the task whose source and target to compare (default: none, give "
                        "--source and --target)")
    add_endpoint_flags(c, what="none, the task's")
    add_filter_flags(c)
    g = c.add_argument_group("verification")
    g.add_argument("--sample", type=int, metavar="N",
                   help="compare N random source keys (default: every key)")
    g.add_argument("--examples", type=int, metavar="N",
                   help="example keys kept per kind of difference (default: 10)")
    g.add_argument("--ttl-tolerance-ms", type=int, metavar="MS",
                   help="TTLs differing by at most this much match (default: 2000)")
    g.add_argument("--keys-per-sec", type=float, metavar="RATE",
                   help="cap on keys read per second (default: 20000)")
    g.add_argument("--wait", action="store_true",
                   help="wait for the result and print a summary (progress: redrawn on a "
                        f"terminal, else a line every {PROGRESS_EVERY_S:g} s)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return serve(args)
    try:
        return run_client(args)
    except ClientError as exc:
        print(f"cdcd: {clean(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


# --- talking to the daemon --------------------------------------------------------------------

class ClientError(Exception):
    pass


def daemon_url(raw: str, origin: str) -> str:
    """Check the daemon's address and return it without a trailing ``/`` or ``/cdc``."""
    url = raw.strip()
    if not url.lower().startswith(("http://", "https://")):
        raise ClientError(f"{origin} must start with http:// or https:// ({URL_EXAMPLE})")
    try:
        parts = urllib.parse.urlsplit(url)
        _ = parts.port   # raises ValueError for a port that is not a number
    except ValueError as exc:
        raise ClientError(f"{origin} {url!r} is not a URL: {exc} ({URL_EXAMPLE})") from None
    if not parts.hostname:
        raise ClientError(f"{origin} {url!r} names no host ({URL_EXAMPLE})")
    path = parts.path.rstrip("/")
    if path.endswith("/cdc"):   # the API's path given as the address: accepted
        path = path[:-len("/cdc")]
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def resolve_daemon(args: argparse.Namespace) -> None:
    """Fill args.url and args.token from the flags, else the environment."""
    if args.url is not None:
        args.url = daemon_url(args.url, "--url")
    elif os.environ.get("CDCD_URL"):
        args.url = daemon_url(os.environ["CDCD_URL"], "CDCD_URL")
    elif os.environ.get("CDCD_PORT", "").strip().isdecimal():
        args.url = f"http://127.0.0.1:{int(os.environ['CDCD_PORT'])}"
    else:
        args.url = DEFAULT_URL
    token_file = args.token_file
    if not args.token and not token_file:
        args.token = os.environ.get("CDCD_AUTH_TOKEN", "")
        token_file = None if args.token else os.environ.get("CDCD_AUTH_TOKEN_FILE")
    if not args.token and token_file:
        try:
            args.token = Path(token_file).read_text().strip()
        except OSError as exc:
            raise ClientError(f"cannot read the token file {token_file}: "
                              f"{exc.strerror or exc}") from None
    args.token = args.token or ""


def call(args: argparse.Namespace, request_type: str, data: dict[str, Any]) -> dict[str, Any]:
    """POST one request to the daemon; any failure is a ClientError that says what to do."""
    url = args.url + "/cdc"
    body = json.dumps({"request_type": request_type, "request_data": data}).encode()
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    if args.token:
        req.add_header("Authorization", f"Bearer {args.token}")
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as exc:
        raise ClientError(http_error(args, exc)) from None
    except (urllib.error.URLError, OSError) as exc:
        raise ClientError(unreachable(args, exc)) from None
    except http.client.HTTPException:
        raise ClientError(f"{args.url} does not answer HTTP: is it the address of `cdcd "
                          f"serve` (not a Redis port)?") from None
    try:
        doc = json.loads(raw)
    except ValueError:
        doc = None
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), dict):
        raise ClientError(f"{url} did not answer with cdcd's JSON: is --url the address of "
                          f"`cdcd serve`?")
    return doc


def unreachable(args: argparse.Namespace, exc: OSError) -> str:
    reason = getattr(exc, "reason", exc)
    if isinstance(reason, ConnectionRefusedError):
        return f"cannot reach the daemon at {args.url}: is `cdcd serve` running? " \
               f"(connection refused)"
    if isinstance(reason, TimeoutError):
        return f"cannot reach the daemon at {args.url}: no answer within {TIMEOUT_S} s"
    text = reason.strerror if isinstance(reason, OSError) and reason.strerror else reason
    return f"cannot reach the daemon at {args.url}: {text}"


def http_error(args: argparse.Namespace, exc: urllib.error.HTTPError) -> str:
    try:
        doc = json.loads(exc.read())
    except (ValueError, OSError):
        doc = None
    if isinstance(doc, dict) and ("message" in doc or "error" in doc):
        text = f"{doc.get('code', exc.code)} {doc.get('error')}: {doc.get('message')}"
    else:
        text = (f"HTTP {exc.code} {exc.reason} from {args.url}/cdc, without cdcd's JSON "
                f"error: is --url the address of `cdcd serve`?")
    if exc.code == 401:
        text += (" (set --token or CDCD_AUTH_TOKEN)" if not args.token else
                 " (the daemon refused the token given: check --token or CDCD_AUTH_TOKEN)")
    return text


# --- building a spec from the flags -----------------------------------------------------------

def read_spec_file(path: str) -> dict[str, Any]:
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
        spec = json.loads(text)
    except (OSError, ValueError) as exc:
        raise ClientError(f"cannot read the spec from {path}: {exc}") from None
    if not isinstance(spec, dict):
        raise ClientError(f"the spec in {path} must be a JSON object")
    return spec


def _object(data: dict[str, Any], key: str, what: str) -> dict[str, Any]:
    node = data.setdefault(key, {})
    if not isinstance(node, dict):
        raise ClientError(f"{what} is not an object: cannot set a field in it")
    return node


def endpoint_fields(args: argparse.Namespace, side: str) -> dict[str, Any]:
    """The source/target fields the flags give; a password by reference when asked so."""
    ep: dict[str, Any] = {}
    if getattr(args, side):
        ep["addrs"] = getattr(args, side)
    if getattr(args, f"{side}_username") is not None:
        ep["username"] = getattr(args, f"{side}_username")
    if getattr(args, f"{side}_password") is not None:
        warn(f"--{side}-password puts the password where `ps` and shell history show it; "
             f"use --{side}-password-env NAME, --{side}-password-file PATH or "
             f"--password-prompt instead")
        ep["password"] = getattr(args, f"{side}_password")
    if getattr(args, f"{side}_password_env") is not None:
        ep["password"] = {"env": getattr(args, f"{side}_password_env")}
    if getattr(args, f"{side}_password_file") is not None:
        ep["password"] = {"file": os.path.abspath(getattr(args, f"{side}_password_file"))}
    if args.tls or getattr(args, f"{side}_tls"):
        ep["tls"] = True
    return ep


def filter_fields(args: argparse.Namespace, data: dict[str, Any]) -> None:
    for flag, key in (("db", "dbs"), ("include_prefix", "include_prefixes"),
                      ("exclude_prefix", "exclude_prefixes")):
        if getattr(args, flag):
            _object(data, "filter", "filter")[key] = getattr(args, flag)
    for src, dst in args.map or ():
        _object(data, "db_mapping", "db_mapping")[src] = dst


def apply_set(data: dict[str, Any], keys: list[str], value: Any) -> None:
    node = data
    for i, key in enumerate(keys[:-1]):
        node = _object(node, key, ".".join(keys[:i + 1]))
    node[keys[-1]] = value
    if keys[-1] == "password" and isinstance(value, str) and value:
        warn(f"--set {'.'.join(keys)}=... puts the password where `ps` and shell history "
             f"show it; set it to {{\"env\": NAME}} or {{\"file\": PATH}} instead")


def prompt_passwords(args: argparse.Namespace, data: dict[str, Any]) -> None:
    """--password-prompt: ask for each endpoint's password that nothing else gave."""
    interactive = sys.stdin.isatty()
    if not interactive and getattr(args, "file", None) == "-":
        raise ClientError("--password-prompt reads stdin, and so does --file -: give the "
                          "spec as a file, or the passwords with --source-password-file")
    for side in SIDES:
        ep = data.get(side)
        if not isinstance(ep, dict) or ep.get("password"):
            continue
        question = f"{side} password for {ep.get('addrs', '?')} (empty for none): "
        if interactive:
            answer = getpass.getpass(clean(question))
        else:
            answer = sys.stdin.readline().rstrip("\r\n")
        if answer:
            ep["password"] = answer


SPEC_FLAGS = (("task_id", "task_id"), ("name", "name"), ("method", "migration_method"),
              ("reader", "reader"), ("resume_mode", "resume_mode"),
              ("existing_keys", "existing_keys"), ("write_mode", "write_mode"),
              ("functions", "functions"), ("modules", "modules"),
              ("bandwidth_mb", "bandwidth_limit_mb"),
              ("start_at", "start_at"), ("link_timeout_s", "link_timeout_s"),
              ("on_target_eviction", "on_target_eviction"))


def spec_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The file's spec, then the flags, then --set, then the prompted passwords."""
    spec = read_spec_file(args.file) if args.file else {}
    for flag, key in SPEC_FLAGS:
        if getattr(args, flag) is not None:
            spec[key] = getattr(args, flag)
    if args.shared_target:
        spec["shared_target"] = True
    for side in SIDES:
        ep = endpoint_fields(args, side)
        if ep:
            _object(spec, side, side).update(ep)
    filter_fields(args, spec)
    if args.continuous_verify_sample is not None or args.continuous_verify_every_s is not None:
        cv = _object(spec, "continuous_verify", "continuous_verify")
        if args.continuous_verify_sample is not None:
            cv["sample"] = args.continuous_verify_sample
        if args.continuous_verify_every_s is not None:
            cv["every_s"] = args.continuous_verify_every_s
    for keys, value in args.set or ():
        apply_set(spec, keys, value)
    if args.password_prompt:
        prompt_passwords(args, spec)
    return spec


# --- the commands -----------------------------------------------------------------------------

def run_client(args: argparse.Namespace) -> int:
    resolve_daemon(args)
    cmd = args.command
    if cmd == "create":
        out = call(args, "create", spec_from_args(args))
        print(dumps(out) if args.json else clean(out["data"]["task_id"]))
        return 0
    if cmd == "precheck":
        out = call(args, "precheck", spec_from_args(args))
        print(dumps(out) if args.json else checks_table(out["data"]))
        return 0 if out["data"]["ok"] else 1
    if cmd == "verify":
        return verify(args)
    if getattr(args, "verification", False):
        return verification_command(args)
    if cmd == "list":
        out = call(args, "list", {"state": args.state} if args.state else {})
        print(dumps(out) if args.json else table(out["data"]["tasks"]))
        return 0
    if cmd == "get" and args.watch:
        return watch(args)
    data: dict[str, Any] = {"task_id": args.task_id}
    if cmd == "delete" and args.ignore_not_found:
        data["ignore_not_found"] = True
    out = call(args, cmd, data)
    if args.json:
        print(dumps(out))
    elif cmd == "get":
        print(describe(out["data"]["task"]))
    else:
        d = out["data"]
        print(clean(f"{d['task_id']} {d.get('state', 'deleted')}"))
    return 0


def _progress_text(t: dict[str, Any]) -> str:
    p = t.get("progress", {})
    snap = p.get("snapshot", {})
    text = f"{snap.get('percent', 0):5.1f}% {snap.get('keys_done', 0)}/{snap.get('keys_total', 0)}"
    inc = p.get("incremental")
    if inc and t.get("phase") == "incremental":
        lag = inc.get("lag_ms")
        text = f"lag {inc.get('lag_bytes', 0)}B" + (f" {lag}ms" if lag is not None else "")
    return text


def columns(rows: list[tuple[str, ...]]) -> list[str]:
    """Left-aligned columns; every cell is cleaned before it is measured."""
    cells = [[clean(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]


def table(tasks: list[dict[str, Any]]) -> str:
    rows: list[tuple[str, ...]] = [("TASK_ID", "NAME", "STATE", "PHASE", "PROGRESS", "REASON")]
    for t in tasks:
        reason = clean(" ".join(str(t.get("reason") or "").split()))
        rows.append((str(t["task_id"]), str(t.get("name", "")), str(t["state"]),
                     str(t.get("phase", "")), _progress_text(t), reason[:60]))
    return "\n".join(columns(rows))


def describe(t: dict[str, Any]) -> str:
    p = t.get("progress", {})
    snap = p.get("snapshot", {})
    lines = [f"task      {t['task_id']}" + (f" ({t['name']})" if t.get("name") else ""),
             f"state     {t['state']}  phase {t.get('phase') or '-'}"]
    if t.get("reason"):
        lines.append(f"reason    {t['reason']}")
    spec = t.get("spec", {})
    lines.append(f"source    {spec.get('source', {}).get('addrs')} -> target "
                 f"{spec.get('target', {}).get('addrs')} ({spec.get('migration_method')})")
    pct = float(snap.get("percent", 0))
    bar = "#" * int(pct / 5) + "." * (20 - int(pct / 5))
    left = snap.get("keys_total", 0) - snap.get("keys_done", 0)
    rate = p.get("ops_per_sec") or 0
    eta = (f", eta {int(left / rate)} s" if t.get("phase") == "snapshot" and left > 0
           and rate > 0 else "")
    lines.append(f"snapshot  [{bar}] {pct:5.1f}%  {snap.get('keys_done', 0)}/"
                 f"{snap.get('keys_total', 0)} keys, {snap.get('bytes', 0)} bytes{eta}")
    inc = p.get("incremental")
    if inc:
        lag_ms = "-" if inc.get("lag_ms") is None else inc["lag_ms"]
        lines.append(f"stream    offset {inc.get('applied_offset')}/{inc.get('source_offset')}"
                     f"  lag {inc.get('lag_bytes')} B, {lag_ms} ms,"
                     f" {inc.get('ops_applied')} ops")
    lines.append(f"rate      {p.get('ops_per_sec', 0)} ops/s, retries {p.get('retries', 0)}, "
                 f"errors {p.get('errors', 0)}")
    if p.get("last_error"):
        lines.append(f"error     {p['last_error']}")
    return lines_out(lines)


def watch(args: argparse.Namespace) -> int:
    """Redraw the task's view every second until Ctrl-C; ride out a daemon restart."""
    tty = sys.stdout.isatty()
    try:
        while True:
            try:
                out = call(args, "get", {"task_id": args.task_id})
                text = describe(out["data"]["task"])
            except ClientError as exc:
                if "cannot reach" not in str(exc):
                    raise   # e.g. 404: the task was deleted
                text = lines_out([f"task      {args.task_id}", f"{exc}; retrying"])
            text += f"\n{time.strftime('%H:%M:%S')}  (every 1 s, Ctrl-C to stop)"
            if tty:
                sys.stdout.write("\x1b[H\x1b[2J")
            print(text + ("" if tty else "\n"), flush=True)
            time.sleep(1)
    except KeyboardInterrupt:
        return 0


def checks_table(data: dict[str, Any]) -> str:
    rows: list[tuple[str, ...]] = [("CHECK", "STATUS", "MESSAGE")]
    for c in data["checks"]:
        rows.append((str(c["name"]), str(c["status"]), " ".join(str(c["message"]).split())))
    lines = columns(rows)
    errors = sum(c["status"] == "error" for c in data["checks"])
    warnings = sum(c["status"] == "warning" for c in data["checks"])
    verdict = "precheck passed" if data["ok"] else f"precheck failed: {errors} error(s)"
    lines.append(f"{verdict}, {warnings} warning(s)")
    return "\n".join(lines)


DIFF_KINDS = ("missing", "extra", "type_mismatch", "value_mismatch", "ttl_mismatch")
VERIFY_DONE = ("done", "failed", "cancelled")


def verify_request(args: argparse.Namespace) -> dict[str, Any]:
    data: dict[str, Any] = {}
    endpoints = {side: endpoint_fields(args, side) for side in SIDES}
    filters: dict[str, Any] = {}
    filter_fields(args, filters)
    if args.task_id:
        if any(endpoints.values()) or filters or args.password_prompt:
            raise ClientError("give a task id or --source/--target (with their passwords, "
                              "TLS and filter flags), not both: a task's own are used")
        data["task_id"] = args.task_id
    elif args.source and args.target:
        data.update(endpoints)
        data.update(filters)
        if args.password_prompt:
            prompt_passwords(args, data)
    else:
        raise ClientError("give a task id, or both --source and --target")
    for flag in ("sample", "examples", "ttl_tolerance_ms", "keys_per_sec"):
        if getattr(args, flag) is not None:
            data[flag] = getattr(args, flag)
    return data


def verify(args: argparse.Namespace) -> int:
    out = call(args, "verify", verify_request(args))
    vid = out["data"]["verification_id"]
    if not args.wait:
        print(dumps(out) if args.json else clean(vid))
        return 0
    # On a terminal the progress is redrawn in place (on stderr, as the summary goes to
    # stdout); into a file or a pipe it is a line every few seconds, for logs. With --json,
    # those lines go to stderr so that stdout stays one JSON document.
    terminal = sys.stdout.isatty()
    redraw = terminal and sys.stderr.isatty()
    log = sys.stderr if args.json else sys.stdout
    next_line = 0.0
    while True:
        doc = call(args, "get", {"verification_id": vid})
        v = doc["data"]["verification"]
        if v["state"] in VERIFY_DONE:
            break
        if redraw:
            sys.stderr.write(f"\r{verification_progress(v)}\x1b[K")
            sys.stderr.flush()
        elif not terminal and time.monotonic() >= next_line:
            print(f"{time.strftime('%H:%M:%S')} {verification_progress(v)}", file=log,
                  flush=True)
            next_line = time.monotonic() + PROGRESS_EVERY_S
        time.sleep(0.5)
    if redraw:
        sys.stderr.write("\r\x1b[K")
    print(dumps(doc) if args.json else describe_verification(v))
    return verification_status(v)


def verification_status(v: dict[str, Any]) -> int:
    """0 when a finished verification found the two sides equal, 1 otherwise."""
    result = v.get("result") or {}
    return 0 if v["state"] == "done" and result.get("consistent") else 1


def verification_command(args: argparse.Namespace) -> int:
    """``get --verification ID`` and ``delete --verification ID``."""
    if args.command == "get":
        if args.watch:
            raise ClientError("--watch is for tasks; use `cdcd verify ... --wait`")
        out = call(args, "get", {"verification_id": args.task_id})
        v = out["data"]["verification"]
        print(dumps(out) if args.json else describe_verification(v))
        return 0
    data: dict[str, Any] = {"verification_id": args.task_id}
    if args.ignore_not_found:
        data["ignore_not_found"] = True
    out = call(args, "delete", data)
    print(dumps(out) if args.json else clean(f"{out['data']['verification_id']} deleted"))
    return 0


def verification_progress(v: dict[str, Any]) -> str:
    phase = f" {v['phase']}" if v.get("phase") else ""
    return clean(f"verification {v['verification_id']} {v['state']}{phase} "
                 f"{v.get('percent', 0):.1f}%, {v.get('keys_checked', 0)}/"
                 f"{v.get('keys_total', 0)} keys checked")


def describe_verification(v: dict[str, Any]) -> str:
    what = f"task {v['task_id']}" if v.get("task_id") else "endpoints"
    lines = [f"verification {v['verification_id']} ({v.get('mode')}, {what})",
             f"source       {v.get('source')} -> target {v.get('target')}",
             f"state        {v['state']}" + (f"  phase {v['phase']}" if v.get("phase") else "")]
    if v.get("error"):
        lines.append(f"error        {v['error']}")
    result = v.get("result")
    if not result:
        lines.append(f"progress     {v.get('percent', 0):.1f}%  {v.get('keys_checked', 0)}/"
                     f"{v.get('keys_total', 0)} keys")
        return lines_out(lines)
    lines.append(f"checked      {result['keys_checked']} keys in {result.get('duration_s')} s"
                 + (f" (sample of {result['sample']})" if result.get("sample") else ""))
    counts = ", ".join(f"{k} {result[k]}" for k in DIFF_KINDS if result.get(k) is not None)
    lines.append(f"differences  {result['differences']}: {counts}")
    for kind in DIFF_KINDS:
        for e in result.get("examples", {}).get(kind, []):
            lines.append(f"  {kind:<15} db {e['db']}->{e['target_db']}  {e['key']}  "
                         f"{e['detail']}")
    lines.append("consistent   " + ("yes" if result["consistent"] else "no"))
    return lines_out(lines)
