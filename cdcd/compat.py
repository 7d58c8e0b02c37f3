"""What differs between server versions, in tables: the DUMP payload version a server
writes and restores, and so how a task writes values (``write_mode``).

``restore`` sends each value as the source's DUMP payload (RESTORE: exact encodings, C
speed); a target refuses payloads of a newer RDB version than its own, and Valkey those of
Redis 7.4+. ``rewrite`` decodes each value in the daemon and writes it with commands any
version takes (SET, RPUSH, SADD, ZADD, HSET, XADD and the stream group commands,
PEXPIREAT). ``auto`` is ``restore`` where the target accepts the source's payloads and
``rewrite`` otherwise; the precheck and the task view say which and why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

WRITE_MODES = ("auto", "restore", "rewrite")


@dataclass(frozen=True, kw_only=True)
class ServerVersion:
    """What a server is: product, version and the RDB (DUMP payload) version it writes."""

    product: str                  # "redis" or "valkey"
    version: tuple[int, ...]
    text: str
    rdb: int | None

    @property
    def label(self) -> str:
        name = "Valkey" if self.product == "valkey" else "Redis"
        rdb = f"RDB {self.rdb}" if self.rdb is not None else "RDB version unknown"
        return f"{name} {self.text} ({rdb})"


def parse_version(text: str) -> tuple[int, ...]:
    """Turn '7.2.4' (or '7.2.4-rc1') into (7, 2, 4); non-numeric parts end the tuple."""
    out: list[int] = []
    for part in text.split("."):
        digits = ""
        for ch in part:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        out.append(int(digits))
        if len(digits) != len(part):
            break
    return tuple(out)


def rdb_version(product: str, version: tuple[int, ...]) -> int | None:
    """Return the RDB version a server writes in DUMP payloads, or None when unknown.

    Redis 5.0-6.2 = 9, 7.0 = 10, 7.2 = 11, 7.4-8.4 = 12, 8.6+ = 13;
    Valkey 7.2-8.x = 11, 9+ = 80.
    """
    if not version:
        return None
    if product == "valkey":
        return 80 if version >= (9,) else 11
    for floor, rdb in (((8, 6), 13), ((7, 4), 12), ((7, 2), 11), ((7, 0), 10), ((5, 0), 9),
                       ((4, 0), 8), ((3, 2), 7), ((2, 6), 6)):
        if version >= floor:
            return rdb
    return None


def server_version(info: dict[str, str]) -> ServerVersion:
    """Read the product and version from a parsed INFO server section."""
    if info.get("server_name", "").lower() == "valkey" or "valkey_version" in info:
        text = info.get("valkey_version") or info.get("redis_version", "")
        product = "valkey"
    else:
        text = info.get("redis_version", "")
        product = "redis"
    version = parse_version(text)
    return ServerVersion(product=product, version=version, text=text or "?",
                         rdb=rdb_version(product, version))


def accepts_dump(target: ServerVersion, source_rdb: int) -> bool:
    """Say whether ``target``'s RESTORE accepts payloads of ``source_rdb`` in strict mode.

    A server refuses versions above its own; Valkey also refuses the range 12-79 that
    Redis 7.4+ uses ("foreign" versions) unless ``rdb-version-check relaxed``.
    """
    if target.rdb is None:
        return False
    if target.product == "valkey" and 12 <= source_rdb <= 79:
        return False
    return source_rdb <= target.rdb


def dump_refusal(source_label: str, source_rdb: int | None, target: ServerVersion) -> str:
    """Why ``target`` refuses DUMP payloads of ``source_rdb`` ("" when it accepts them)."""
    if source_rdb is None or target.rdb is None:
        return ""
    if accepts_dump(target, source_rdb):
        return ""
    if target.product == "valkey" and 12 <= source_rdb <= 79:
        return (f"target {target.label} refuses DUMP payloads of RDB {source_rdb} from "
                f"{source_label} (Redis 7.4+ payloads are foreign to Valkey)")
    return (f"target {target.label} refuses DUMP payloads of RDB {source_rdb} from "
            f"{source_label} (its RESTORE takes RDB {target.rdb} and older)")


@dataclass(frozen=True, kw_only=True)
class WritePlan:
    """How a task writes snapshot values, why, and what its target takes."""

    mode: str                                 # "restore" or "rewrite"
    reason: str
    target: ServerVersion | None = None
    source: ServerVersion | None = None       # None: a file, or unknown

    @property
    def fixes(self) -> frozenset[bytes]:
        """Replicated commands to translate for the target (see ``translate``): those it
        lacks and the source has (a source never sends what it lacks itself)."""
        if self.source is None or self.target is None:
            return frozenset()
        return stream_fixes(self.target) - stream_fixes(self.source)

    @property
    def rewrite(self) -> bool:
        return self.mode == "rewrite"

    @property
    def stream_counters(self) -> bool:
        """The target takes a stream's entries-added, max-deleted-id and a group's
        entries-read (XSETID ENTRIESADDED/MAXDELETEDID, XGROUP CREATE ENTRIESREAD: 7.0+)."""
        t = self.target
        return t is None or not t.version or t.product == "valkey" or t.version >= (7, 0)

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "reason": self.reason}


RESTORE_PLAN = WritePlan(mode="restore", reason="")


def choose_write_mode(asked: str, source_label: str, source_rdb: int | None,
                      target: ServerVersion) -> tuple[WritePlan, str]:
    """Pick the write mode for ``asked`` (auto, restore, rewrite); return the plan and
    an error ("" when the task can run)."""
    refusal = dump_refusal(source_label, source_rdb, target)
    too_old = (f"target {target.label} is older than the commands write_mode rewrite uses "
               f"(SET ... PXAT, XGROUP CREATECONSUMER: Redis 6.2)"
               if target.product == "redis" and target.version and target.version < (6, 2)
               else "")
    if asked == "rewrite":
        return WritePlan(mode="rewrite", reason="asked for in the task spec",
                         target=target), too_old
    if source_rdb is None or target.rdb is None:
        plan = WritePlan(mode="restore", target=target,
                         reason=f"cannot tell whether target {target.label} accepts DUMP payloads "
                                f"from {source_label}: unknown RDB version")
        return plan, ""
    if not refusal:
        return WritePlan(mode="restore", target=target,
                         reason=f"target {target.label} accepts DUMP payloads from "
                                f"{source_label}"), ""
    if asked == "restore":
        return WritePlan(mode="restore", reason=refusal, target=target), (
            f"{refusal}, and write_mode is restore: use write_mode auto or rewrite (values "
            f"written as commands), or a target at least as new as {source_label}")
    if too_old:
        return WritePlan(mode="rewrite", reason=refusal, target=target), (
            f"{refusal}, and {too_old}: use a target of Redis 6.2 or newer")
    return WritePlan(mode="rewrite", target=target,
                     reason=f"{refusal}: values are written as commands"), ""


# --- the replication stream into an older target ---------------------------------------------
#
# Most replicated commands are effects any version takes: a source propagates LMPOP as
# LPOP/RPOP, ZMPOP as ZPOPMIN/ZPOPMAX, EXPIRE/GETEX/SET EX as PEXPIREAT/PERSIST/SET PXAT,
# XREADGROUP/XAUTOCLAIM as XCLAIM, scripts and functions as their writes (checked against
# Redis 7.0 and Valkey 8.1). What remains are commands and options a target may lack. A
# propagated command is one the source applied, so a condition it carries (NX/XX/GT/LT,
# IFEQ) held on the source, and so on its exact copy: dropping it keeps the effect.

# name -> (first Redis version that takes it as sent, first Valkey version; None: never)
_SINCE: dict[bytes, tuple[tuple[int, ...] | None, tuple[int, ...] | None]] = {
    b"pexpireat": ((7, 0), (7, 2)),     # NX | XX | GT | LT
    b"pexpire": ((7, 0), (7, 2)),
    b"expireat": ((7, 0), (7, 2)),
    b"expire": ((7, 0), (7, 2)),
    b"xgroup": ((7, 0), (7, 2)),        # CREATE/SETID ... ENTRIESREAD n
    b"xsetid": ((7, 0), (7, 2)),        # ENTRIESADDED n, MAXDELETEDID id
    b"spublish": ((7, 0), (7, 2)),
    b"function": ((7, 0), (7, 2)),
    b"set": (None, (8, 1)),             # IFEQ value (Valkey 8.1)
    b"hexpire": ((7, 4), (9, 0)),       # hash field TTLs
    b"hpexpire": ((7, 4), (9, 0)),
    b"hexpireat": ((7, 4), (9, 0)),
    b"hpexpireat": ((7, 4), (9, 0)),
    b"hpersist": ((7, 4), (9, 0)),
    b"hsetex": ((8, 0), (9, 0)),
    b"hgetex": ((8, 0), (9, 0)),
    b"hgetdel": ((8, 0), (9, 0)),
    b"delifeq": (None, (9, 0)),
}
_FLAGS = (b"nx", b"xx", b"gt", b"lt")


def stream_fixes(target: ServerVersion | None) -> frozenset[bytes]:
    """Names of replicated commands the target may not take as sent (lowercase)."""
    if target is None or not target.version:
        return frozenset()
    at = 1 if target.product == "valkey" else 0
    out = set()
    for name, since in _SINCE.items():
        first = since[at]
        if first is None or target.version < first:
            out.add(name)
    return frozenset(out)


class CommandRefused(Exception):
    """A replicated command the target has no equivalent for (the message says why)."""


def translate(args: list[bytes], target: ServerVersion) -> list[list[bytes]]:
    """Return the commands with the same effect that ``target`` takes (args of a name in
    ``stream_fixes(target)``), or raise CommandRefused naming what it lacks."""
    name = args[0].lower()
    if name in (b"pexpireat", b"pexpire", b"expireat", b"expire"):
        if len(args) > 3 and args[3].lower() in _FLAGS:
            return [args[:3]]
        return [args]
    if name == b"xgroup" and len(args) > 1 and args[1].lower() in (b"create", b"setid"):
        return [_drop_options(args, 5, {b"entriesread": 1})]   # XGROUP op key group id
    if name == b"xsetid":
        return [_drop_options(args, 3, {b"entriesadded": 1, b"maxdeletedid": 1})]
    if name == b"spublish" and len(args) == 3:
        return [[b"PUBLISH", args[1], args[2]]]   # no shard channels on the target
    if name == b"set":
        return [_drop_options(args, 3, {b"ifeq": 1})]
    what = {b"function": "functions (FUNCTION needs Redis 7.0)",
            b"delifeq": "DELIFEQ (Valkey 9.0)"}.get(name, "hash field TTLs / HSETEX, HGETEX, "
                                                         "HGETDEL (Redis 7.4 and 8.0)")
    raise CommandRefused(f"{target.label} has no {what}")


def _drop_options(args: list[bytes], start: int, options: dict[bytes, int]) -> list[bytes]:
    """Drop options (name: how many arguments follow it) from ``args[start:]``."""
    out = args[:start]
    i = start
    while i < len(args):
        skip = options.get(args[i].lower())
        if skip is None:
            out.append(args[i])
            i += 1
        else:
            i += 1 + skip
    return out
