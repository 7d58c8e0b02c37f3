"""Check that a task can run before it starts: reachability, versions, permissions, room.

``run_prechecks`` opens one connection per side, reads INFO (and CONFIG GET where the user
may), and runs every check concurrently; the only deliberate wait is the ~1 s sample of the
source's write rate for incremental tasks. A check never raises: an unexpected reply or a
refused command becomes a ``warning`` or ``error`` with the reason. Nothing is written to
either server. Probing PSYNC permission on a Redis < 7.0 source queues ``PSYNC`` inside a
MULTI that is discarded (never executed); a refusal leaves an entry in its ACL LOG.
The ``identity`` check tells source and target apart by what they are (run_id,
replication ids, replica links, resolved addresses), not by how their addresses are
spelled: ``127.0.0.1:6379`` and ``localhost:6379`` are one server.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import hiredis

from . import sentinel
from .compat import (
    ServerVersion,
    choose_write_mode,
    server_version,
    stream_fixes,
)
from .compat import parse_version as parse_version
from .compat import rdb_version as rdb_version
from .errors import CdcdError
from .identity import resolve_async
from .readers.rdbfile import RdbFileError, RdbFileInfo
from .readers.rdbfile import inspect as inspect_rdb_file
from .resp import Arg, Connection, ReplyError, keyspace, parse_info
from .scope import writes_db
from .spec import Endpoint, TaskSpec
from .topology import HostMapping, Topology, check_reachable, discover

log = logging.getLogger("cdcd.precheck")

Status = Literal["ok", "warning", "error"]
_RANK: dict[str, int] = {"ok": 0, "warning": 1, "error": 2}

CONNECT_TIMEOUT = 5.0
COMMAND_TIMEOUT = 5.0
BACKLOG_SAMPLE_S = 1.0
BACKLOG_MIN_SECONDS = 60       # warn when the backlog holds fewer seconds of writes
BACKLOG_ADVISE_SECONDS = 300   # suggest a backlog holding this many seconds
MEMORY_MARGIN = 0.10           # warn when the copy would leave less than this headroom
PREFIX_SCAN_LIMIT = 100_000    # count prefix-filtered target keys only in dbs this small
MIB = 1 << 20

# Configs read with CONFIG GET when the user may; INFO covers the rest.
_CONFIGS = ("rdb-version-check", "min-replicas-to-write", "stop-writes-on-bgsave-error",
            "repl-backlog-size")


@dataclass(frozen=True, kw_only=True)
class Check:
    """One precheck result; ``status`` is ok, warning (the task can run) or error."""

    name: str
    status: Status
    message: str

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "status": self.status, "message": self.message}


def worst(checks: Sequence[Check]) -> Status:
    """Return the most severe status among ``checks`` (ok when empty)."""
    status: Status = "ok"
    for c in checks:
        if _RANK[c.status] > _RANK[status]:
            status = c.status
    return status


def failed(checks: Sequence[Check]) -> bool:
    """Say whether any check is an error (the task must not start)."""
    return any(c.status == "error" for c in checks)


# --- versions -------------------------------------------------------------------------------

def dump_compatibility(source: ServerVersion, target: ServerVersion,
                       write_mode: str = "auto") -> Check:
    """Say how the task will write values (``write_mode``) and why: RESTORE of the
    source's DUMP payloads where the target accepts them, else values as commands."""
    name = "dump_compatibility"
    plan, error = choose_write_mode(write_mode, f"source {source.label}", source.rdb, target)
    if error:
        return Check(name=name, status="error", message=error)
    if source.rdb is None or target.rdb is None:
        return Check(name=name, status="warning", message=f"write_mode {plan.mode}: "
                                                          f"{plan.reason}")
    return Check(name=name, status="ok", message=f"write_mode {plan.mode}: {plan.reason}")


# --- one side -------------------------------------------------------------------------------

class _Side:
    """One endpoint under test: its connection, INFO and readable configs.

    A lock serialises commands on the shared connection; a timeout marks the connection
    broken (replies would no longer line up), so later commands fail fast.
    """

    def __init__(self, role: str, ep: Endpoint, command_timeout: float) -> None:
        self.role = role
        self.ep = ep
        self.timeout = command_timeout
        self.host, self.port = ep.addrs[0] if ep.addrs else ("?", 0)
        self.conn: Connection | None = None
        self.lock = asyncio.Lock()
        self.broken = ""
        self.connect_error = ""
        self.user = ep.username or "default"
        self.info: dict[str, str] = {}
        self.info_error = ""
        self.info_refusal = ""
        self.hello: dict[str, str] = {}     # HELLO 2: server, version, mode, role
        self.config: dict[str, str] = {}
        self.tls = ""                       # TLS version and cipher of the link

    @property
    def name(self) -> str:
        return f"{self.role} {self.host}:{self.port}"

    @property
    def up(self) -> bool:
        return self.conn is not None

    async def pipeline(self, commands: Sequence[Sequence[Arg]]) -> list[Any]:
        """Run commands; error replies come back as ReplyError values."""
        if self.conn is None:
            raise CdcdError(f"{self.name}: not connected")
        if self.broken:
            raise CdcdError(self.broken)
        async with self.lock:
            try:
                async with asyncio.timeout(self.timeout):   # not wait_for: see resp.py
                    return await self.conn.pipeline(commands)
            except TimeoutError:
                first = " ".join(str(a) for a in commands[0][:2]) if commands else "?"
                self.broken = f"{self.name}: no reply to {first} within {self.timeout:g}s"
                raise CdcdError(self.broken) from None
            except hiredis.ProtocolError as exc:
                self.broken = f"{self.name}: does not speak the Redis protocol ({exc})"
                raise CdcdError(self.broken) from None

    async def connect(self, timeout: float) -> None:
        """Open, authenticate and read INFO/CONFIG; record failures instead of raising."""
        try:
            self.conn = await self._open(timeout)
            self.tls = self.conn.tls
            replies = await self.pipeline([["PING"], ["INFO"], ["HELLO", "2"]]
                                          + [["CONFIG", "GET", c] for c in _CONFIGS])
            self._load(replies)
        except CdcdError as exc:
            self.connect_error = self._explain(exc)
        except hiredis.ProtocolError as exc:   # raised by AUTH inside Connection.open
            self.connect_error = f"{self.name}: does not speak the Redis protocol ({exc})"
        except Exception as exc:  # an odd reply: report it, never crash the precheck
            log.exception("precheck: %s: unexpected reply", self.name)
            self.connect_error = f"{self.name}: unexpected reply: {type(exc).__name__}: {exc}"
        if self.connect_error:
            await self.close()

    async def _open(self, timeout: float) -> Connection:
        """The first address that answers (a cluster's seeds: any node will do)."""
        first: CdcdError | None = None
        for host, port in self.ep.addrs:
            try:
                conn = await Connection.open(host, port, role=self.role, ep=self.ep,
                                             timeout=timeout)
            except CdcdError as exc:
                first = first or exc
                continue
            self.host, self.port = host, port
            return conn
        assert first is not None
        raise first

    def _load(self, replies: list[Any]) -> None:
        """Take PING, INFO, HELLO and CONFIG GET replies in."""
        ping, info = replies[0], replies[1]
        if isinstance(ping, ReplyError):
            text = str(ping)
            if text.startswith("NOAUTH"):
                text += f"; set {self.role}.password"
            self.connect_error = f"{self.name}: {text}"
            return
        if isinstance(info, ReplyError):
            self.info_refusal = str(info)
            self.info_error = f"{self.name}: INFO refused: {info}"
        else:
            self.info = parse_info(info)
        hello = replies[2]
        if isinstance(hello, list):     # HELLO works for any user on Redis 6+/Valkey
            self.hello = {_text(k): _text(v) for k, v in zip(hello[0::2], hello[1::2])
                          if not isinstance(v, list)}
        for cfg, reply in zip(_CONFIGS, replies[3:]):
            if isinstance(reply, list) and len(reply) >= 2:
                self.config[cfg] = _text(reply[1])

    def _explain(self, exc: CdcdError) -> str:
        """Name the cause of a failed connect in words an operator recognises."""
        cause = exc.__cause__
        if isinstance(cause, ConnectionRefusedError):
            return (f"{self.name}: cannot connect: connection refused (nothing listens on "
                    f"port {self.port})")
        if isinstance(cause, socket.gaierror):
            return f"{self.name}: cannot resolve host {self.host!r}: {cause.strerror or cause}"
        if isinstance(cause, OSError) and cause.errno and not cause.strerror:
            return f"{self.name}: cannot connect: {os.strerror(cause.errno)}"
        return exc.message

    async def close(self) -> None:
        if self.conn is not None:
            conn, self.conn = self.conn, None
            await conn.aclose()

    def need_info(self, *fields: str) -> list[str]:
        """Return the INFO values, or raise with a readable reason when they are missing."""
        if self.info_error:
            raise CdcdError(self.info_error)
        missing = [f for f in fields if f not in self.info]
        if missing:
            raise CdcdError(f"{self.name}: INFO lacks {', '.join(missing)}")
        return [self.info[f] for f in fields]

    def version(self) -> ServerVersion:
        """Read the version from INFO, or from HELLO when INFO is refused."""
        if not self.info_error:
            return server_version(self.info)
        if "version" in self.hello:
            fake = {"redis_version": self.hello["version"]}
            if self.hello.get("server") == "valkey":
                fake.update(server_name="valkey", valkey_version=self.hello["version"])
            return server_version(fake)
        raise CdcdError(self.info_error)

    def replication_role(self) -> str:
        """Return 'master' or the replica role, from INFO or else HELLO."""
        if not self.info_error:
            return self.need_info("role")[0]
        if "role" in self.hello:
            return self.hello["role"]
        raise CdcdError(self.info_error)


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _int(value: str | None, default: int = 0) -> int:
    try:
        return int(value) if value is not None else default
    except ValueError:
        return default


def _size(n: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", MIB), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


# --- checks ---------------------------------------------------------------------------------

CheckFn = Callable[[], Awaitable[Check]]


async def _guard(name: str, fn: CheckFn) -> Check:
    """Run one check; turn any failure (refused command, odd reply, bug) into a Check."""
    try:
        return await fn()
    except CdcdError as exc:
        return Check(name=name, status="error", message=exc.message)
    except Exception as exc:  # a bug or a reply we did not foresee: report, do not crash
        log.exception("precheck %s failed", name)
        return Check(name=name, status="error",
                     message=f"check failed unexpectedly: {type(exc).__name__}: {exc}")


def _connection_check(side: _Side) -> Check:
    name = f"{side.role}.connection"
    if side.connect_error:
        return Check(name=name, status="error", message=side.connect_error)
    who = f"as user '{side.user}'" if side.ep.password or side.ep.username else "without AUTH"
    extra = " (first of several addresses)" if len(side.ep.addrs) > 1 else ""
    if side.info_error:
        return Check(name=name, status="warning",
                     message=f"{side.name} reachable {who}{extra}, but INFO is refused "
                             f"({side.info_refusal}): checks that need it fail")
    return Check(name=name, status="ok", message=f"{side.name} reachable {who}{extra}")


async def _tls_check(side: _Side) -> Check:
    """Say how the link is protected: ok when the server's certificate was verified, a
    warning when ``tls_skip_verify`` leaves the server unauthenticated."""
    name = f"{side.role}.tls"
    ep = side.ep
    link = f"{side.name}: {side.tls or 'TLS'}"
    if ep.tls_skip_verify:
        return Check(name=name, status="warning",
                     message=f"{link}, but tls_skip_verify is set: the certificate and host "
                             f"name are not checked, so anyone on the path can pose as the "
                             f"server; give tls_ca_file instead")
    who = ep.tls_server_name or side.host
    ca = f"tls_ca_file {ep.tls_ca_file}" if ep.tls_ca_file else "the system's CAs"
    client = ", client certificate sent" if ep.tls_cert_file else ""
    return Check(name=name, status="ok",
                 message=f"{link}, certificate verified for '{who}' against {ca}{client}")


async def _version_check(side: _Side) -> Check:
    name = f"{side.role}.version"
    v = side.version()
    if v.rdb is None:
        return Check(name=name, status="warning",
                     message=f"{side.name} runs {v.label}: unknown version")
    return Check(name=name, status="ok", message=f"{side.name} runs {v.label}")


async def _dump_check(src: _Side, dst: _Side, write_mode: str) -> Check:
    c = dump_compatibility(src.version(), dst.version(), write_mode)
    if c.status == "ok" and c.message.startswith("write_mode rewrite"):
        c = field_ttl_check(c, src.info)
    if c.status == "ok":
        return c
    return dataclasses.replace(c, message=f"{src.name} -> {dst.name}: {c.message}")


def field_ttl_check(c: Check, info: dict[str, str]) -> Check:
    """With values to rewrite, a source holding hashes with field TTLs (Redis 7.4+: INFO
    keyspace ``subexpiry``) cannot be copied: no command written rebuilds them."""
    held = {db: n for db, n in keyspace(info, "subexpiry").items() if n}
    if not held:
        return c
    where = ", ".join(f"{n} in db {db}" for db, n in sorted(held.items()))
    return Check(name=c.name, status="error",
                 message=f"{c.message}; but the source holds hashes with field TTLs ({where}), "
                         f"which write_mode rewrite cannot write yet: use a target that "
                         f"accepts the source's DUMP payloads")


async def _rdb_file_check(path: str) -> tuple[RdbFileInfo | None, Check]:
    """Open the backup file a task copies and read its header."""
    name = "source.rdb_file"
    try:
        info = await asyncio.to_thread(inspect_rdb_file, path)
    except RdbFileError as exc:
        return None, Check(name=name, status="error", message=f"source: {exc}")
    return info, Check(name=name, status="ok", message=f"source: {info.label}")


async def _file_dump_check(file: RdbFileInfo, dst: _Side, write_mode: str) -> Check:
    """How the file's values will be written, as for a server source."""
    target = dst.version()
    plan, error = choose_write_mode(write_mode, file.label, file.version, target)
    if error:
        return Check(name="dump_compatibility", status="error", message=error)
    return Check(name="dump_compatibility", status="ok",
                 message=f"write_mode {plan.mode}: {plan.reason}")


async def _functions_check(src: _Side, dst: _Side, spec: TaskSpec) -> Check:
    """Say whether the source's function libraries can be copied: a target older than
    Redis 7.0 has no functions (an error listing them, unless ``functions`` is skip)."""
    name = "source.functions"
    reply = (await src.pipeline([["FUNCTION", "LIST"]]))[0]
    if reply.__class__ is ReplyError:
        if "unknown command" in str(reply).lower():
            return Check(name=name, status="ok", message=f"{src.name} has no functions "
                                                         f"(before Redis 7.0)")
        return Check(name=name, status="warning",
                     message=f"{src.name}: FUNCTION LIST failed ({reply}): cannot tell "
                             f"whether it holds function libraries")
    libraries = sorted(_library_name(lib) for lib in reply or [])
    if not libraries:
        return Check(name=name, status="ok", message=f"{src.name} holds no function library")
    listed = ", ".join(libraries[:20]) + (f" and {len(libraries) - 20} more"
                                          if len(libraries) > 20 else "")
    held = f"{src.name} holds {len(libraries)} function libraries ({listed})"
    if spec.functions == "skip":
        return Check(name=name, status="warning",
                     message=f"{held}: not copied (functions is skip)")
    target = dst.version()
    if b"function" in stream_fixes(target):
        return Check(name=name, status="error",
                     message=f"{held}, and target {target.label} has no functions (FUNCTION "
                             f"needs Redis 7.0): upgrade the target, or set \"functions\": "
                             f"\"skip\" to copy the data without them")
    if spec.reader == "scan":
        return Check(name=name, status="warning",
                     message=f"{held}: the scan reader does not copy functions (the psync "
                             f"reader does)")
    return Check(name=name, status="ok", message=f"{held}: copied")


def _library_name(lib: Any) -> str:
    """The name in one FUNCTION LIST entry (a flat list of field, value ...)."""
    if isinstance(lib, list):
        for i in range(0, len(lib) - 1, 2):
            if lib[i] == b"library_name":
                return bytes(lib[i + 1]).decode(errors="replace")
    return "?"


_NO_REPLID = "0" * 40


def _replids(info: dict[str, str]) -> set[str]:
    """Return the replication ids a server carries now (master_replid) and carried until
    its last switch of history (master_replid2), leaving out the all-zero placeholder."""
    return {v for v in (info.get("master_replid"), info.get("master_replid2"))
            if v and v != _NO_REPLID}


async def _replicas_of(side: _Side) -> set[tuple[str, int]]:
    """Return the (IP, port) of the replicas ``side`` lists (INFO replication slaveN)."""
    out: set[tuple[str, int]] = set()
    for k, v in side.info.items():
        if k.startswith("slave") and k[5:].isdigit():
            fields = dict(p.split("=", 1) for p in v.split(",") if "=" in p)
            port = _int(fields.get("port"), -1)
            if fields.get("ip") and port > 0:
                out |= await resolve_async([(fields["ip"], port)])
    return out


async def _master_of(side: _Side) -> frozenset[tuple[str, int]]:
    """Return the (IP, port) ``side`` replicates from, or nothing when it is a master."""
    host, port = side.info.get("master_host"), _int(side.info.get("master_port"), -1)
    if side.info.get("role", "master") == "master" or not host or port <= 0:
        return frozenset()
    return await resolve_async([(host, port)])


async def _identity_check(src: _Side, dst: _Side) -> Check:
    """Refuse a source and target that are one server under two names, or that belong to
    one replication group: writing the target would then write the source (an endless
    loop for an incremental task) or a replica of it."""
    name = "identity"
    src_at, dst_at = await asyncio.gather(resolve_async(src.ep.addrs),
                                          resolve_async(dst.ep.addrs))
    src_id, dst_id = src.info.get("run_id", ""), dst.info.get("run_id", "")
    both = f"{src.name} and {dst.name}"
    if src_id and src_id == dst_id:
        return Check(name=name, status="error",
                     message=f"{both} are the same server (run_id {src_id}); point the target "
                             f"at another server")
    common = src_at & dst_at
    if common:
        ip, port = sorted(common)[0]
        return Check(name=name, status="error",
                     message=f"{both} are the same server (both reach {ip}:{port}); point the "
                             f"target at another server")
    if src.info_error or dst.info_error:
        return Check(name=name, status="warning",
                     message=f"cannot tell whether {both} are distinct servers in distinct "
                             f"replication groups: "
                             + "; ".join(e for e in (src.info_error, dst.info_error) if e))
    group = ("writing the target would write the source's replication group (a loop for "
             "an incremental task); point the target at a server outside it")
    dst_replid = dst.info.get("master_replid", "")
    if dst_replid and dst_replid in _replids(src.info):
        whose = ("the source's" if dst_replid == src.info.get("master_replid") else
                 "the source's master_replid2, the history it had before its promotion")
        return Check(name=name, status="error",
                     message=f"{both} share a replication group (target master_replid "
                             f"{dst_replid} is {whose}): {group}")
    if (await _master_of(dst)) & src_at or (await _replicas_of(src)) & dst_at:
        return Check(name=name, status="error",
                     message=f"{dst.name} is a replica of {src.name}: {group}")
    if (await _master_of(src)) & dst_at or (await _replicas_of(dst)) & src_at:
        return Check(name=name, status="error",
                     message=f"{src.name} is a replica of {dst.name}: {group}")
    return Check(name=name, status="ok",
                 message=f"{both} are distinct servers (run_id {src_id or '?'} and "
                         f"{dst_id or '?'}) in distinct replication groups")


def _dryrun_verdict(reply: Any) -> tuple[str, str]:
    """Classify an ACL DRYRUN reply: ('allowed'|'refused'|'unknown', reason)."""
    if isinstance(reply, ReplyError):
        text = str(reply)
        low = text.lower()
        if "not found" in low and "command" in low:
            return "refused", text          # renamed or disabled command
        return "unknown", text              # no DRYRUN (< 7.0) or no right to run it
    text = _text(reply)
    if text == "OK":
        return "allowed", ""
    return "refused", text


def _multi_verdict(replies: list[Any]) -> tuple[str, str]:
    """Classify MULTI / PSYNC / DISCARD: PSYNC is ACL-checked when queued, never run."""
    if len(replies) < 2 or isinstance(replies[0], ReplyError):
        return "unknown", _text(replies[0]) if replies else "no reply"
    queued = replies[1]
    if not isinstance(queued, ReplyError):
        return ("allowed", "") if _text(queued) == "QUEUED" else ("unknown", _text(queued))
    text = str(queued)
    low = text.lower()
    if low.startswith("noperm") or "no permissions" in low or "unknown command" in low:
        return "refused", text
    return "unknown", text


async def _psync_check(src: _Side, reader: str) -> Check:
    """Ask whether the source lets our user run PSYNC (and REPLCONF) without running it.

    Redis 7.0+/Valkey: ``ACL DRYRUN``. Older servers, or a user not allowed DRYRUN: queue
    PSYNC in a MULTI and DISCARD it, since ACLs are checked at queue time on Redis < 7.0
    (7.0+ rejects PSYNC inside MULTI before the ACL check: inconclusive there).
    """
    name = "source.psync"
    user = src.user
    replies = await src.pipeline([["ACL", "DRYRUN", user, "PSYNC", "?", "-1"],
                                  ["ACL", "DRYRUN", user, "REPLCONF", "listening-port", "0"]])
    verdicts = [_dryrun_verdict(r) for r in replies]
    how = "ACL DRYRUN"
    if any(v[0] == "unknown" for v in verdicts):
        first_unknown = next(v[1] for v in verdicts if v[0] == "unknown")
        verdict = _multi_verdict(await src.pipeline([["MULTI"], ["PSYNC", "?", "-1"],
                                                     ["DISCARD"]]))
        how = "PSYNC queued in a discarded MULTI"
        if verdict[0] == "unknown":
            verdict = ("unknown", f"ACL DRYRUN: {first_unknown}; MULTI probe: {verdict[1]}")
    else:
        verdict = next((v for v in verdicts if v[0] == "refused"), verdicts[0])
    status, reason = verdict
    if status == "allowed":
        return Check(name=name, status="ok",
                     message=f"{src.name} allows PSYNC for user '{user}' (checked with {how})")
    if status == "unknown":
        return Check(name=name, status="warning",
                     message=f"cannot verify that {src.name} allows PSYNC for user '{user}' "
                             f"({reason}); the task finds out when it starts"
                             + ("; reader auto will fall back to scan" if reader == "auto"
                                else ""))
    if reader == "auto":
        return Check(name=name, status="warning",
                     message=f"{src.name} refuses PSYNC for user '{user}' ({reason}); "
                             f"reader auto will fall back to scan")
    return Check(name=name, status="error",
                 message=f"{src.name} refuses PSYNC for user '{user}' ({reason}); grant "
                         f"+psync +replconf to the user or set reader to scan")


# The commands the scan reader runs on the source, with what refusing one costs (None:
# the reader cannot work without it).
_SCAN_COMMANDS: tuple[tuple[list[str], str | None], ...] = (
    (["SCAN", "0"], None), (["DUMP", "cdcd-precheck"], None),
    (["PTTL", "cdcd-precheck"], None), (["INFO", "keyspace"], None),
    (["MEMORY", "USAGE", "cdcd-precheck"],
     "big keys would be copied with one whole DUMP instead of in chunks"),
    (["GETRANGE", "cdcd-precheck", "0", "1"], "every string would be sized and dumped (slower)"))


async def _scan_check(src: _Side) -> Check:
    """Ask (ACL DRYRUN) whether the source lets our user run the scan reader's commands."""
    name = "source.scan"
    user = src.user
    replies = await src.pipeline([["ACL", "DRYRUN", user, *c] for c, _ in _SCAN_COMMANDS])
    verdicts = [_dryrun_verdict(r) for r in replies]
    unknown = next((why for v, why in verdicts if v == "unknown"), None)
    refused = [(c[0], why, cost) for (c, cost), (v, why) in zip(_SCAN_COMMANDS, verdicts)
               if v == "refused"]
    needed = [(c, why) for c, why, cost in refused if cost is None]
    if needed:
        return Check(name=name, status="error",
                     message=f"{src.name} refuses " + "; ".join(f"{c} ({why})" for c, why in needed)
                             + f" for user '{user}', which the scan reader needs")
    if refused:
        return Check(name=name, status="warning",
                     message=f"{src.name} refuses " + "; ".join(
                         f"{c} ({why}): {cost}" for c, why, cost in refused))
    if unknown is not None:
        return Check(name=name, status="warning",
                     message=f"cannot verify that {src.name} allows SCAN, DUMP and PTTL for "
                             f"user '{user}' ({unknown}); the task finds out when it starts")
    return Check(name=name, status="ok",
                 message=f"{src.name} allows the scan reader's commands for user '{user}'")


async def _writable_check(dst: _Side) -> Check:
    """Require a master that accepts writes: not a replica, no unmet min-replicas, no
    MISCONF, and (when ACL DRYRUN is allowed) a user that may RESTORE, DEL and MSET."""
    name = "target.writable"
    role = dst.replication_role()
    if role != "master":
        master = ""
        if "master_host" in dst.info:
            master = f" of {dst.info['master_host']}:{dst.info.get('master_port', '?')}"
        ro = dst.info.get("slave_read_only", dst.info.get("replica_read_only"))
        ro_text = "read-only " if ro == "1" else ""
        return Check(name=name, status="error",
                     message=f"{dst.name} is a {ro_text}replica{master} (role {role}): writes "
                             f"would be refused or overwritten by its master; point the task at "
                             f"a master")
    problems: list[str] = []
    min_replicas = _int(dst.config.get("min-replicas-to-write"))
    if min_replicas > 0:
        good = _int(dst.info.get("min_slaves_good_slaves"),
                    _int(dst.info.get("connected_slaves")))
        if good < min_replicas:
            problems.append(f"min-replicas-to-write is {min_replicas} but only {good} "
                            f"replicas are in sync (writes fail with NOREPLICAS)")
    if (dst.info.get("rdb_last_bgsave_status") == "err"
            and dst.config.get("stop-writes-on-bgsave-error", "yes") == "yes"):
        problems.append("the last background save failed and stop-writes-on-bgsave-error is "
                        "yes (writes fail with MISCONF)")
    if problems:
        return Check(name=name, status="error", message=f"{dst.name}: " + "; ".join(problems))
    replies = await dst.pipeline([["ACL", "DRYRUN", dst.user, "RESTORE", "cdcd-precheck", "0",
                                   "x", "REPLACE"],
                                  ["ACL", "DRYRUN", dst.user, "DEL", "cdcd-precheck"],
                                  ["ACL", "DRYRUN", dst.user, "MSET", "cdcd-precheck", "x"]])
    for reply in replies:
        verdict, reason = _dryrun_verdict(reply)
        if verdict == "refused":
            low = reason.lower()
            if "access" in low and "key" in low:
                return Check(name=name, status="warning",
                             message=f"{dst.name} is a writable master, but user '{dst.user}' "
                                     f"may not write every key: {reason}")
            return Check(name=name, status="error",
                         message=f"{dst.name} is a master, but user '{dst.user}' may not "
                                 f"write: {reason}")
    return Check(name=name, status="ok", message=f"{dst.name} is a writable master")


# Kept under this name for its callers; cdcd.scope is where the write scope is known.
_writes_db = writes_db


async def _count_matching(dst: _Side, spec: TaskSpec, db: int) -> int:
    """Count the keys of target db ``db`` that pass the spec's prefix filter.

    Each SCAN runs between SELECT db and SELECT 0 in one pipeline, so the shared
    connection stays in db 0 for the other checks.
    """
    cursor: Any = b"0"
    n = 0
    while True:
        replies = await dst.pipeline([["SELECT", db], ["SCAN", cursor, "COUNT", 1000],
                                      ["SELECT", 0]])
        reply = replies[1] if not isinstance(replies[0], ReplyError) else replies[0]
        if isinstance(reply, ReplyError):
            raise CdcdError(f"{dst.name}: cannot count keys in db {db}: {reply}")
        cursor, keys = reply[0], reply[1]
        n += sum(1 for k in keys if spec.filter.key_ok(k))
        if cursor in (b"0", 0, "0"):
            return n


async def _existing_keys_check(dst: _Side, spec: TaskSpec) -> Check:
    name = "target.existing_keys"
    if dst.info_error:
        raise CdcdError(dst.info_error)
    held = {db: n for db, n in keyspace(dst.info).items() if n and _writes_db(spec, db)}
    if spec.filter.by_key:
        for db, n in list(held.items()):
            if n <= PREFIX_SCAN_LIMIT:
                held[db] = await _count_matching(dst, spec, db)
        held = {db: n for db, n in held.items() if n}
        what = "keys matching the task's prefix filter"
    else:
        what = "keys"
    if not held:
        return Check(name=name, status="ok",
                     message=f"{dst.name} holds no {what} in the databases the task writes")
    detail = ", ".join(f"db {db} holds {n} {what}" for db, n in sorted(held.items()))
    if spec.existing_keys == "fail":
        return Check(name=name, status="error",
                     message=f"{dst.name} is not empty ({detail}) and existing_keys is 'fail': "
                             f"empty those databases or choose existing_keys replace/skip")
    if spec.existing_keys == "replace":
        return Check(name=name, status="warning",
                     message=f"{dst.name} is not empty ({detail}); keys the source also holds "
                             f"will be overwritten (existing_keys is 'replace')")
    return Check(name=name, status="ok",
                 message=f"{dst.name} is not empty ({detail}); existing keys will be kept "
                         f"(existing_keys is 'skip')")


async def _memory_check(src: _Side, dst: _Side, spec: TaskSpec) -> Check:
    name = "target.memory"
    (src_used,) = (int(v) for v in src.need_info("used_memory"))
    dst_max, dst_used = (int(v) for v in dst.need_info("maxmemory", "used_memory"))
    filtered = spec.filter.by_key or spec.filter.dbs is not None
    scope = " (whole source, before filters)" if filtered else ""
    if dst_max <= 0:
        return Check(name=name, status="ok",
                     message=f"{dst.name} has no maxmemory limit; source uses "
                             f"{_size(src_used)}")
    headroom = dst_max - dst_used
    text = (f"source uses {_size(src_used)}{scope}; {dst.name} has {_size(max(headroom, 0))} "
            f"free of maxmemory {_size(dst_max)}")
    if src_used > headroom:
        return Check(name=name, status="error",
                     message=f"{text}: the copy does not fit; raise the target's maxmemory "
                             f"or free memory")
    if src_used > headroom * (1 - MEMORY_MARGIN):
        return Check(name=name, status="warning",
                     message=f"{text}: less than {MEMORY_MARGIN:.0%} would remain free")
    return Check(name=name, status="ok", message=text)


async def _eviction_check(dst: _Side) -> Check:
    name = "target.eviction_policy"
    (policy,) = dst.need_info("maxmemory_policy")
    if policy == "noeviction":
        return Check(name=name, status="ok", message=f"{dst.name} never evicts keys "
                                                     f"(maxmemory-policy noeviction)")
    limit = _int(dst.info.get("maxmemory"))
    when = "when it reaches maxmemory" if limit else "once a maxmemory is set"
    return Check(name=name, status="warning",
                 message=f"{dst.name} evicts keys {when} (maxmemory-policy {policy}): migrated "
                         f"keys may silently disappear; prefer noeviction")


def is_cluster_side(side: _Side) -> bool:
    return len(side.ep.addrs) > 1 or side.info.get("cluster_enabled") == "1"


async def _reachable_cluster(ep: Endpoint, role: str) -> Topology:
    """A cluster side's shape, every master connected to once (after host mapping)."""
    topo = await discover(ep, HostMapping(ep.host_mapping), role=role,
                          timeout=CONNECT_TIMEOUT)
    await check_reachable(topo, ep, role=role, timeout=CONNECT_TIMEOUT)
    return topo


def _uncovered(topo: Topology) -> str:
    gaps = ", ".join(f"{a}-{b}" for a, b in topo.uncovered()[:5])
    return f"slots {gaps} are served by no master"


async def _cluster_target_check(src: _Side, dst: _Side, spec: TaskSpec, fresh: bool) -> Check:
    """A Redis Cluster target: every master reachable after host mapping
    and a master, cluster_state ok everywhere, all 16384 slots served, every source db
    with keys mapped to db 0, existing keys per existing_keys, maxmemory headroom per
    master for its share of the source."""
    name = "target.topology"
    try:
        topo = await _reachable_cluster(spec.target, "target")
    except CdcdError as exc:
        return Check(name=name, status="error", message=exc.message)
    problems: list[str] = []
    if topo.uncovered():
        problems.append(_uncovered(topo))
    held = 0
    for node in topo.masters:
        conn = await Connection.open(*node.dial, role="target", ep=spec.target,
                                     timeout=CONNECT_TIMEOUT)
        try:
            state = parse_info(await conn.call("CLUSTER", "INFO", timeout=COMMAND_TIMEOUT))
            info = parse_info(await conn.call("INFO", timeout=COMMAND_TIMEOUT))
        finally:
            conn.close()
        if state.get("cluster_state") != "ok":
            problems.append(f"{node.name} says cluster_state:{state.get('cluster_state')}")
        if info.get("role") != "master":
            problems.append(f"{node.name} is not a master (role {info.get('role')})")
        held += keyspace(info).get(0, 0)
        limit = _int(info.get("maxmemory"))
        share = _int(src.info.get("used_memory")) / max(1, len(topo.masters))
        if limit and share > limit - _int(info.get("used_memory")):
            problems.append(f"{node.name} has {_size(limit - _int(info.get('used_memory')))} "
                            f"free of maxmemory {_size(limit)}, less than its share of the "
                            f"source ({_size(share)})")
    unmapped = sorted(db for db, n in keyspace(src.info).items()
                      if n and spec.filter.db_ok(db) and spec.target_db(db) != 0)
    if unmapped:
        problems.append(f"source db {', '.join(map(str, unmapped))} hold keys but a cluster "
                        f"has db 0 only: map them with db_mapping (e.g. "
                        f"{{\"{unmapped[0]}\": 0}}) or leave them out with filter.dbs")
    if fresh and held and spec.existing_keys == "fail":
        problems.append(f"the cluster holds {held} keys and existing_keys is 'fail'")
    if problems:
        return Check(name=name, status="error", message=f"{dst.name} (Redis Cluster): "
                     + "; ".join(problems))
    shards = "; ".join(f"{s.master.name} slots {s.slots_text()}" for s in topo.shards)
    return Check(name=name, status="ok",
                 message=f"Redis Cluster of {len(topo.masters)} masters: {shards}")


async def _cluster_source_check(src: _Side, dst: _Side, spec: TaskSpec) -> Check:
    """A Redis Cluster source: read with one psync link per master (or a replica of
    each); every node read reachable after host mapping."""
    name = "source.topology"
    try:
        topo = await _reachable_cluster(spec.source, "source")
    except CdcdError as exc:
        return Check(name=name, status="error", message=exc.message)
    if topo.uncovered():
        return Check(name=name, status="error",
                     message=f"{src.name} (Redis Cluster): {_uncovered(topo)}")
    if spec.source.read_from == "replica" and spec.reader == "scan":
        return Check(name=name, status="error",
                     message="read_from: replica is for the psync reader (the scan reader "
                             "reads each cluster master)")
    if spec.source.read_from == "replica":
        bare = [s.master.name for s in topo.shards if not any(r.healthy for r in s.replicas)]
        if bare:
            return Check(name=name, status="error",
                         message=f"read_from is replica but the shards of {', '.join(bare)} "
                                 f"have no healthy replica")
        try:
            await check_reachable(topo, spec.source, role="source", timeout=CONNECT_TIMEOUT,
                                  nodes=[next(r for r in s.replicas if r.healthy)
                                         for s in topo.shards])
        except CdcdError as exc:
            return Check(name=name, status="error", message=exc.message)
        shards = "; ".join(f"{next(r for r in s.replicas if r.healthy).name} (replica of "
                           f"{s.master.name}) slots {s.slots_text()}" for s in topo.shards)
        return Check(name=name, status="ok",
                     message=f"Redis Cluster of {len(topo.masters)} masters, one psync link "
                             f"each to a replica: {shards}")
    shards = "; ".join(f"{s.master.name} slots {s.slots_text()}" for s in topo.shards)
    how = "one SCAN reader" if spec.reader == "scan" else "one psync link"
    return Check(name=name, status="ok",
                 message=f"Redis Cluster of {len(topo.masters)} masters, {how} each: {shards}")


async def _topology_check(side: _Side) -> Check:
    name = f"{side.role}.topology"
    if side.ep.read_from == "replica":
        return Check(name=name, status="error",
                     message="read_from: replica is for a cluster source's shards; to read "
                             "a standalone source from its replica, give the replica's "
                             "address")
    if len(side.ep.addrs) > 1:
        return Check(name=name, status="error",
                     message=f"{side.role} lists {len(side.ep.addrs)} addresses, i.e. a Redis "
                             f"Cluster: cluster not supported yet; give one standalone node")
    if side.info_error and "mode" not in side.hello:
        raise CdcdError(side.info_error)
    mode = side.info.get("redis_mode", side.info.get("server_mode",
                                                     side.hello.get("mode", "standalone")))
    if mode == "sentinel":
        return Check(name=name, status="error",
                     message=f"{side.name} is a Sentinel, not a data node; give the address of "
                             f"the master it monitors")
    if side.info.get("cluster_enabled") == "1" or mode == "cluster":
        return Check(name=name, status="error",
                     message=f"{side.name} is a Redis Cluster node (cluster_enabled:1): cluster "
                             f"not supported yet")
    return Check(name=name, status="ok", message=f"{side.name} is a standalone server")


async def _backlog_check(src: _Side, sample_s: float) -> Check:
    """Compare repl-backlog-size with about a second's worth of the source's writes.

    The write rate is the growth of ``master_repl_offset`` when a backlog exists; before
    any replica attached the offset does not move, so ``total_net_input_bytes`` (reads
    included) serves as an upper bound.
    """
    name = "source.repl_backlog"
    cmds: list[list[Arg]] = [["INFO", "replication"], ["INFO", "stats"]]
    first = await src.pipeline(cmds)
    t0 = time.monotonic()
    await asyncio.sleep(sample_s)
    second = await src.pipeline(cmds)
    elapsed = max(time.monotonic() - t0, 1e-3)
    for r in (*first, *second):
        if isinstance(r, ReplyError):
            raise CdcdError(f"{src.name}: INFO refused: {r}")
    a = {**parse_info(first[0]), **parse_info(first[1])}
    b = {**parse_info(second[0]), **parse_info(second[1])}
    size = _int(b.get("repl_backlog_size"), _int(src.config.get("repl-backlog-size"), -1))
    if size < 0:
        raise CdcdError(f"{src.name}: cannot read repl-backlog-size (INFO replication and "
                        f"CONFIG GET both lack it)")
    if b.get("repl_backlog_active") == "1" and a.get("repl_backlog_active") == "1":
        delta = _int(b.get("master_repl_offset")) - _int(a.get("master_repl_offset"))
        basis = "measured from master_repl_offset"
    else:
        delta = _int(b.get("total_net_input_bytes")) - _int(a.get("total_net_input_bytes"))
        basis = "estimated from network input, an upper bound: no replication backlog yet"
    rate = max(delta, 0) / elapsed
    if rate <= 0:
        return Check(name=name, status="ok",
                     message=f"repl-backlog-size is {_size(size)}; no writes seen on "
                             f"{src.name} during a {sample_s:g} s sample")
    seconds = size / rate
    text = (f"repl-backlog-size {size} bytes ({_size(size)}) holds about {seconds:.1f} s of "
            f"writes at {_size(rate)}/s ({basis})")
    if seconds < BACKLOG_MIN_SECONDS:
        advise = math.ceil(rate * BACKLOG_ADVISE_SECONDS / MIB) * MIB
        return Check(name=name, status="warning",
                     message=f"{text}: a reconnect after a longer gap forces a full resync; "
                             f"raise repl-backlog-size to {advise} bytes "
                             f"(CONFIG SET repl-backlog-size {advise})")
    return Check(name=name, status="ok", message=text)


# --- entry point ----------------------------------------------------------------------------

async def run_prechecks(spec: TaskSpec, *, fresh: bool = True,
                        connect_timeout: float = CONNECT_TIMEOUT,
                        command_timeout: float = COMMAND_TIMEOUT,
                        backlog_sample_s: float = BACKLOG_SAMPLE_S,
                        identity_out: dict[str, str | None] | None = None) -> list[Check]:
    """Check that ``spec`` can run; return every check in a stable order, never raise.

    ``fresh`` says the task has no checkpoint yet, so the target's existing keys matter.
    Checks on a side that cannot be reached (or authenticated) are left out: the
    connection check already says why. ``identity_out``, when given, receives
    ``source_run_id`` and ``target_run_id`` (INFO server; None when a side is unreachable
    or refuses INFO), so the caller learns which servers it checked.
    """
    unresolved: dict[str, str] = {}
    try:
        spec = dataclasses.replace(spec, source=await sentinel.resolve(spec.source, "source"))
    except CdcdError as exc:
        unresolved["source"] = exc.message
    try:
        spec = dataclasses.replace(spec, target=await sentinel.resolve(spec.target, "target"))
    except CdcdError as exc:
        unresolved["target"] = exc.message
    src = _Side("source", spec.source, command_timeout)
    dst = _Side("target", spec.target, command_timeout)
    file: RdbFileInfo | None = None
    first: list[Check] = []
    if spec.source.rdb_file:        # a backup file, not a server
        file, check = await _rdb_file_check(spec.source.rdb_file)
        first.append(check)
    try:
        async with asyncio.TaskGroup() as tg:
            for side in (src, dst):
                if side.role == "source" and spec.source.rdb_file:
                    continue
                if side.role in unresolved:
                    side.connect_error = unresolved[side.role]
                else:
                    tg.create_task(side.connect(connect_timeout))
        if identity_out is not None:
            identity_out["source_run_id"] = src.info.get("run_id") or None
            identity_out["target_run_id"] = dst.info.get("run_id") or None
        plan: list[tuple[str, CheckFn]] = []
        if src.up and dst.up:
            plan.append(("identity", lambda: _identity_check(src, dst)))
        if src.up and spec.source.tls:
            plan.append(("source.tls", lambda: _tls_check(src)))
        if dst.up and spec.target.tls:
            plan.append(("target.tls", lambda: _tls_check(dst)))
        if src.up:
            plan.append(("source.version", lambda: _version_check(src)))
        if dst.up:
            plan.append(("target.version", lambda: _version_check(dst)))
        if file is not None and dst.up:
            plan.append(("dump_compatibility",
                         lambda: _file_dump_check(file, dst, spec.write_mode)))
        if src.up and dst.up:
            plan.append(("dump_compatibility", lambda: _dump_check(src, dst, spec.write_mode)))
            plan.append(("source.functions", lambda: _functions_check(src, dst, spec)))
        if src.up and spec.reader in ("psync", "auto"):
            plan.append(("source.psync", lambda: _psync_check(src, spec.reader)))
        if src.up and spec.reader == "scan":
            plan.append(("source.scan", lambda: _scan_check(src)))
        if src.up and is_cluster_side(src):
            plan.append(("source.topology", lambda: _cluster_source_check(src, dst, spec)))
        elif src.up:
            plan.append(("source.topology", lambda: _topology_check(src)))
        if dst.up and src.up and is_cluster_side(dst):
            plan.append(("target.topology",
                         lambda: _cluster_target_check(src, dst, spec, fresh)))
        elif dst.up:
            plan.append(("target.topology", lambda: _topology_check(dst)))
        if dst.up and not is_cluster_side(dst):      # a cluster's masters: target.topology
            plan.append(("target.writable", lambda: _writable_check(dst)))
            if fresh:
                plan.append(("target.existing_keys", lambda: _existing_keys_check(dst, spec)))
        if src.up and dst.up and not is_cluster_side(dst):
            plan.append(("target.memory", lambda: _memory_check(src, dst, spec)))
        if dst.up:
            plan.append(("target.eviction_policy", lambda: _eviction_check(dst)))
        if src.up and spec.incremental and spec.reader != "scan":
            plan.append(("source.repl_backlog",
                         lambda: _backlog_check(src, backlog_sample_s)))
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(_guard(name, fn)) for name, fn in plan]
        first += [] if spec.source.rdb_file else [_connection_check(src)]
        return first + [_connection_check(dst)] + [t.result() for t in tasks]
    finally:
        await asyncio.gather(src.close(), dst.close())
