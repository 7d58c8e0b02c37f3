"""Pure logic: which queued batches the writer folds into one transaction."""

from __future__ import annotations

import asyncio
from typing import Any

from cdcd.entry import COMMAND, Batch
from cdcd.progress import Progress
from cdcd.writer import Writer


class _NoConnection:
    db = 0
    name = "target test"


def writer() -> Writer:
    def marker(ckpt: Any) -> list[bytes] | None:
        return [b"SET", b"m", str(ckpt).encode()] if isinstance(ckpt, int) else None
    return Writer(_NoConnection(), progress=Progress(), marker=marker)  # type: ignore[arg-type]


def cmd(n: int) -> Batch:
    return Batch([(COMMAND, 0, [b"INCR", b"k%d" % n])], n, 10, 0)


async def test_stream_batches_merge_up_to_a_batch_without_marker() -> None:
    q: asyncio.Queue[Batch | None] = asyncio.Queue()
    tail = Batch([(COMMAND, 0, [b"MULTI"])], None, 5, 0)
    for b in (cmd(2), cmd(3), tail, cmd(4), None):
        q.put_nowait(b)
    held: list[Batch | None] = []
    merged = writer()._merge_queued(cmd(1), q, held)
    assert [e[2][1] for e in merged.entries] == [b"k1", b"k2", b"k3"]
    assert merged.checkpoint == 3 and merged.nbytes == 30
    assert held == [tail]            # sent on its own next, never inside a MULTI
    assert q.qsize() == 2


async def test_end_of_input_is_held_and_snapshot_batches_are_not_merged() -> None:
    q: asyncio.Queue[Batch | None] = asyncio.Queue()
    q.put_nowait(None)
    held: list[Batch | None] = []
    one = cmd(1)
    assert writer()._merge_queued(one, q, held) is one and held == [None]
    snap = Batch([(COMMAND, 0, [b"SET", b"a", b"1"])], {"db": 0, "cursor": 5}, 1, 1)
    q.put_nowait(cmd(2))
    assert writer()._merge_queued(snap, q, []) is snap and q.qsize() == 1
