"""Command line: ``cdcd serve`` runs the daemon; the other commands talk to one."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from . import __version__
from .serve import add_serve_parser, serve

DEFAULT_URL = "http://127.0.0.1:8444"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cdcd", description="Redis change-data-capture daemon")
    p.add_argument("--version", action="version", version=f"cdcd {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    add_serve_parser(sub)

    def client(name: str, help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help)
        c.add_argument("--url", default=os.environ.get("CDCD_URL", DEFAULT_URL),
                       help=f"daemon address (env CDCD_URL, default {DEFAULT_URL})")
        c.add_argument("--token", default=os.environ.get("CDCD_AUTH_TOKEN", ""),
                       help="bearer token (env CDCD_AUTH_TOKEN)")
        c.add_argument("--json", action="store_true", help="print the raw JSON answer")
        return c

    precheck_help = ("run a task's prechecks without creating it (exit status 1 when a "
                     "check fails)")
    for name, text in (("create", "create a task"), ("precheck", precheck_help)):
        c = client(name, text)
        c.add_argument("--file", "-f", help="task spec as JSON ('-' for stdin)")
        c.add_argument("--task-id")
        c.add_argument("--name")
        c.add_argument("--source", help="source host:port[,host:port]")
        c.add_argument("--source-password")
        c.add_argument("--target", help="target host:port[,host:port]")
        c.add_argument("--target-password")
        c.add_argument("--method", choices=["full_amount_migration", "incremental_migration"])
        c.add_argument("--reader", choices=["auto", "psync", "scan"])
    c = client("list", "list tasks")
    c.add_argument("--state")
    for name in ("get", "pause", "resume", "delete"):
        c = client(name, f"{name} a task")
        c.add_argument("task_id", metavar="ID")
        if name in ("get", "delete"):
            c.add_argument("--verification", action="store_true",
                           help="ID is a verification id, not a task id")
        if name == "delete":
            c.add_argument("--ignore-not-found", action="store_true")
        if name == "get":
            c.add_argument("--watch", action="store_true", help="redraw until interrupted")
    c = client("verify", "compare a task's target with its source (or two endpoints); "
                         "exit status 1 with --wait when they differ")
    c.add_argument("task_id", nargs="?", help="the task whose source and target to compare")
    c.add_argument("--source", help="source host:port (instead of a task)")
    c.add_argument("--source-password")
    c.add_argument("--target", help="target host:port (instead of a task)")
    c.add_argument("--target-password")
    c.add_argument("--sample", type=int, help="compare N random source keys, not every key")
    c.add_argument("--examples", type=int, help="example keys per kind of difference (10)")
    c.add_argument("--ttl-tolerance-ms", type=int)
    c.add_argument("--keys-per-sec", type=float, help="cap on keys read per second")
    c.add_argument("--wait", action="store_true",
                   help="wait for the result and print a summary")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return serve(args)
    try:
        return run_client(args)
    except ClientError as exc:
        print(f"cdcd: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


class ClientError(Exception):
    pass


def call(args: argparse.Namespace, request_type: str, data: dict[str, Any]) -> dict[str, Any]:
    body = json.dumps({"request_type": request_type, "request_data": data}).encode()
    try:
        req = urllib.request.Request(args.url.rstrip("/") + "/cdc", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    except ValueError as exc:  # e.g. "localhost:8444" without http://
        raise ClientError(f"bad --url {args.url!r}: {exc}") from None
    if args.token:
        req.add_header("Authorization", f"Bearer {args.token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return dict(json.loads(resp.read()))
    except urllib.error.HTTPError as exc:
        try:
            doc = json.loads(exc.read())
            raise ClientError(f"{doc.get('code')} {doc.get('error')}: {doc.get('message')}"
                              ) from None
        except ValueError:
            raise ClientError(f"HTTP {exc.code} from {args.url}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ClientError(f"cannot reach the daemon at {args.url}: {reason}") from None


def spec_from_args(args: argparse.Namespace) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if args.file:
        try:
            text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
            spec = json.loads(text)
        except (OSError, ValueError) as exc:
            raise ClientError(f"cannot read the spec from {args.file}: {exc}") from None
        if not isinstance(spec, dict):
            raise ClientError(f"the spec in {args.file} must be a JSON object")
    for flag, key in (("task_id", "task_id"), ("name", "name"), ("method", "migration_method"),
                      ("reader", "reader")):
        if getattr(args, flag):
            spec[key] = getattr(args, flag)
    for side in ("source", "target"):
        if getattr(args, side):
            spec.setdefault(side, {})["addrs"] = getattr(args, side)
        if getattr(args, f"{side}_password"):
            spec.setdefault(side, {})["password"] = getattr(args, f"{side}_password")
    return spec


def run_client(args: argparse.Namespace) -> int:
    cmd = args.command
    if cmd == "create":
        out = call(args, "create", spec_from_args(args))
        print(json.dumps(out, indent=2) if args.json else out["data"]["task_id"])
        return 0
    if cmd == "precheck":
        out = call(args, "precheck", spec_from_args(args))
        print(json.dumps(out, indent=2) if args.json else checks_table(out["data"]))
        return 0 if out["data"]["ok"] else 1
    if cmd == "verify":
        return verify(args)
    if getattr(args, "verification", False):
        return verification_command(args)
    if cmd == "list":
        out = call(args, "list", {"state": args.state} if args.state else {})
        if args.json:
            print(json.dumps(out, indent=2))
        else:
            print(table(out["data"]["tasks"]))
        return 0
    if cmd == "get" and args.watch:
        return watch(args)
    data: dict[str, Any] = {"task_id": args.task_id}
    if cmd == "delete" and args.ignore_not_found:
        data["ignore_not_found"] = True
    out = call(args, cmd, data)
    if args.json:
        print(json.dumps(out, indent=2))
    elif cmd == "get":
        print(describe(out["data"]["task"]))
    else:
        d = out["data"]
        print(f"{d['task_id']} {d.get('state', 'deleted')}")
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


def table(tasks: list[dict[str, Any]]) -> str:
    rows = [("TASK_ID", "NAME", "STATE", "PHASE", "PROGRESS", "REASON")]
    for t in tasks:
        rows.append((t["task_id"], t.get("name", ""), t["state"], t.get("phase", ""),
                     _progress_text(t), " ".join((t.get("reason") or "").split())[:60]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


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
    return "\n".join(lines)


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
                text = f"task      {args.task_id}\n{exc}; retrying"
            text += f"\n{time.strftime('%H:%M:%S')}  (every 1 s, Ctrl-C to stop)"
            if tty:
                sys.stdout.write("\x1b[H\x1b[2J")
            print(text + ("" if tty else "\n"), flush=True)
            time.sleep(1)
    except KeyboardInterrupt:
        return 0


def checks_table(data: dict[str, Any]) -> str:
    rows = [("CHECK", "STATUS", "MESSAGE")]
    for c in data["checks"]:
        rows.append((c["name"], c["status"], " ".join(c["message"].split())))
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    lines = [f"{r[0].ljust(widths[0])}  {r[1].ljust(widths[1])}  {r[2]}".rstrip() for r in rows]
    errors = sum(c["status"] == "error" for c in data["checks"])
    warnings = sum(c["status"] == "warning" for c in data["checks"])
    verdict = "precheck passed" if data["ok"] else f"precheck failed: {errors} error(s)"
    lines.append(f"{verdict}, {warnings} warning(s)")
    return "\n".join(lines)


DIFF_KINDS = ("missing", "extra", "type_mismatch", "value_mismatch", "ttl_mismatch")
VERIFY_DONE = ("done", "failed", "cancelled")


def verify_request(args: argparse.Namespace) -> dict[str, Any]:
    data: dict[str, Any] = {}
    endpoints = args.source or args.target
    if args.task_id and endpoints:
        raise ClientError("give a task id or --source/--target, not both")
    if args.task_id:
        data["task_id"] = args.task_id
    elif args.source and args.target:
        for side in ("source", "target"):
            data[side] = {"addrs": getattr(args, side)}
            if getattr(args, f"{side}_password"):
                data[side]["password"] = getattr(args, f"{side}_password")
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
        print(json.dumps(out, indent=2) if args.json else vid)
        return 0
    tty = sys.stderr.isatty()
    while True:
        doc = call(args, "get", {"verification_id": vid})
        v = doc["data"]["verification"]
        if v["state"] in VERIFY_DONE:
            break
        if tty:
            sys.stderr.write(f"\r{verification_progress(v)}\x1b[K")
            sys.stderr.flush()
        time.sleep(0.5)
    if tty:
        sys.stderr.write("\r\x1b[K")
    print(json.dumps(doc, indent=2) if args.json else describe_verification(v))
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
        print(json.dumps(out, indent=2) if args.json else describe_verification(v))
        return 0
    data: dict[str, Any] = {"verification_id": args.task_id}
    if args.ignore_not_found:
        data["ignore_not_found"] = True
    out = call(args, "delete", data)
    print(json.dumps(out, indent=2) if args.json
          else f"{out['data']['verification_id']} deleted")
    return 0


def verification_progress(v: dict[str, Any]) -> str:
    return (f"verification {v['verification_id']} {v['state']} {v.get('phase') or ''} "
            f"{v.get('percent', 0):5.1f}%  {v.get('keys_checked', 0)}/"
            f"{v.get('keys_total', 0)} keys").replace("  ", " ")


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
        return "\n".join(lines)
    lines.append(f"checked      {result['keys_checked']} keys in {result.get('duration_s')} s"
                 + (f" (sample of {result['sample']})" if result.get("sample") else ""))
    counts = ", ".join(f"{k} {result[k]}" for k in DIFF_KINDS if result.get(k) is not None)
    lines.append(f"differences  {result['differences']}: {counts}")
    for kind in DIFF_KINDS:
        for e in result.get("examples", {}).get(kind, []):
            lines.append(f"  {kind:<15} db {e['db']}->{e['target_db']}  {e['key']}  "
                         f"{e['detail']}")
    lines.append("consistent   " + ("yes" if result["consistent"] else "no"))
    return "\n".join(lines)
