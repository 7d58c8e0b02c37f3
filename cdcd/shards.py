"""A Redis Cluster as the source: one replica link (PsyncReader) per master shard, all
feeding the task's one writer.

Each shard has its own stream position (``checkpoint["shards"][key]``) and its own
marker on the target (``cdcd:checkpoint:<task_id>:<key>``, written in the MULTI/EXEC of
that shard's batches), so every shard resumes on its own: a crash, a cut link or a shard
failover costs a partial resync of each shard, and a full resync (the backlog no longer
has the position) is limited to the shard that needs it, its stale keys removed by slot.

A shard is keyed by the first slot it serves (``"0"``, ``"5461"``...), which a failover
keeps: the promoted replica continues its old master's stream (``replid2``), so the
shard's checkpoint is good for it. Commands of different shards touch different slots,
hence different keys: the streams are applied independently, each in its own order.
Resharding the source while a task runs is not handled yet (the precheck and README say
so).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import TYPE_CHECKING, Any

from .entry import Batch
from .errors import EndpointError, FatalTaskError
from .markers import SlotMarkers
from .progress import Progress
from .readers.psync import PsyncReader, StreamPos, key_hash
from .resp import Connection, keyspace, parse_info
from .router import ClusterRouter
from .topology import Shard, Topology, key_slot

if TYPE_CHECKING:
    from .task import Task

log = logging.getLogger("cdcd.shards")


def shard_key(shard: Shard) -> str:
    return str(shard.ranges[0][0])


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
        if isinstance(batch.checkpoint, StreamPos):
            batch.checkpoint = dataclasses.replace(batch.checkpoint, shard=self.key)
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
        self.slots = frozenset(s for a, b in shard.ranges for s in range(a, b + 1))
        self.phase = "connecting"

    def view(self) -> dict[str, Any]:
        p = self.progress
        return {"shard": self.key, "node": self.node.name, "role": self.node.role,
                "slots": self.shard.slots_text(), "phase": self.phase,
                "replid": self.reader.replid if self.reader else "",
                "source_offset": p.source_offset, "applied_offset": p.applied_offset,
                "lag_bytes": max(0, p.source_offset - p.applied_offset),
                "keys_total": p.keys_total, "full_resyncs": p.full_resyncs}


async def run_sharded(task: Task, topology: Topology, target: Connection,
                      restarted: bool) -> None:
    """The psync pipeline of a task whose source is a cluster."""
    from .task import QUEUE_BATCHES, remove_stale_keys, run_pipeline, source_dbs
    spec = task.spec
    states = {shard_key(s): ShardState(shard_key(s), s, spec.source.read_from)
              for s in topology.shards}
    task.shard_states = states
    ck: dict[str, Any] = task.checkpoint.setdefault("shards", {})
    forced = task.checkpoint.get("resync")
    if forced:
        ck.clear()          # every shard starts over (the shards may have changed)
        task.checkpoint.pop("shard_resync", None)
    for key in list(ck):
        if key not in states:
            raise FatalTaskError(f"the source cluster's shards changed (no master serves "
                                 f"slot {key} as the first of its slots any more): a "
                                 f"resharding of the source is not followed yet; resync "
                                 f"the task")
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
        router.shard_slots = {k: sorted(st.slots) for k, st in states.items()}
        if spec.incremental:
            marks, changed = await task.cluster_marks(router)
    for key, st in states.items():
        local = StreamPos.from_json(ck.get(key))
        resume = None
        if spec.incremental and not forced:
            if router is not None:
                verdict = SlotMarkers.judge(marks, local, changed, slots=st.slots)
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
        redo = bool(forced) or restarted or key in shard_forced

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
                             after_rdb=after_rdb, parse=router is not None)
        reader.name = f"source shard {st.node.name} (slots {st.shard.slots_text()})"
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
        task._dirty = True
        _aggregate(task, states)

    async def read_all() -> None:
        async with asyncio.TaskGroup() as tg:
            for key, st in states.items():
                assert st.reader is not None
                tg.create_task(st.reader.run(fan.port(key)))  # type: ignore[arg-type]

    task.set_phase("snapshot" if any(r is None for r in resumes.values()) else
                   "incremental")
    await run_pipeline(read_all(), writer.run(queue, ack), task._checkpointer(),
                       _poll(task, states), task._watch_target(), *task._verifier())
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


async def _poll(task: Task, states: dict[str, ShardState]) -> None:
    """Every second: each shard master's offset (lag counts what is not read yet)."""
    conns: dict[str, Connection] = {}
    try:
        for key, st in states.items():
            conns[key] = await Connection.open(*st.node.dial, role="source",
                                               ep=task.spec.source)
        first = True
        rounds = 0
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
            if rounds % RESHARD_CHECK_EVERY == 0:
                await _check_shape(task, next(iter(conns.values())), states)
            rounds += 1
            await asyncio.sleep(1.0)
    except EndpointError as exc:
        raise EndpointError(f"{exc.message} (source shard poll)") from None
    finally:
        for conn in conns.values():
            conn.close()


RESHARD_CHECK_EVERY = 2     # seconds between looks at the source's slot map


async def _check_shape(task: Task, conn: Connection, states: dict[str, ShardState]) -> None:
    """Stop the task when the source is being resharded: a key MIGRATEd between shards is
    a DEL in one stream and a RESTORE in another, applied independently; without
    ordering them (not done yet) the target could lose it. Said, never silently."""
    raw = await conn.call("CLUSTER", "NODES")
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
    owned: dict[str, set[int]] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 8 or "master" not in parts[2]:
            continue
        for field in parts[8:]:
            if field.startswith("["):
                raise FatalTaskError(
                    f"the source cluster is being resharded (slot migration {field} seen in "
                    f"CLUSTER NODES): following a resharding of the source is not supported "
                    f"yet, and its keys could be lost on the target; resync the task once "
                    f"the resharding is done")
            a, _, b = field.partition("-")
            if a.isdigit():
                owned.setdefault(parts[0], set()).update(range(int(a), int(b or a) + 1))
    for st in states.values():
        if not any(st.slots <= slots for slots in owned.values()):
            raise FatalTaskError(
                f"the source cluster's slots moved (shard {st.shard.master.name}, slots "
                f"{st.shard.slots_text()}, is no longer served by one master): following a "
                f"resharding of the source is not supported yet; resync the task")
