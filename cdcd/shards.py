"""A Redis Cluster as the source: one replica link (PsyncReader) per master shard, all
feeding the task's one writer.

Each shard has its own stream position (``checkpoint["shards"][key]``) and its own
marker on the target (``cdcd:checkpoint:<task_id>:<key>``, written in the MULTI/EXEC of
that shard's batches), so every shard resumes on its own: a crash, a cut link or a shard
failover costs a partial resync of each shard, and a full resync (the backlog no longer
has the position) is limited to the shard that needs it, its stale keys removed by slot.

A shard is named by the first slot it served when the task first met it (``"0"``,
``"5461"``...) and keeps that name: after a restart each master is matched to the shard
whose stream it continues (its replication ID or, after a failover, ``replid2`` is the
checkpoint's), else to the shard whose slots it holds most of. Commands of different
shards touch different slots, hence different keys: the streams are applied
independently, each in its own order, except where slots move between shards while the
task runs (a resharding): there ``handoff.Handoff`` makes the next owner's events wait for
the previous owner's. The slot map is read every second; a master new to the task (a
failover, a master added) restarts the readers, which then match it as above.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from .entry import Batch
from .errors import EndpointError, TopologyChanged
from .handoff import Handoff, moved_json
from .markers import SlotMarkers, _ranges
from .progress import Progress
from .readers.psync import PsyncReader, StreamPos, key_hash
from .resp import Connection, keyspace, parse_info
from .router import ClusterRouter
from .topology import SLOTS, Shard, Topology, key_slot

if TYPE_CHECKING:
    from .task import Task

log = logging.getLogger("cdcd.shards")

# A shard's snapshot batches (entries, bytes): a quarter of a standalone source's, as
# several shards feed the one writer (readers/psync.py, rdb_batch). Measured on the
# benchmark's 3-shard row: API p99 43 ms -> 15-19 ms, and no slower.
SHARD_RDB_BATCH = (512, 1 << 18)


async def assign_keys(task: Task, topology: Topology, ck: dict[str, Any]) -> list[str]:
    """Name each master shard of ``topology`` (see the module's docstring)."""
    recorded = {k: set(v) for k, v in
                _owner_by_key(task.checkpoint.get("shard_slots")).items()}
    for key in ck:
        if key not in recorded and key.isdigit():
            recorded[key] = {int(key)}       # a checkpoint from before shard_slots
    ids: list[tuple[str, str]] = []
    for shard in topology.shards:
        conn = await Connection.open(*shard.master.dial, role="source", ep=task.spec.source)
        try:
            info = parse_info(await conn.call("INFO", "replication"))
        finally:
            conn.close()
        ids.append((info.get("master_replid", ""), info.get("master_replid2", "")))
    keys: list[str | None] = [None] * len(topology.shards)
    taken: set[str] = set()
    for i, (replid, replid2) in enumerate(ids):
        for key, raw in ck.items():
            pos = StreamPos.from_json(raw)
            if key not in taken and pos is not None and pos.replid in (replid, replid2):
                keys[i] = key
                taken.add(key)
                break
    for i, shard in enumerate(topology.shards):
        if keys[i] is not None:
            continue
        slots = _slots(shard)
        best = max((k for k in recorded if k not in taken),
                   key=lambda k: len(recorded[k] & slots), default=None)
        if best is not None and recorded[best] & slots:
            keys[i] = best
            taken.add(best)
    for i, shard in enumerate(topology.shards):
        if keys[i] is None:
            key = str(shard.ranges[0][0])
            if key in taken or key in recorded or key in ck:
                key = f"{key}-{shard.master.node_id[:8]}"
            keys[i] = key
            taken.add(key)
    return [k for k in keys if k is not None]


def _slots(shard: Shard) -> set[int]:
    return {s for a, b in shard.ranges for s in range(a, b + 1)}


def _range_slots(fields: Iterable[str]) -> Iterator[int]:
    """The slots of ranges written "a-b" or "a" (the checkpoint's, CLUSTER NODES')."""
    for field in fields:
        a, _, b = field.partition("-")
        yield from range(int(a), int(b or a) + 1)


def _owner_by_key(d: dict[str, str] | None) -> dict[str, list[int]]:
    """The checkpoint's slot map (shard key -> "0-5460,...") as key -> slots."""
    return {key: list(_range_slots(filter(None, str(text).split(","))))
            for key, text in (d or {}).items()}


def owner_list(by_key: dict[str, Any]) -> list[str]:
    """slot -> shard key ("" for a slot no shard serves)."""
    owner = [""] * SLOTS
    for key, slots in by_key.items():
        for slot in slots:
            owner[slot] = key
    return owner


def owner_json(owner: list[str]) -> dict[str, str]:
    by_key: dict[str, list[int]] = {}
    for slot, key in enumerate(owner):
        if key:
            by_key.setdefault(key, []).append(slot)
    return {k: _ranges(v) for k, v in by_key.items()}


class FanIn:
    """What a shard's reader puts in the task's queue: its stream positions tagged with the
    shard, and its end (``None``, after a full migration's RDB) counted, so the writer
    stops once every shard is done."""

    def __init__(self, queue: asyncio.Queue[Batch | None], readers: int) -> None:
        self.queue = queue
        self.left = readers

    def port(self, key: str) -> _Port:
        return _Port(self, key)


class _Port:
    def __init__(self, fan: FanIn, key: str) -> None:
        self.fan = fan
        self.key = key

    async def put(self, batch: Batch | None) -> None:
        if batch is None:
            self.fan.left -= 1
            if self.fan.left == 0:
                await self.fan.queue.put(None)
            return
        pos = batch.checkpoint
        if isinstance(pos, StreamPos):
            batch.checkpoint = dataclasses.replace(pos, shard=self.key)
        await self.fan.queue.put(batch)


class ShardState:
    """One shard of the source as the task sees it: the node it is read from (its master,
    or a replica with ``read_from: replica``), its reader and progress."""

    def __init__(self, key: str, shard: Shard, read_from: str = "master") -> None:
        self.key = key
        self.shard = shard
        self.node = shard.master
        if read_from == "replica":
            healthy = [r for r in shard.replicas if r.healthy]
            if not healthy:
                raise EndpointError(f"source shard {shard.master.name} (slots "
                                    f"{shard.slots_text()}) has no replica to read from "
                                    f"(read_from: replica)")
            self.node = healthy[0]
        self.progress = Progress()
        self.reader: PsyncReader | None = None
        self.slots = frozenset(_slots(shard))
        self.phase = "connecting"
        self.handoff: Handoff | None = None

    @property
    def slots(self) -> frozenset[int]:
        return self._slots

    @slots.setter
    def slots(self, slots: frozenset[int]) -> None:
        self._slots = slots
        self._slots_text = _ranges(slots)   # (the view is asked for often: once here)

    def view(self) -> dict[str, Any]:
        p = self.progress
        return {"shard": self.key, "node": self.node.name, "role": self.node.role,
                "slots": self._slots_text, "phase": self.phase,
                "replid": self.reader.replid if self.reader else "",
                "source_offset": p.source_offset, "applied_offset": p.applied_offset,
                "lag_bytes": max(0, p.source_offset - p.applied_offset),
                "keys_total": p.keys_total, "full_resyncs": p.full_resyncs,
                **self._handoff_view()}

    def _handoff_view(self) -> dict[str, Any]:
        h = self.handoff
        if h is None:
            return {}
        return {"slot_handoff_waits": h.waits.get(self.key, 0),
                "waiting_for_shards": sorted(h.waiting.get(self.key, ()))}


async def run_sharded(task: Task, topology: Topology, target: Connection,
                      restarted: bool) -> None:
    """The psync pipeline of a task whose source is a cluster."""
    from .task import QUEUE_BATCHES, remove_stale_keys, run_pipeline, source_dbs
    spec = task.spec
    ck: dict[str, Any] = task.checkpoint.setdefault("shards", {})
    forced = task.checkpoint.get("resync")
    if forced:
        ck.clear()          # every shard starts over (the shards may have changed)
        for name in ("shard_resync", "shard_slots", "moved"):
            task.checkpoint.pop(name, None)
    keys = await assign_keys(task, topology, ck)
    states = {k: ShardState(k, s, spec.source.read_from) for k, s in zip(keys, topology.shards)}
    task.shard_states = states
    for key in ck:
        if key not in states:
            log.info("task %s: source shard %s serves no slots any more: its reader is "
                     "retired (its checkpoint is kept)", spec.task_id, key)
    owner = owner_list({k: st.slots for k, st in states.items()})
    before = _owner_by_key(task.checkpoint.get("shard_slots"))
    # shards new to a task that already ran (a master added to the source): their first
    # snapshot is not a resync (nothing of theirs was copied before)
    fresh = {k for k in states if k not in ck and k not in before} if before else set()
    handoff: Handoff | None = None
    # slots moved between shards whose previous owner's stream is not applied up to the
    # fence yet: kept in the checkpoint until it is
    durable: dict[int, list[tuple[str, int]]] = {}
    if spec.incremental:
        moved = {s: [(prev, f) for prev, f in hist
                     if prev in states and _offset(ck.get(prev)) < f]
                 for s, hist in Handoff.moved_from_json(task.checkpoint.get("moved")).items()}
        handoff = Handoff(owner_list(before) if before else list(owner),
                          {k: st.shard.master.dial for k, st in states.items()},
                          spec.source, moved)
        await handoff.remap(owner)
        durable = {s: list(h) for s, h in handoff.moved.items()}
        for st in states.values():
            st.handoff = handoff
        task.checkpoint["shard_slots"] = owner_json(owner)
        task.checkpoint["moved"] = moved_json(handoff.moved)
    resumes: dict[str, StreamPos | None] = {}
    shard_forced: dict[str, str] = dict(task.checkpoint.get("shard_resync") or {})
    router: ClusterRouter | None = None
    marks: dict[int, StreamPos] = {}
    changed: dict[str, list[int]] = {}
    if task.topology is not None:
        # A cluster target: each shard's slots hold its stream's positions in their slot
        # markers (a slot belongs to one shard on both sides).
        router = await task._cluster_writer(replace=spec.existing_keys != "skip",
                                            marks=spec.incremental)
        held = handoff.moved if handoff is not None else {}
        router.shard_slots = {k: sorted(s for s in st.slots if s not in held)
                              for k, st in states.items()}
        if handoff is not None:
            handoff.settled = router.slot_settled
        if spec.incremental:
            marks, changed = await task.cluster_marks(router)
    for key, st in states.items():
        local = StreamPos.from_json(ck.get(key))
        resume = None
        if spec.incremental and not forced:
            if router is not None:
                verdict = SlotMarkers.judge(
                    marks, local, changed, slots=st.slots, shard=key,
                    moved_from={s: max(f for prev, f in h if prev == key)
                                for s, h in durable.items() if any(p == key for p, _ in h)})
            else:
                verdict = await task.markers.judge(target, local, key)
            if verdict.lost:
                task.progress.target_resets += 1
                task.set_note(f"shard {st.shard.master.name}: {verdict.lost}")
                if verdict.full:
                    shard_forced[key] = verdict.lost
                    ck.pop(key, None)
            resume = verdict.resume if not verdict.full else None
            if key in shard_forced:
                resume = None       # its redone snapshot's stale keys are not removed yet
            if resume is not None:
                resume = dataclasses.replace(resume, shard=key)
                if verdict.lost and not verdict.full:
                    ck[key] = resume.to_json()
            if router is not None and resume is not None:
                router.resume_shard(key, verdict.skip)
        if router is not None and resume is None:
            router.mark_shards.add(key)
        resumes[key] = resume
    task.checkpoint["shard_resync"] = shard_forced
    await task.persist()

    queue: asyncio.Queue[Batch | None] = asyncio.Queue(maxsize=QUEUE_BATCHES)
    fan = FanIn(queue, len(states))
    writer = router or await task._writer(target, replace=spec.existing_keys != "skip",
                                          marker=task._marker if spec.incremental else None)
    applied: dict[str, asyncio.Event] = {k: asyncio.Event() for k in states}
    streaming: set[str] = set()

    def make_reader(key: str, st: ShardState) -> PsyncReader:
        resume = resumes[key]
        redo = bool(forced) or (restarted and key not in fresh) or key in shard_forced

        def on_full_sync(replid: str, offset: int) -> None:
            if redo or resume is not None:
                st.progress.full_resyncs += 1
                task.progress.full_resyncs += 1
                why = shard_forced.get(key) or forced or (
                    f"source answered a full resync (offset {resume.offset + 1} no longer "
                    f"in its backlog)" if resume is not None else
                    "its first snapshot was interrupted")
                shard_forced[key] = str(why)
                task.checkpoint["shard_resync"] = shard_forced
                if forced and all(k in shard_forced for k in states):
                    # every shard now carries the resync itself (until its stale keys
                    # are removed): the task-wide flag has done its work
                    task.checkpoint.pop("resync", None)
                task.set_note(f"shard {st.shard.master.name}: {why}; its snapshot redone")
                reader.replace = writer.replace = task._replace(True)
            if router is not None:
                router.restart_shard(key)
            st.phase = "snapshot"
            st.progress.source_offset = st.progress.applied_offset = offset
            task.set_phase("snapshot")

        def on_stream() -> None:
            st.phase = "incremental"
            streaming.add(key)
            if len(streaming) == len(states):
                task.set_phase("incremental")
                task.progress.status = "streaming"

        async def after_rdb(seen: set[int] | None) -> None:
            await applied[key].wait()
            if seen is not None and task._cleanup_allowed():
                slots = st.slots

                async def stale(tdb: int, keys: list[bytes]) -> list[bytes]:
                    dbs = source_dbs(spec, tdb)
                    return [k for k in keys if key_slot(k) in slots and
                            not any(key_hash(d, k) in seen for d in dbs)]
                removed = await remove_stale_keys(spec, stale, task._foreign(),
                                                  task._cluster_nodes())
                log.info("task %s: shard %s: resync removed %d target keys the source no "
                         "longer has", spec.task_id, key, removed)
            if shard_forced.pop(key, None) is not None:
                task.checkpoint["shard_resync"] = shard_forced
                await task.persist()

        host, port = st.node.dial
        reader = PsyncReader(spec, st.progress, resume=resume, host=host, port=port,
                             rdb_only=not spec.incremental, resync=redo,
                             on_full_sync=on_full_sync, on_stream=on_stream,
                             after_rdb=after_rdb, plan=task.plan,
                             parse=router is not None or task.parse_shards)
        reader.name = f"source shard {st.node.name} (slots {st.shard.slots_text()})"
        reader.gate, reader.shard = handoff, key
        reader.parse_next_time = task.parse_shards_from_now_on
        reader.rdb_batch = SHARD_RDB_BATCH
        st.reader = reader
        return reader

    for key, st in states.items():
        make_reader(key, st)

    async def ack(batch: Batch) -> None:
        pos = batch.checkpoint
        if not isinstance(pos, StreamPos) or not pos.shard:
            return
        st = states[pos.shard]
        if not applied[pos.shard].is_set():
            applied[pos.shard].set()
            if all(e.is_set() for e in applied.values()):
                task.healthy()
                task.progress.snapshot_done = True
        assert st.reader is not None
        st.reader.acked(pos)
        st.progress.applied_offset = pos.offset
        st.progress.source_offset = max(st.progress.source_offset, pos.offset)
        ck[pos.shard] = pos.to_json()
        if durable and any(p == pos.shard and pos.offset >= f
                           for h in durable.values() for p, f in h):
            for slot, h in list(durable.items()):
                h[:] = [(p, f) for p, f in h if p != pos.shard or pos.offset < f]
                if not h:
                    del durable[slot]
            task.checkpoint["moved"] = moved_json(durable)
        task._dirty = True
        _aggregate(task, states)

    async def read_all() -> None:
        async with asyncio.TaskGroup() as tg:
            for key, st in states.items():
                assert st.reader is not None
                port = fan.port(key)
                if handoff is None:
                    tg.create_task(st.reader.run(port))  # type: ignore[arg-type]
                    continue
                # slots may move between shards: each reader's batches pass its gate
                gate = handoff.gate(key, port.put)
                tg.create_task(gate.run())
                tg.create_task(st.reader.run(gate))  # type: ignore[arg-type]

    task.set_phase("snapshot" if any(r is None for r in resumes.values()) else
                   "incremental")
    async def follow(conn: Connection) -> None:
        """The source's slot map, read every second: slots moved between shards get their
        fences (incremental) or the snapshot is copied again (a full migration, whose
        shards' RDBs were taken at different times)."""
        now = await _read_owner(conn, states)
        if handoff is None:
            if now != owner:
                raise _copy_again(owner, now, "its snapshot was read")
            return
        handoff.tick()
        if now == handoff.owner:
            return
        if router is not None:      # (back in a marker ring once settled)
            router.slots_moved(s for s in range(SLOTS) if now[s] != handoff.owner[s])
        for slot, step in (await handoff.remap(now)).items():
            durable.setdefault(slot, []).append(step)
        for key, st in states.items():
            st.slots = frozenset(s for s in range(SLOTS) if now[s] == key)
        task.checkpoint["shard_slots"] = owner_json(now)
        task.checkpoint["moved"] = moved_json(durable)
        task._dirty = True

    try:
        await run_pipeline(read_all(), writer.run(queue, ack), task._checkpointer(),
                           _poll(task, states, follow), task._watch_target(),
                           *task._verifier())
    finally:
        if handoff is not None:
            handoff.close()
    task.progress.snapshot_done = True
    await task.persist()


def _aggregate(task: Task, states: dict[str, ShardState]) -> None:
    """The task's offsets and lag are the sums over its shards."""
    p = task.progress
    p.source_offset = sum(s.progress.source_offset for s in states.values())
    p.applied_offset = sum(s.progress.applied_offset for s in states.values())
    lags = [s.progress.lag_ms for s in states.values() if s.progress.lag_ms is not None]
    p.lag_ms = max(lags) if lags else None
    total = sum(s.progress.keys_total for s in states.values())
    if total:
        p.keys_total = max(p.keys_total, total)


async def _poll(task: Task, states: dict[str, ShardState],
                follow: Callable[[Connection], Awaitable[None]]) -> None:
    """Every second: each shard master's offset (lag counts what is not read yet)."""
    conns: dict[str, Connection] = {}
    try:
        for key, st in states.items():
            conns[key] = await Connection.open(*st.node.dial, role="source",
                                               ep=task.spec.source)
        first = True
        while True:
            for key, conn in conns.items():
                st = states[key]
                info = parse_info(await conn.call("INFO", "replication"))
                reader = st.reader
                if reader is not None and reader.replid in (info.get("master_replid"),
                                                            info.get("master_replid2")):
                    off = int(info.get("master_repl_offset", "0") or 0)
                    st.progress.source_offset = max(off, st.progress.applied_offset)
                if first:
                    held = keyspace(parse_info(await conn.call("INFO", "keyspace")))
                    st.progress.keys_total = sum(n for db, n in held.items()
                                                 if task.spec.filter.db_ok(db))
            first = False
            _aggregate(task, states)
            await follow(next(iter(conns.values())))
            await asyncio.sleep(1.0)
    except EndpointError as exc:
        raise EndpointError(f"{exc.message} (source shard poll)") from None
    finally:
        for conn in conns.values():
            conn.close()


def _copy_again(owner: list[str], now: list[str], while_: str) -> EndpointError:
    """A full copy's source resharded under it: its shards' copies were taken at different
    moments, so a key moving between them could be missed."""
    moved = [s for s in range(SLOTS) if now[s] != owner[s]]
    return EndpointError(f"the source was resharded while {while_} (slots "
                         f"{_ranges(moved)[:100]} moved): copying again")


def _offset(raw: dict[str, Any] | None) -> int:
    pos = StreamPos.from_json(raw)
    return -1 if pos is None else pos.offset


async def _read_owner(conn: Connection, states: dict[str, ShardState]) -> list[str]:
    """The source's slot map by shard key (CLUSTER NODES: every version, one call). A
    master new to the task serving slots (a replica promoted, a master added) restarts the
    readers: they then match each master to its shard (``assign_keys``)."""
    raw = await conn.call("CLUSTER", "NODES")
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
    key_of = {st.shard.master.node_id: key for key, st in states.items()}
    owner = [""] * SLOTS
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 9 or "master" not in parts[2]:
            continue
        ranges = [f for f in parts[8:] if not f.startswith("[")]
        if not ranges:
            continue
        key = key_of.get(parts[0])
        if key is None:
            raise TopologyChanged(f"source master {parts[1].split('@')[0]} serves slots "
                                  f"{','.join(ranges)[:80]} and is new to the task (a "
                                  f"failover, or a master added): the shards' readers "
                                  f"start again from their checkpoints")
        for slot in _range_slots(ranges):
            owner[slot] = key
    return owner


async def run_sharded_scan(task: Task, topology: Topology, target: Connection) -> None:
    """A cluster source with the scan reader (a source that refuses PSYNC, as managed
    services do): one SCAN + DUMP reader per master, all feeding the one writer.

    A full copy resumes each master's scan from its own cursor
    (``checkpoint["scan_shards"]``); slots that move while the masters are scanned could
    carry keys behind a cursor, so the copy starts again (its writes are idempotent).

    An incremental task subscribes to every master's keyspace notifications first, scans
    every master, then copies the notified keys again, each read on the master that
    notified it (``ASKING`` first: a master importing a slot holds its migrated keys; a
    master that gave the key away answers MOVED/ASK and leaves it to the new owner's own
    notification). As for a standalone source this feed is best effort, and every start
    scans again; a master new to the task restarts it with a subscription of its own."""
    from .readers.notify import NotificationFeed
    from .readers.scan import ScanSnapshot
    from .task import QUEUE_BATCHES, run_pipeline
    spec = task.spec
    ck: dict[str, Any] = task.checkpoint.setdefault("scan_shards", {})
    forced = task.checkpoint.get("resync")
    if forced or spec.incremental:
        ck.clear()          # (notifications sent while down are lost: scan again)
    states = {str(s.ranges[0][0]): ShardState(str(s.ranges[0][0]), s) for s in topology.shards}
    task.shard_states = states
    if set(ck) - set(states):
        ck.clear()          # the masters changed since: every shard is scanned again
    owner = owner_list({k: st.slots for k, st in states.items()})
    queue: asyncio.Queue[Batch | None] = asyncio.Queue(maxsize=QUEUE_BATCHES)
    fan = FanIn(queue, len(states))
    writer = await task._writer(target, replace=task._replace(bool(forced) or
                                                              spec.incremental))
    conns: list[Connection] = []
    feeds = {key: NotificationFeed(spec, st.progress, task.plan, node=st.node.dial)
             for key, st in states.items()} if spec.incremental else {}
    scanned = asyncio.Event()

    class _Tag:
        """A shard's port: its cursor checkpoints tagged with the shard."""

        def __init__(self, key: str) -> None:
            self.key = key
            self.port = fan.port(key)

        async def put(self, batch: Batch | None) -> None:
            if batch is not None and batch.checkpoint is not None:
                batch.checkpoint = (self.key, batch.checkpoint)
            await self.port.put(batch)

    async def ack(batch: Batch) -> None:
        if isinstance(batch.checkpoint, tuple):
            key, mark = batch.checkpoint
            if isinstance(mark, tuple) and mark[0] == "notify":
                task.progress.lag_ms = (time.monotonic() - mark[1]) * 1000
            elif not spec.incremental:
                ck[key] = mark
                task._dirty = True
            task.healthy()
        _aggregate(task, states)

    async def shard(key: str, st: ShardState) -> None:
        conn = await Connection.open(*st.node.dial, role="source", ep=spec.source)
        conns.append(conn)
        st.phase = "snapshot"
        scan = ScanSnapshot(conn, spec, st.progress, ck.get(key), plan=task.plan)
        scan.replace = writer.replace
        await scan.run(_Tag(key), end=not spec.incremental)  # type: ignore[arg-type]
        st.phase = "scanned"
        if not spec.incremental:
            return
        # Every master scanned before any notified key is copied: a scan batch must never
        # overwrite a newer value the feed of another master wrote.
        if all(s.phase == "scanned" for s in states.values()):
            task.progress.snapshot_done = True
            task.set_phase("incremental")
            task.healthy()
            scanned.set()
        await scanned.wait()
        st.phase = "incremental"
        feeds[key].snapshot_done.set()
        await feeds[key].run(_Tag(key))  # type: ignore[arg-type]

    async def read_all() -> None:
        async with asyncio.TaskGroup() as tg:
            for key, st in states.items():
                tg.create_task(shard(key, st))
            for feed in feeds.values():
                tg.create_task(feed.listen())

    async def follow(conn: Connection) -> None:
        now = await _read_owner(conn, states)    # (a master new to the task: restart)
        if now != owner and not spec.incremental:
            ck.clear()
            raise _copy_again(owner, now, "its masters were scanned")

    task.set_phase("snapshot")
    if spec.incremental:
        task.note = "incremental changes come from every master's keyspace notifications " \
                    "(best effort)"
        task.reason = task.note
    try:
        for feed in feeds.values():
            await feed.subscribe()
        await run_pipeline(read_all(), writer.run(queue, ack), task._checkpointer(),
                           _poll(task, states, follow), task._watch_target())
    finally:
        for conn in conns:
            conn.close()
        for feed in feeds.values():
            if feed.sub is not None:
                feed.sub.close()
    for st in states.values():
        st.phase = "done"
    task.progress.snapshot_done = True
    task.checkpoint.pop("resync", None)
    await task.persist()
