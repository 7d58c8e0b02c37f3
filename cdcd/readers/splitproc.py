"""Where a psync reader's RDB records come from: its own splitter, then, for a big RDB, a
helper process's (#12 point 8: use the cores).

Splitting the RDB is the daemon's hottest code during a full sync, about half its CPU,
and a cluster source's shards sync at once: in one event loop they would all share one
core. So once an RDB has gone past ``HANDOVER_BYTES``, the reader starts a helper process
(``python -m cdcd.readers.splitproc``), and as soon as it is up hands it the splitter's
state at the next key boundary (``RdbSplitter.suspend``). From then on the reader pipes
the RDB's bytes to the helper as they arrive and gets back the records, pickled, which it
handles exactly as its own splitter's: the filters, the handoff gate, big keys, batching
and writing stay in the daemon. The helper joins plain strings without a TTL into STRINGS
entries (one MSET: half the target's CPU of a RESTORE per key). A small RDB never starts
a helper (its start-up would cost more than it saves); at most ``max_helpers`` run at
once (the ``rdb_processes`` setting), the other readers split in the event loop as
before.

The helper only computes: it writes to no server, so one outliving its daemon (kill -9)
changes nothing, and it exits at the end of its input.

Frames, both ways: a type byte, a 4-byte big-endian length, the body.

    to the helper    S  the splitter's state and callbacks (pickle)
                     D  RDB bytes (then, diskless, whatever the master sent after them)
                     E  the RDB's announced length has been sent
    to the daemon    H  ready (sent once at start, before reading anything)
                     R  records (a pickled list)
                     F  the RDB is complete: (keys seen, bytes fed after its end) pickled
                     T  bytes received after F, returned as they are
                     X  the RDB is malformed: RdbError's message
                     N  E came before the RDB's end
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import signal
import struct
import sys
from typing import TYPE_CHECKING, Any, BinaryIO

from ..entry import restore_entry
from ..errors import EndpointError
from ..rdb import RdbError, RdbSplitter
from .rewrite import join_string

if TYPE_CHECKING:
    from ..resp import Connection
    from ..spec import Filter
    from .psync import PsyncReader

log = logging.getLogger("cdcd.reader.splitproc")

# An RDB is handed to a helper once this much of it has been split in the event loop.
HANDOVER_BYTES = 1 << 20
# RDB bytes per slice split in the event loop (each a turn of the loop), and per frame
# piped to a helper.
RDB_SLICE = 1 << 14
PIPE_CHUNK = 1 << 16
_HEAD = struct.Struct(">cI")


def auto_helpers() -> int:
    """How many helpers by default: one per CPU beyond two. On two cores the machine is
    already full during a full sync (the source's forks, the target, the event loop): a
    helper there adds the pickling's CPU and takes longer (measured: 2.2 s instead of
    2.0 s for a 3-shard snapshot of 1M keys)."""
    return max(0, (os.cpu_count() or 1) - 2)


# How many helpers may run at once (the rdb_processes setting; 0: never start one).
max_helpers = auto_helpers()
_running = 0


class RdbFeed:
    """The records of one RDB read from a psync link, in order, list by list."""

    # Tests set it: once a helper is starting, wait for it instead of splitting on (so that
    # a small RDB is handed over for sure).
    wait_for_helper = False

    def __init__(self, reader: PsyncReader, conn: Connection, splitter: RdbSplitter,
                 remaining: int) -> None:
        """``remaining``: the RDB's announced length, or -1 (diskless: it ends where the
        splitter says)."""
        self.reader = reader
        self.conn = conn
        self.splitter = splitter
        self.remaining = remaining
        self.keys_seen = 0
        self.helper_pid = 0
        self._split = 0            # bytes split in the event loop
        self._rest = b""
        self._done = False
        self._proc: asyncio.subprocess.Process | None = None
        self._starting: asyncio.Task[None] | None = None
        self._pump: asyncio.Task[None] | None = None
        self._pump_error: BaseException | None = None
        self._counted = False

    async def next(self) -> list[Any] | None:
        """The next list of records; None once the RDB is complete."""
        if self._done:
            return None
        if self._pump is not None:
            return await self._remote()
        splitter = self.splitter
        if splitter.backlog:
            return splitter.feed(b"")   # a big value: its next window
        if splitter.done:
            self._finish(splitter.keys_seen, splitter.take_rest())
            return None
        if self.remaining == 0:
            raise EndpointError(f"{self.reader.name}: RDB ended before its EOF opcode")
        if self.wait_for_helper and self._starting is not None:
            await asyncio.shield(self._starting)
        if self._proc is not None and self._ready():
            state = splitter.suspend()
            if state is not None:
                self._hand_over(state)
                return await self._remote()
        # Slices of RDB_SLICE, each a turn of the event loop: neither read() of buffered
        # data nor put() into a queue with room yields, and the API (and a cluster's other
        # shards) must get their turn every millisecond or so.
        await asyncio.sleep(0)
        data = self._cut(await self.reader._read(self.conn, RDB_SLICE))
        self._split += len(data)
        if self._split >= HANDOVER_BYTES and self._starting is None and self.remaining != 0:
            self._starting = asyncio.create_task(self._start())
        return splitter.feed(data)

    def take_rest(self) -> bytes:
        """The bytes read past the RDB's end (the replication stream's first bytes)."""
        rest, self._rest = self._rest, b""
        return rest

    async def close(self) -> None:
        """Stop the helper, if any (the RDB complete, or the reader giving up)."""
        if self._starting is not None:
            self._starting.cancel()
            await asyncio.gather(self._starting, return_exceptions=True)
        if self._pump is not None:
            self._pump.cancel()
            await asyncio.gather(self._pump, return_exceptions=True)
        proc, self._proc = self._proc, None
        if proc is not None:
            await _end(proc)
        self._release()

    # --- in the event loop ------------------------------------------------------------------

    def _cut(self, data: bytes) -> bytes:
        """Keep what follows a sized RDB for the stream."""
        if self.remaining >= 0:
            if len(data) > self.remaining:
                self.reader._buf = data[self.remaining:]
                data = data[:self.remaining]
            self.remaining -= len(data)
        return data

    def _finish(self, keys_seen: int, rest: bytes) -> None:
        self.keys_seen = keys_seen
        self._rest += rest
        self._done = True

    async def _start(self) -> None:
        """Start a helper and wait for its hello (the reader goes on splitting meanwhile)."""
        global _running
        if _running >= max_helpers:
            return
        _running += 1
        self._counted = True
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "cdcd.readers.splitproc",
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        except OSError as exc:
            log.warning("%s: cannot start an RDB helper process, splitting here: %s",
                        self.reader.name, exc)
            self._release()
            return
        self._proc = proc
        assert proc.stdout is not None
        try:
            kind, _ = await _read_frame(proc.stdout)
        except (EOFError, asyncio.IncompleteReadError, ConnectionError):
            kind = b""
        if kind != b"H":
            log.warning("%s: the RDB helper process did not start, splitting here",
                        self.reader.name)
            self._proc = None
            await _end(proc)
            self._release()

    def _ready(self) -> bool:
        return self._starting is not None and self._starting.done() and self._proc is not None

    def _release(self) -> None:
        global _running
        if self._counted:
            self._counted = False
            _running -= 1

    def _hand_over(self, state: dict[str, Any]) -> None:
        proc = self._proc
        assert proc is not None and proc.stdin is not None
        self.helper_pid = proc.pid
        log.info("%s: RDB splitting goes on in helper process %d after %.1f MiB",
                 self.reader.name, proc.pid, self._split / (1 << 20))
        self.reader.progress.status = (f"receiving the source's RDB (split in helper "
                                       f"process {proc.pid})")
        # what the reader's splitter was made of, for the helper to make it again
        rewrite = self.reader.plan.rewrite
        _write_frame(proc.stdin, b"S", pickle.dumps(
            {"state": state, "filter": self.reader.spec.filter, "rewrite": rewrite,
             "strings": not rewrite and self.reader.replace},
            protocol=pickle.HIGHEST_PROTOCOL))
        self._pump = asyncio.create_task(self._piping(proc.stdin))

    # --- with a helper ----------------------------------------------------------------------

    async def _piping(self, stdin: asyncio.StreamWriter) -> None:
        """Pipe the link's bytes to the helper until cancelled (the RDB complete) or, for a
        sized RDB, its last byte. A failure is kept for ``_remote`` and ends the helper's
        input, so that it exits and ``_remote`` sees why."""
        try:
            while self.remaining != 0:
                data = self._cut(await self.reader._read(self.conn, PIPE_CHUNK))
                _write_frame(stdin, b"D", data)
                await stdin.drain()
            _write_frame(stdin, b"E", b"")
            await stdin.drain()
        except asyncio.CancelledError:
            raise
        except Exception as exc:   # the link's EndpointError, the helper's broken pipe
            self._pump_error = exc
            stdin.close()

    async def _remote(self) -> list[Any] | None:
        proc = self._proc
        assert proc is not None and proc.stdout is not None and proc.stdin is not None
        try:
            kind, body = await _read_frame(proc.stdout)
        except (asyncio.IncompleteReadError, ConnectionError):
            kind, body = b"", b""
        if kind == b"R":
            records: list[Any] = pickle.loads(body)
            return records
        if kind == b"F":
            keys_seen, rest = pickle.loads(body)
            assert self._pump is not None
            self._pump.cancel()   # safe at any await: what it read is in the pipe or unread
            await asyncio.gather(self._pump, return_exceptions=True)
            if self._pump_error is not None:
                raise self._pump_error
            proc.stdin.close()    # the helper returns what it still gets (T), then exits
            while True:
                try:
                    kind, more = await _read_frame(proc.stdout)
                except (asyncio.IncompleteReadError, ConnectionError):
                    break
                if kind == b"T":
                    rest += more
            self._finish(keys_seen, rest)
            return None
        if kind == b"X":
            raise RdbError(body.decode(errors="replace"))
        if kind == b"N":
            raise EndpointError(f"{self.reader.name}: RDB ended before its EOF opcode")
        if self._pump_error is not None:
            raise self._pump_error
        code = await proc.wait()
        raise EndpointError(f"{self.reader.name}: the RDB helper process {proc.pid} ended "
                            f"(exit status {code}) before the RDB did")


async def _end(proc: asyncio.subprocess.Process) -> None:
    """Kill a helper (if still running) and reap it."""
    if proc.returncode is None:
        try:
            proc.kill()
        except ProcessLookupError:
            pass
    if proc.stdin is not None:
        proc.stdin.close()
    if proc.stdout is not None:
        # Read its output to the end: wait() waits for the pipes to close too, and a pipe
        # paused by flow control (output not read) never would.
        try:
            while await proc.stdout.read(PIPE_CHUNK):
                pass
        except (ConnectionError, OSError):
            pass
    await proc.wait()


def _write_frame(out: asyncio.StreamWriter, kind: bytes, body: bytes) -> None:
    out.write(_HEAD.pack(kind, len(body)))
    if body:
        out.write(body)


async def _read_frame(inp: asyncio.StreamReader) -> tuple[bytes, bytes]:
    kind, n = _HEAD.unpack(await inp.readexactly(_HEAD.size))
    return kind, (await inp.readexactly(n) if n else b"")


# --- the helper process -----------------------------------------------------------------------

def _send(out: BinaryIO, kind: bytes, body: bytes = b"") -> None:
    out.write(_HEAD.pack(kind, len(body)))
    out.write(body)
    out.flush()


def _receive(inp: BinaryIO) -> tuple[bytes, bytes] | None:
    head = inp.read(_HEAD.size)
    if len(head) < _HEAD.size:
        return None
    kind, n = _HEAD.unpack(head)
    body = inp.read(n) if n else b""
    return None if len(body) < n else (kind, body)


def helper(inp: BinaryIO, out: BinaryIO) -> None:
    """Split what comes in, send back what it makes (see the module's docstring)."""
    _send(out, b"H")
    splitter: RdbSplitter | None = None
    strings = False
    dump = pickle.dumps
    while (frame := _receive(inp)) is not None:
        kind, body = frame
        if kind == b"S":
            given = pickle.loads(body)
            flt: Filter = given["filter"]
            strings = given["strings"]
            splitter = RdbSplitter.resume(
                given["state"], want=flt.rdb_want(),
                key_record=None if given["rewrite"] else restore_entry)
        elif splitter is None:
            raise SystemExit("cdcd RDB helper: data before the splitter's state")
        elif kind == b"D":
            if splitter.done:
                _send(out, b"T", body)
                continue
            try:
                records = splitter.feed(body)
                while True:
                    if strings:
                        records = _strings_joined(records)
                    if records:
                        _send(out, b"R", dump(records, protocol=pickle.HIGHEST_PROTOCOL))
                    if not splitter.backlog:
                        break
                    records = splitter.feed(b"")
            except RdbError as exc:
                _send(out, b"X", str(exc).encode())
                return
            if splitter.done:
                _send(out, b"F", dump((splitter.keys_seen, splitter.take_rest())))
        elif kind == b"E" and not splitter.done:
            _send(out, b"N")
            return


def _strings_joined(records: list[Any]) -> list[Any]:
    """``records`` with their plain strings (no TTL) joined into STRINGS entries: one MSET
    on the target costs it half what a RESTORE per key does."""
    out: list[Any] = []
    for rec in records:
        if not (type(rec) is tuple and rec[3] == 0 and rec[4][0] == 0 and
                join_string(rec[1], rec[2], rec[4], out)):
            out.append(rec)
    return out


def main() -> None:
    # The daemon's Ctrl-C reaches its whole process group: the helper ends with its input.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        helper(sys.stdin.buffer, sys.stdout.buffer)
    except BrokenPipeError:   # the daemon went away
        pass


if __name__ == "__main__":
    main()
