"""Compare a task's target with its source, key by key, without straining the source.

Only SCAN, RANDOMKEY, TYPE, PTTL, length commands and value reads run on the source, in
pipelines of ``batch`` keys, under a keys-per-second cap. A collection longer than ``chunk``
(or a string over ``STRING_CHUNK`` bytes) is compared piece by piece: lengths first, then
HSCAN/SSCAN/ZSCAN chunks looked up on the target with HMGET/SMISMEMBER/ZMSCORE, LRANGE or
GETRANGE windows, XRANGE/XPENDING pages; so a 5M-field hash is never held in memory at once.

Source db ``d`` is compared with target db ``spec.target_db(d)``; the filter's dbs and
prefixes are honoured on both sides. Full mode SCANs every selected source db, then SCANs
the target dbs they map to for keys the source lacks ("extra"). Sample mode picks keys with
RANDOMKEY on the source (spread over dbs by their key counts; a db with fewer keys than its
share is scanned whole) and does not look for extra keys.

A Redis Cluster target (several addresses, or a node saying ``cluster_enabled:1``) is read
through ``ClusterTarget``: one connection per master, each target read sent to the master
of its key's slot (every command verify sends to the target names one key), extra keys
looked for by SCANning every master. It has db 0 only: a source db holding keys that maps
elsewhere fails the verification. A read redirected while the cluster is resharded is sent
again once (MOVED: after a fresh slot map; ASK: to the importing node, after ASKING).

A key SCAN returns twice (possible while the server rehashes) is compared twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import hiredis

from . import sentinel
from .cluster_reads import ClusterTarget, key_of, redirect_of
from .errors import CdcdError, ConflictError, EndpointError, FatalTaskError
from .ratelimit import TokenBucket
from .resp import Arg, Connection, ReplyError, ServerReplyError, encode, keyspace, parse_info
from .spec import TaskSpec
from .topology import (
    Addr,
    HostMapping,
    is_cluster,
    show_addr,
)

log = logging.getLogger("cdcd.verify")

CLASSES = ("missing", "extra", "type_mismatch", "value_mismatch", "ttl_mismatch")
STATES = ("pending", "running", "done", "failed", "cancelled")
STRING_INLINE = 64 * 1024      # strings up to this size are read whole in a pipeline
STRING_CHUNK = 512 * 1024      # longer ones in GETRANGE windows of this size
RANDOMKEY_TRIES = 10            # RANDOMKEY calls allowed per wanted sample key (filters)

_LENGTH = {"string": "STRLEN", "hash": "HLEN", "set": "SCARD", "zset": "ZCARD",
           "list": "LLEN", "stream": "XLEN"}
_UNIT = {"string": "bytes", "hash": "fields", "set": "members", "zset": "members",
         "list": "elements", "stream": "entries"}

Recheck = Callable[[], Awaitable[None]]


def render_key(key: bytes, limit: int = 200) -> str:
    """Render a key for a report: UTF-8, with backslash escapes for bytes and controls."""
    out: list[str] = []
    for ch in key.decode("utf-8", "surrogateescape"):
        o = ord(ch)
        if 0xDC80 <= o <= 0xDCFF:
            out.append(f"\\x{o - 0xDC00:02x}")
        elif ch == "\\":
            out.append("\\\\")
        elif ch in "\n\r\t":
            out.append({"\n": "\\n", "\r": "\\r", "\t": "\\t"}[ch])
        elif o < 0x20 or o == 0x7F:
            out.append(f"\\x{o:02x}")
        else:
            out.append(ch)
    text = "".join(out)
    return text if len(text) <= limit else text[:limit] + "..."


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _s(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _pairs(flat: Any) -> dict[bytes, Any]:
    """Turn a RESP2 flat map ([k1, v1, k2, v2, ...]) into a dict."""
    if not isinstance(flat, list):
        return {}
    return {flat[i]: flat[i + 1] for i in range(0, len(flat) - 1, 2)}


def _next_id(stream_id: bytes) -> bytes:
    """Return the smallest stream id after ``stream_id`` (for paging XRANGE/XPENDING)."""
    ms, _, seq = stream_id.partition(b"-")
    if int(seq) >= (1 << 64) - 1:
        return b"%d-0" % (int(ms) + 1)
    return b"%d-%d" % (int(ms), int(seq) + 1)


def _ttl_text(ms: int) -> str:
    return "none" if ms == -1 else f"{ms} ms"


@dataclass(frozen=True)
class Diff:
    """One difference: its class, where it is, and a short explanation without values."""

    kind: str
    db: int
    key: bytes
    detail: str = ""


class _Changed(Exception):
    """The key changed type or vanished while it was being compared."""


@dataclass(kw_only=True)
class _Tally:
    """Counts and example keys for one source db."""

    db: int
    target_db: int
    examples_max: int
    keys_checked: int = 0
    unchecked: int = 0
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CLASSES, 0))
    examples: dict[str, list[dict[str, Any]]] = field(
        default_factory=lambda: {c: [] for c in CLASSES})

    def add(self, diff: Diff) -> None:
        self.counts[diff.kind] += 1
        ex = self.examples[diff.kind]
        if len(ex) < self.examples_max:
            ex.append({"db": self.db, "target_db": self.target_db,
                       "key": render_key(diff.key), "detail": diff.detail})

    def to_json(self, *, extras: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"db": self.db, "target_db": self.target_db,
                               "keys_checked": self.keys_checked,
                               "values_unchecked": self.unchecked}
        for c in CLASSES:
            out[c] = self.counts[c] if (c != "extra" or extras) else None
        out["examples"] = {c: list(v) for c, v in self.examples.items()
                           if c != "extra" or extras}
        return out


@dataclass(kw_only=True)
class _Plan:
    dbs: list[int]                         # source dbs, sorted
    groups: dict[int, list[int]]           # target db -> source dbs mapped onto it
    src_keys: dict[int, int]
    dst_keys: dict[int, int]


class Verification:
    """Compare source and target of ``spec`` once; poll ``progress`` while ``run`` works.

    ``sample``: None for a full comparison, or the number of source keys to sample.
    ``keys_per_sec`` caps keys scanned/sampled per second; ``elements_per_sec`` caps
    elements read from collections compared in chunks. ``recheck_delay`` (seconds) or
    ``recheck`` (awaited instead of sleeping, e.g. "until the task has caught up") makes
    keys found different be compared once more before they are reported, so replication
    lag is not reported as a difference; at most ``recheck_limit`` keys are held for that,
    further differences are reported without a second look.
    """

    def __init__(self, spec: TaskSpec, *, sample: int | None = None,
                 keys_per_sec: float = 20_000, elements_per_sec: float = 500_000,
                 ttl_tolerance_ms: int = 2000, examples: int = 10,
                 recheck_delay: float = 0.0, recheck: Recheck | None = None,
                 batch: int = 256, chunk: int = 1000, recheck_limit: int = 100_000,
                 op_timeout: float = 60.0, verification_id: str | None = None) -> None:
        if sample is not None and sample < 1:
            raise ValueError("sample must be at least 1")
        self.spec = spec
        self.id = verification_id or uuid.uuid4().hex
        self.sample = sample
        self.ttl_tolerance_ms = ttl_tolerance_ms
        self.examples = examples
        self.recheck_delay = recheck_delay
        self.recheck = recheck
        self.batch = batch
        self.chunk = chunk
        self.recheck_limit = recheck_limit
        self.op_timeout = op_timeout
        self._keys = TokenBucket(keys_per_sec, burst=max(batch, keys_per_sec / 20))
        self._elements = TokenBucket(elements_per_sec, burst=max(chunk, elements_per_sec / 20))
        self._src: Connection | None = None
        self._dst: Connection | None = None          # a standalone target
        self._cluster: ClusterTarget | None = None  # or a cluster target
        self._task: asyncio.Task[Any] | None = None
        self._cancel_requested = False
        self._tallies: dict[int, _Tally] = {}
        self._suspects: dict[tuple[str, int], list[bytes]] = {}
        self._n_suspects = 0
        self._rechecked = 0
        self._resolved = 0
        self._scanned = 0
        self._scan_total = 0
        self._t0 = 0.0
        self.progress: dict[str, Any] = {
            "verification_id": self.id, "task_id": spec.task_id, "state": "pending",
            "phase": "", "mode": "full" if sample is None else "sample",
            "keys_checked": 0, "keys_total": 0, "percent": 0.0,
            "started_at": None, "finished_at": None, "error": "", "result": None,
        }

    # --- lifecycle ------------------------------------------------------------------------

    @property
    def rechecking(self) -> bool:
        return self.recheck is not None or self.recheck_delay > 0

    def to_json(self) -> dict[str, Any]:
        """Return a copy of the progress dict (what the API's ``get`` shows)."""
        return dict(self.progress)

    def cancel(self) -> None:
        """Stop a running verification; ``run`` then returns with state ``cancelled``."""
        self._cancel_requested = True
        if self._task is not None and not self._task.done():
            self._task.cancel()

    async def run(self) -> dict[str, Any]:
        """Compare, updating ``progress``; return it. Never raises on server errors:
        they end in state ``failed`` with ``error`` set."""
        if self.progress["state"] != "pending":
            raise ConflictError(f"verification {self.id} already ran")
        self._task = asyncio.current_task()
        self._t0 = time.monotonic()
        self.progress.update(state="running", started_at=_now())
        try:
            try:
                if self._cancel_requested:
                    raise asyncio.CancelledError
                await self._run()
                result = self._result()
            finally:
                await self._close()
            self.progress.update(result=result, percent=100.0)
            self._finish("done")
        except asyncio.CancelledError:
            self._finish("cancelled", "cancelled")
            task = self._task
            if not (self._cancel_requested and task is not None and task.uncancel() == 0):
                raise
        except CdcdError as exc:
            log.warning("verification %s failed: %s", self.id, exc.message)
            self._finish("failed", exc.message)
        except hiredis.ProtocolError as exc:
            self._finish("failed", f"a server does not speak the Redis protocol: {exc}")
        except Exception as exc:  # a bug: record it as a sentence, keep the traceback in logs
            log.exception("verification %s failed", self.id)
            self._finish("failed", f"internal error: {type(exc).__name__}: {exc}")
        return self.to_json()

    def _finish(self, state: str, error: str = "") -> None:
        self.progress.update(state=state, error=error, finished_at=_now(), phase="")

    async def _close(self) -> None:
        for conn in (self._src, self._dst, self._cluster):
            if conn is not None:
                await conn.aclose()
        self._src = self._dst = self._cluster = None

    # --- plumbing -------------------------------------------------------------------------

    @property
    def src(self) -> Connection:
        assert self._src is not None
        return self._src

    @property
    def dst(self) -> Connection | ClusterTarget:
        side = self._cluster or self._dst
        assert side is not None
        return side

    async def _pair(self, scmds: Sequence[Sequence[Arg]],
                    dcmds: Sequence[Sequence[Arg]]) -> tuple[list[Any], list[Any]]:
        """Run one pipeline on each side; both servers work at the same time."""
        if self._cluster is not None:
            return await self._pair_cluster(scmds, dcmds)
        src, dst = self.src, self._dst
        assert dst is not None
        if scmds:
            src.send(b"".join(encode(c) for c in scmds))
        if dcmds:
            dst.send(b"".join(encode(c) for c in dcmds))
        try:
            async with asyncio.timeout(self.op_timeout):
                if scmds:
                    await src.drain()
                if dcmds:
                    await dst.drain()
                sr = await src.read_replies(len(scmds)) if scmds else []
                dr = await dst.read_replies(len(dcmds)) if dcmds else []
        except TimeoutError:
            raise EndpointError(f"{src.name} / {dst.name}: no reply within "
                                f"{self.op_timeout:g}s") from None
        return sr, dr

    @contextlib.asynccontextmanager
    async def _deadline(self, who: str) -> AsyncIterator[None]:
        try:
            async with asyncio.timeout(self.op_timeout):
                yield
        except TimeoutError:
            raise EndpointError(f"{who}: no reply within {self.op_timeout:g}s") from None

    async def _pair_cluster(self, scmds: Sequence[Sequence[Arg]],
                            dcmds: Sequence[Sequence[Arg]]) -> tuple[list[Any], list[Any]]:
        """``_pair`` with a cluster target: its part goes to the masters by slot."""
        src, dst = self.src, self._cluster
        assert dst is not None
        if scmds:
            src.send(b"".join(encode(c) for c in scmds))
        parts = dst.send(dcmds) if dcmds else []
        async with self._deadline(f"{src.name} / {dst.name}"):
            if scmds:
                await src.drain()
            dr = await dst.collect(parts, len(dcmds))
            sr = await src.read_replies(len(scmds)) if scmds else []
        if any(redirect_of(r) for r in dr):
            dr = await self._redirected(dst, dcmds, dr)
        return sr, dr

    async def _redirected(self, dst: ClusterTarget, dcmds: Sequence[Sequence[Arg]],
                          dr: list[Any]) -> list[Any]:
        """Send the reads a node redirected once more: after a fresh slot map for MOVED,
        to the importing node after ASKING for ASK; a second redirect fails."""
        again = [i for i, r in enumerate(dr) if redirect_of(r)]
        cmds = [dcmds[i] for i in again]
        log.info("verification %s: %s redirected %d of %d reads (%s); sending them again",
                 self.id, dst.name, len(again), len(dr), dr[again[0]])
        asking: dict[int, Addr] = {}
        for j, i in enumerate(again):
            if redirect_of(dr[i]) == "ASK":
                asking[j] = await dst.ensure_ask(dr[i], key_of(dcmds[i]))
        if len(asking) < len(again):
            await dst.refresh()
        async with self._deadline(dst.name):
            replies = await dst.collect(dst.send(cmds, asking), len(cmds))
        out = list(dr)
        for j, (i, reply) in enumerate(zip(again, replies)):
            if redirect_of(reply):
                raise EndpointError(
                    f"{dst.name}: {_s(cmds[j][0])} {render_key(key_of(cmds[j]))} was "
                    f"redirected again after following {dr[i]} ({reply}): the cluster is "
                    f"being resharded; verify again once its slots stay put")
            out[i] = reply
        return out

    async def _one(self, conn: Connection, *args: Arg) -> Any:
        """Run one command on one side (or one cluster master); return its reply, checked
        with ``_check``."""
        cmds = [list(args)]
        if conn is self.src:
            (reply,), _ = await self._pair(cmds, [])
        elif conn is self._dst:
            _, (reply,) = await self._pair([], cmds)
        else:
            async with self._deadline(conn.name):
                (reply,) = await conn.pipeline(cmds)
        return self._check(conn, reply, _s(args[0]))

    async def _select(self, db: int, tdb: int) -> None:
        await self.src.select(db)
        await self.dst.select(tdb)

    def _check(self, side: Connection | ClusterTarget, reply: Any, what: str) -> Any:
        """Pass a reply through; WRONGTYPE means the key changed, other errors fail."""
        if isinstance(reply, ReplyError):
            if str(reply).startswith("WRONGTYPE"):
                raise _Changed(str(reply))
            raise EndpointError(f"{side.name}: {what} failed: {reply}")
        return reply

    def _update_progress(self) -> None:
        checked = sum(t.keys_checked for t in self._tallies.values())
        if self.sample is None:
            total = max(self._scan_total, 1)
            pct = min(99.9, 100.0 * self._scanned / total)
        else:
            pct = min(99.9, 100.0 * checked / max(self.progress["keys_total"], 1))
        self.progress.update(keys_checked=checked, percent=round(pct, 1))

    # --- the run --------------------------------------------------------------------------

    async def _run(self) -> None:
        self.spec = spec = await sentinel.resolve_spec(self.spec)
        if len(spec.source.addrs) > 1:
            raise FatalTaskError("source lists several addresses (a Redis Cluster): "
                                 "cluster not supported yet")
        self.progress["phase"] = "connect"
        self._src = await Connection.open_endpoint(spec.source, role="source")
        await self._open_target()
        plan = await self._plan()
        for db in plan.dbs:
            self._tallies[db] = _Tally(db=db, target_db=spec.target_db(db),
                                       examples_max=self.examples)
        if self.sample is None:
            self.progress["keys_total"] = sum(plan.src_keys.get(d, 0) for d in plan.dbs)
            self._scan_total = self.progress["keys_total"] + sum(
                plan.dst_keys.get(t, 0) for t in plan.groups)
        else:
            shares = self._shares(plan)
            self.progress["keys_total"] = sum(shares.values())
        self.progress["phase"] = "compare"
        for db in plan.dbs:
            if self.sample is None:
                await self._compare_scanned(db)
            else:
                n = shares.get(db, 0)
                if n >= plan.src_keys.get(db, 0):
                    await self._compare_scanned(db)
                elif n > 0:
                    keys = await self._random_keys(db, n)
                    for i in range(0, len(keys), self.batch):
                        await self._compare_batch(db, keys[i:i + self.batch])
        if self.sample is None:
            self.progress["phase"] = "extra"
            for tdb, sdbs in sorted(plan.groups.items()):
                await self._scan_extras(tdb, sdbs)
        if self.rechecking and self._suspects:
            await self._do_recheck(plan)
        self._update_progress()

    async def _open_target(self) -> None:
        """Connect to a standalone target, or to every master of a cluster target."""
        ep = self.spec.target
        if len(ep.addrs) == 1:
            self._dst = await Connection.open_endpoint(ep, role="target")
            try:
                clustered = await is_cluster(self._dst)
            except ServerReplyError:    # INFO refused: not a cluster node we could use
                clustered = False
            if not clustered:
                return
            await self._dst.aclose()
            self._dst = None
        try:
            mapping = HostMapping(getattr(ep, "host_mapping", None) or {})
        except ValueError as exc:
            raise FatalTaskError(f"target.host_mapping: {exc}") from None
        self._cluster = ClusterTarget(ep, mapping)
        await self._cluster.refresh()
        log.info("verification %s: target is a cluster of %d masters (%s)", self.id,
                 len(self._cluster.conns),
                 ", ".join(show_addr(a) for a in self._cluster.conns))

    async def _cluster_keyspace(self, cluster: ClusterTarget) -> list[tuple[str, Any]]:
        """INFO keyspace of every master, asked of all at once: [(node name, reply)]."""
        masters = cluster.masters()
        for conn in masters:
            conn.send(encode(["INFO", "keyspace"]))
        async with self._deadline(cluster.name):
            for conn in masters:
                await conn.drain()
            return [(conn.name, (await conn.read_replies(1))[0]) for conn in masters]

    async def _plan(self) -> _Plan:
        spec = self.spec
        cluster = self._cluster
        cmds: list[list[Arg]] = [["INFO", "keyspace"], ["INFO", "cluster"]]
        (s_ks, s_cl), d_ks = await self._pair(cmds, cmds[:1] if cluster is None else [])
        if not isinstance(s_cl, ReplyError) and \
                parse_info(s_cl).get("cluster_enabled") == "1":
            raise FatalTaskError(f"{self.src.name} is a Redis Cluster node: cluster not "
                                 f"supported yet")
        infos = [(self.src.name, s_ks)]
        if cluster is None:
            infos.append((self.dst.name, d_ks[0]))
        else:
            infos += await self._cluster_keyspace(cluster)
        for name, reply in infos:
            if isinstance(reply, ReplyError):
                raise EndpointError(f"{name}: INFO keyspace failed: {reply}")
        src_keys = keyspace(parse_info(s_ks))
        dst_keys: dict[int, int] = {}
        for _, reply in infos[1:]:
            for db, n in keyspace(parse_info(reply)).items():
                dst_keys[db] = dst_keys.get(db, 0) + n
        if spec.filter.dbs is not None:
            dbs = set(spec.filter.dbs)
        else:
            dbs = {d for d, n in src_keys.items() if n}
            if self.sample is None:   # source dbs whose target db holds keys: extras
                for t, n in dst_keys.items():
                    if n and t not in spec.db_mapping:
                        dbs.add(t)
                    dbs.update(d for d, v in spec.db_mapping.items() if v == t and n)
        ordered = sorted(d for d in dbs if spec.filter.db_ok(d))
        if self._cluster is not None:     # db 0 only: an empty source db elsewhere is moot
            for d in ordered:
                if spec.target_db(d) != 0 and src_keys.get(d, 0):
                    raise FatalTaskError(
                        f"target is a Redis Cluster: source db {d} maps to target db "
                        f"{spec.target_db(d)}, but a cluster has db 0 only; give db_mapping")
            ordered = [d for d in ordered if spec.target_db(d) == 0]
        groups: dict[int, list[int]] = {}
        for d in ordered:
            groups.setdefault(spec.target_db(d), []).append(d)
        return _Plan(dbs=ordered, groups=groups, src_keys=src_keys, dst_keys=dst_keys)

    def _shares(self, plan: _Plan) -> dict[int, int]:
        """Split the sample over dbs by their key counts (largest remainder)."""
        assert self.sample is not None
        counts = {d: plan.src_keys.get(d, 0) for d in plan.dbs}
        total = sum(counts.values())
        if total == 0:
            return {}
        want = min(self.sample, total)
        exact = {d: want * n / total for d, n in counts.items()}
        shares = {d: int(x) for d, x in exact.items()}
        left = want - sum(shares.values())
        for d in sorted(exact, key=lambda d: exact[d] - shares[d], reverse=True)[:left]:
            shares[d] += 1
        return shares

    async def _scan(self, conn: Connection, db: int) -> AsyncIterator[list[bytes]]:
        """Yield batches of keys of ``db`` on ``conn`` that pass the key filter."""
        cursor: Any = b"0"
        while True:
            await conn.select(db)
            reply = await self._one(conn, "SCAN", cursor, "COUNT", self.batch)
            cursor, keys = reply[0], reply[1]
            self._scanned += len(keys)
            await self._keys.take(len(keys))
            keys = [k for k in keys if self.spec.filter.key_ok(k)]
            if keys:
                yield keys
            if cursor in (b"0", 0, "0"):
                return

    async def _random_keys(self, db: int, n: int) -> list[bytes]:
        """Pick up to ``n`` distinct keys of source db ``db`` with RANDOMKEY."""
        await self.src.select(db)
        seen: dict[bytes, None] = {}
        tries = 0
        budget = n * RANDOMKEY_TRIES + self.batch
        while len(seen) < n and tries < budget:
            m = min(self.batch, max(2 * (n - len(seen)), 16), budget - tries)
            tries += m
            replies, _ = await self._pair([["RANDOMKEY"]] * m, [])
            await self._keys.take(m)
            for key in replies:
                if isinstance(key, ReplyError):
                    raise EndpointError(f"{self.src.name}: RANDOMKEY failed: {key}")
                if key is None:
                    return list(seen)
                if self.spec.filter.key_ok(key) and len(seen) < n:
                    seen[key] = None
        return list(seen)

    async def _compare_scanned(self, db: int) -> None:
        async for keys in self._scan(self.src, db):
            await self._compare_batch(db, keys)

    async def _compare_batch(self, db: int, keys: list[bytes]) -> None:
        checked, diffs = await self._compare(db, keys)
        self._tallies[db].keys_checked += checked
        self._record(("source", db), diffs)
        self._update_progress()

    def _record(self, where: tuple[str, int], diffs: list[Diff]) -> None:
        """Count differences now, or hold their keys for the recheck."""
        if not diffs:
            return
        if not self.rechecking:
            for d in diffs:
                self._tallies[d.db].add(d)
            return
        held = self._suspects.setdefault(where, [])
        last: bytes | None = None
        for d in diffs:
            if d.key == last:
                continue
            if self._n_suspects < self.recheck_limit:
                held.append(d.key)
                self._n_suspects += 1
                last = d.key
            else:
                self._tallies[d.db].add(d)

    async def _do_recheck(self, plan: _Plan) -> None:
        self.progress["phase"] = "recheck"
        if self.recheck is not None:
            await self.recheck()
        else:
            await asyncio.sleep(self.recheck_delay)
        for (where, db), keys in sorted(self._suspects.items()):
            for i in range(0, len(keys), self.batch):
                part = keys[i:i + self.batch]
                if where == "source":
                    _, diffs = await self._compare(db, part, again=True)
                else:
                    diffs = await self._extras(db, plan.groups[db], part)
                self._rechecked += len(part)
                self._resolved += len(part) - len({d.key for d in diffs})
                for d in diffs:
                    self._tallies[d.db].add(d)

    # --- key comparison -------------------------------------------------------------------

    async def _compare(self, db: int, keys: list[bytes], *,
                       again: bool = False) -> tuple[int, list[Diff]]:
        """Compare ``keys`` of source db ``db``; return (keys present on source, diffs).

        ``again`` marks a recheck: keys were counted the first time.
        """
        tdb = self.spec.target_db(db)
        await self._select(db, tdb)
        cmds: list[list[Arg]] = []
        for k in keys:
            cmds.append(["TYPE", k])
            cmds.append(["PTTL", k])
        sr, dr = await self._pair(cmds, cmds)
        diffs: list[Diff] = []
        same: dict[str, list[bytes]] = {}
        checked = 0
        for i, key in enumerate(keys):
            st = _s(self._check(self.src, sr[2 * i], "TYPE"))
            sttl = self._check(self.src, sr[2 * i + 1], "PTTL")
            dt = _s(self._check(self.dst, dr[2 * i], "TYPE"))
            dttl = self._check(self.dst, dr[2 * i + 1], "PTTL")
            if st == "none" or sttl == -2:
                continue            # gone from the source meanwhile
            checked += 1
            if dt == "none" or dttl == -2:
                diffs.append(Diff("missing", db, key, f"{st} absent on target"))
                continue
            if st != dt:
                diffs.append(Diff("type_mismatch", db, key, f"source {st}, target {dt}"))
                continue
            if (sttl == -1) != (dttl == -1) or abs(sttl - dttl) > self.ttl_tolerance_ms:
                diffs.append(Diff("ttl_mismatch", db, key,
                                  f"ttl source {_ttl_text(sttl)}, target {_ttl_text(dttl)}"))
            if st in _LENGTH:
                same.setdefault(st, []).append(key)
            elif not again:
                self._tallies[db].unchecked += 1
        if same:
            diffs.extend(await self._compare_values(db, same))
        return checked, diffs

    async def _compare_values(self, db: int, by_type: dict[str, list[bytes]]) -> list[Diff]:
        """Compare lengths, then small values in one pipeline, then big ones in chunks."""
        items = [(t, k) for t, keys in by_type.items() for k in keys]
        cmds: list[list[Arg]] = [[_LENGTH[t], k] for t, k in items]
        pairs, diffs = await self._read_pairs(db, items, cmds, [_LENGTH[t] for t, _ in items])
        small: list[tuple[str, bytes, int]] = []
        big: list[tuple[str, bytes, int]] = []
        for (t, key), sl, dl in pairs:
            if sl != dl:
                diffs.append(Diff("value_mismatch", db, key,
                                  f"{t} of {sl} {_UNIT[t]} on source, {dl} on target"))
            elif t == "stream" or sl > (STRING_INLINE if t == "string" else self.chunk):
                big.append((t, key, sl))
            else:
                small.append((t, key, sl))
        group: list[tuple[str, bytes]] = []
        cost = 0
        for t, key, length in small:     # bound what one pipeline brings back
            group.append((t, key))
            cost += max(1, length // 1024) if t == "string" else length
            if cost >= 8 * self.chunk:
                diffs.extend(await self._compare_small(db, group))
                await self._elements.take(cost)
                group, cost = [], 0
        if group:
            diffs.extend(await self._compare_small(db, group))
            await self._elements.take(cost)
        for t, key, length in big:
            try:
                detail = await self._compare_big(t, key, length)
            except _Changed as exc:
                detail = f"changed while compared: {exc}"
            if detail:
                diffs.append(Diff("value_mismatch", db, key, detail))
        return diffs

    async def _read_pairs(self, db: int, items: list[tuple[str, bytes]],
                          cmds: list[list[Arg]], names: list[str]
                          ) -> tuple[list[tuple[tuple[str, bytes], Any, Any]], list[Diff]]:
        """Run ``cmds`` on both sides; return the checked (item, source, target) replies and
        a difference for each key that changed type or vanished while it was compared."""
        sr, dr = await self._pair(cmds, cmds)
        pairs: list[tuple[tuple[str, bytes], Any, Any]] = []
        diffs: list[Diff] = []
        for item, sv, dv, name in zip(items, sr, dr, names):
            try:
                pairs.append((item, self._check(self.src, sv, name),
                              self._check(self.dst, dv, name)))
            except _Changed as exc:
                diffs.append(Diff("value_mismatch", db, item[1],
                                  f"changed while compared: {exc}"))
        return pairs, diffs

    async def _compare_small(self, db: int, items: list[tuple[str, bytes]]) -> list[Diff]:
        read: dict[str, list[Arg]] = {"string": ["GET"], "hash": ["HGETALL"], "set": ["SMEMBERS"],
                "zset": ["ZRANGE", 0, -1, "WITHSCORES"], "list": ["LRANGE", 0, -1]}
        cmds: list[list[Arg]] = []
        for t, key in items:
            cmd = read[t]
            cmds.append([cmd[0], key, *cmd[1:]])
        names = {t: _s(cmd[0]) for t, cmd in read.items()}
        pairs, diffs = await self._read_pairs(db, items, cmds, [names[t] for t, _ in items])
        for (t, key), sv, dv in pairs:
            detail = _value_detail(t, sv, dv)
            if detail:
                diffs.append(Diff("value_mismatch", db, key, detail))
        return diffs

    async def _compare_big(self, t: str, key: bytes, length: int) -> str:
        """Compare one long value chunk by chunk; return what differs ('' when equal)."""
        if t == "hash":
            return await self._compare_scanned_members(key, "HSCAN", "HMGET", _hash_chunk)
        if t == "set":
            return await self._compare_scanned_members(key, "SSCAN", "SMISMEMBER", _set_chunk)
        if t == "zset":
            return await self._compare_scanned_members(key, "ZSCAN", "ZMSCORE", _zset_chunk)
        if t == "list":
            for start in range(0, length, self.chunk):
                cmd: list[Arg] = ["LRANGE", key, start, start + self.chunk - 1]
                (sv,), (dv,) = await self._pair([cmd], [cmd])
                sv, dv = self._check(self.src, sv, "LRANGE"), self._check(self.dst, dv, "LRANGE")
                if sv != dv:
                    at = next((i for i, (a, b) in enumerate(zip(sv, dv)) if a != b),
                              min(len(sv), len(dv)))
                    return f"list element {start + at} differs"
                await self._elements.take(len(sv))
            return ""
        if t == "string":
            for start in range(0, length, STRING_CHUNK):
                cmd = ["GETRANGE", key, start, start + STRING_CHUNK - 1]
                (sv,), (dv,) = await self._pair([cmd], [cmd])
                if self._check(self.src, sv, "GETRANGE") != self._check(self.dst, dv, "GETRANGE"):
                    return f"string differs in bytes {start}..{start + STRING_CHUNK - 1}"
                await self._elements.take(max(1, len(sv) // 1024))
            return ""
        if t == "stream":
            return await self._compare_stream(key)
        return ""

    async def _compare_scanned_members(
            self, key: bytes, scan: str, lookup: str,
            judge: Callable[[list[Any], Any], str]) -> str:
        """Walk the source value with *SCAN and look each chunk up on the target.

        Lengths are already equal, so every source member present with the same value on
        the target proves the values equal.
        """
        cursor: Any = b"0"
        while True:
            reply = await self._one(self.src, scan, key, cursor, "COUNT", self.chunk)
            cursor, flat = reply[0], reply[1]
            members = flat if scan == "SSCAN" else flat[0::2]
            if members:
                (found,) = (await self._pair([], [[lookup, key, *members]]))[1]
                detail = judge(flat, self._check(self.dst, found, lookup))
                if detail:
                    return detail
                await self._elements.take(len(members))
            if cursor in (b"0", 0, "0"):
                return ""

    async def _compare_stream(self, key: bytes) -> str:
        """Compare entries, last-generated-id and consumer groups (last-delivered-id,
        consumers, PEL ids and their consumers) of one stream."""
        (si,), (di,) = await self._pair([["XINFO", "STREAM", key]], [["XINFO", "STREAM", key]])
        s = _pairs(self._check(self.src, si, "XINFO"))
        d = _pairs(self._check(self.dst, di, "XINFO"))
        for fld in (b"length", b"last-generated-id"):
            if s.get(fld) != d.get(fld):
                return f"stream {_s(fld)}: source {_s(s.get(fld))}, target {_s(d.get(fld))}"
        start = b"-"
        while True:
            cmd: list[Arg] = ["XRANGE", key, start, "+", "COUNT", self.chunk]
            (sp,), (dp,) = await self._pair([cmd], [cmd])
            sp, dp = self._check(self.src, sp, "XRANGE"), self._check(self.dst, dp, "XRANGE")
            if sp != dp:
                for a, b in zip(sp, dp):
                    if a != b:
                        return f"stream entry {_s(a[0])} differs (target {_s(b[0])})"
                return f"stream entries after {_s(start)} differ"
            await self._elements.take(len(sp))
            if len(sp) < self.chunk:
                break
            start = _next_id(sp[-1][0])
        (sg,), (dg,) = await self._pair([["XINFO", "GROUPS", key]], [["XINFO", "GROUPS", key]])
        sgroups = {g[b"name"]: g for g in map(_pairs, self._check(self.src, sg, "XINFO"))}
        dgroups = {g[b"name"]: g for g in map(_pairs, self._check(self.dst, dg, "XINFO"))}
        if set(sgroups) != set(dgroups):
            only_s = sorted(set(sgroups) - set(dgroups))
            only_d = sorted(set(dgroups) - set(sgroups))
            parts = []
            if only_s:
                parts.append("missing on target: " + ", ".join(render_key(g) for g in only_s))
            if only_d:
                parts.append("only on target: " + ", ".join(render_key(g) for g in only_d))
            return "consumer groups " + "; ".join(parts)
        for name in sorted(sgroups):
            detail = await self._compare_group(key, name, sgroups[name], dgroups[name])
            if detail:
                return detail
        return ""

    async def _compare_group(self, key: bytes, name: bytes, s: dict[bytes, Any],
                             d: dict[bytes, Any]) -> str:
        label = f"group {render_key(name)}"
        for fld in (b"last-delivered-id", b"pending"):
            if s.get(fld) != d.get(fld):
                return f"{label} {_s(fld)}: source {_s(s.get(fld))}, target {_s(d.get(fld))}"
        cmd: list[Arg] = ["XINFO", "CONSUMERS", key, name]
        (sc,), (dc,) = await self._pair([cmd], [cmd])
        s_cons = sorted(_pairs(c).get(b"name", b"") for c in self._check(self.src, sc, "XINFO"))
        d_cons = sorted(_pairs(c).get(b"name", b"") for c in self._check(self.dst, dc, "XINFO"))
        if s_cons != d_cons:
            return (f"{label} consumers: source [{', '.join(render_key(c) for c in s_cons)}], "
                    f"target [{', '.join(render_key(c) for c in d_cons)}]")
        start = b"-"
        while True:
            cmd = ["XPENDING", key, name, start, "+", self.chunk]
            (sp,), (dp,) = await self._pair([cmd], [cmd])
            sp = [(e[0], e[1]) for e in self._check(self.src, sp, "XPENDING")]
            dp = [(e[0], e[1]) for e in self._check(self.dst, dp, "XPENDING")]
            if sp != dp:
                for a, b in zip(sp, dp):
                    if a != b:
                        return (f"{label} pending entry {_s(a[0])} (consumer {render_key(a[1])})"
                                f" differs on target: {_s(b[0])} (consumer {render_key(b[1])})")
                return f"{label} pending entries after {_s(start)} differ"
            await self._elements.take(len(sp))
            if len(sp) < self.chunk:
                return ""
            start = _next_id(sp[-1][0])

    # --- extra keys -----------------------------------------------------------------------

    async def _scan_extras(self, tdb: int, sdbs: list[int]) -> None:
        """Find keys of target db ``tdb`` (passing the filter) that no mapped source db has;
        on a cluster, SCAN every master."""
        if self._cluster is not None:
            sides = self._cluster.masters()
        else:
            assert self._dst is not None
            sides = [self._dst]
        for side in sides:
            async for keys in self._scan(side, tdb):
                diffs = await self._extras(tdb, sdbs, keys)
                self._record(("extra", tdb), diffs)
                self._update_progress()

    async def _extras(self, tdb: int, sdbs: list[int], keys: list[bytes]) -> list[Diff]:
        cmds: list[list[Arg]] = [["EXISTS", k] for k in keys]
        await self.dst.select(tdb)
        present = [False] * len(keys)
        on_target: list[Any] = []
        for i, db in enumerate(sdbs):
            await self.src.select(db)
            sr, dr = await self._pair(cmds, cmds if i == 0 else [])
            if i == 0:
                on_target = dr
            for j, r in enumerate(sr):
                present[j] = present[j] or bool(self._check(self.src, r, "EXISTS"))
        owner = min(sdbs)
        where = ", ".join(f"db {d}" for d in sdbs)
        return [Diff("extra", owner, k, f"on target db {tdb} only, not in source {where}")
                for k, here, there in zip(keys, present, on_target)
                if not here and self._check(self.dst, there, "EXISTS")]

    # --- result ---------------------------------------------------------------------------

    def _result(self) -> dict[str, Any]:
        extras = self.sample is None
        dbs = [t.to_json(extras=extras) for _, t in sorted(self._tallies.items())]
        out: dict[str, Any] = {
            "mode": "full" if extras else "sample",
            "sample": self.sample,
            "keys_checked": sum(t.keys_checked for t in self._tallies.values()),
            "values_unchecked": sum(t.unchecked for t in self._tallies.values()),
        }
        total = 0
        for c in CLASSES:
            n = sum(t.counts[c] for t in self._tallies.values())
            out[c] = n if (c != "extra" or extras) else None
            total += n
        out["differences"] = total
        out["consistent"] = total == 0
        examples: dict[str, list[dict[str, Any]]] = {}
        for c in CLASSES:
            if c == "extra" and not extras:
                continue
            examples[c] = [e for t in sorted(self._tallies) for e in
                           self._tallies[t].examples[c]][:self.examples]
        out["examples"] = examples
        out["dbs"] = dbs
        out["ttl_tolerance_ms"] = self.ttl_tolerance_ms
        out["recheck"] = {"enabled": self.rechecking, "delay_s": self.recheck_delay,
                          "rechecked": self._rechecked, "resolved": self._resolved}
        out["duration_s"] = round(time.monotonic() - self._t0, 3)
        return out


# --- value judges (no values in the messages: they may be secrets) ------------------------

def _value_detail(t: str, sv: Any, dv: Any) -> str:
    """Say how two fully read values differ ('' when equal)."""
    if t == "string":
        return "" if sv == dv else f"string differs ({len(sv)} bytes)"
    if t == "list":
        if sv == dv:
            return ""
        at = next((i for i, (a, b) in enumerate(zip(sv, dv)) if a != b), min(len(sv), len(dv)))
        return f"list element {at} differs"
    if t == "set":
        s, d = set(sv), set(dv)
        if s == d:
            return ""
        if s - d:
            return f"set member {render_key(min(s - d), 100)} missing on target"
        return f"set member {render_key(min(d - s), 100)} only on target"
    if t == "hash":
        return _map_difference("hash field", _pairs(sv), _pairs(dv), "differs")
    if t == "zset":
        return _map_difference("zset member", {m: float(v) for m, v in _pairs(sv).items()},
                               {m: float(v) for m, v in _pairs(dv).items()}, "score differs")
    return ""


def _map_difference(what: str, src: dict[bytes, Any], dst: dict[bytes, Any],
                    differs: str) -> str:
    """Describe the first difference between two field->value maps ('' when equal)."""
    if src == dst:
        return ""
    for f in sorted(src):
        if f not in dst:
            return f"{what} {render_key(f, 100)} missing on target"
        if src[f] != dst[f]:
            return f"{what} {render_key(f, 100)} {differs}"
    return f"{what} {render_key(min(set(dst) - set(src)), 100)} only on target"


def _hash_chunk(flat: list[Any], found: Any) -> str:
    for f, v, w in zip(flat[0::2], flat[1::2], found):
        if w is None:
            return f"hash field {render_key(f, 100)} missing on target"
        if v != w:
            return f"hash field {render_key(f, 100)} differs"
    return ""


def _set_chunk(flat: list[Any], found: Any) -> str:
    for m, ok in zip(flat, found):
        if not ok:
            return f"set member {render_key(m, 100)} missing on target"
    return ""


def _zset_chunk(flat: list[Any], found: Any) -> str:
    for m, score, other in zip(flat[0::2], flat[1::2], found):
        if other is None:
            return f"zset member {render_key(m, 100)} missing on target"
        if float(score) != float(other):
            return f"zset member {render_key(m, 100)} score differs"
    return ""
