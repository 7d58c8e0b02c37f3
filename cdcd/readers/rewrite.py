"""Write snapshot values as commands instead of RESTORE (write_mode rewrite, cdcd.compat).

Both readers hand a key's DUMP payload (psync: cut from the RDB; scan: DUMP's reply) to a
:class:`Rewriter` and get COMMAND entries back:

    SET key value [PXAT ms]                     a string (NX with existing_keys skip)
    MSET k v k v ...                            a snapshot's strings without a TTL (the
                                                writer's STRINGS entries, as scan sends)
    MULTI; DEL key; RPUSH|SADD|ZADD|HSET key ...; [PEXPIREAT key ms]; EXEC
                                                any other type, existing_keys replace
    XADD key id f v ...; XSETID; XGROUP CREATE; XGROUP CREATECONSUMER; XCLAIM
                                                a stream's entries and groups (in the MULTI)

With existing_keys skip a non-string value is built in a temporary key and moved with
RENAMENX, as a big key is (readers/bigkey.py), so the target's key wins. Values over the
readers' big-value threshold already arrive decoded and go down that chunked path.

A value that no command rebuilds (a module type, a hash with field TTLs) stops the task
with FatalTaskError naming the key; with ``modules: skip`` a module value is left out,
counted in keys_skipped and listed in the task view (``progress.snapshot.not_written``).
"""

from __future__ import annotations

import time

from ..compat import WritePlan
from ..entry import COMMAND, STRINGS, Entry
from ..errors import FatalTaskError
from ..progress import Progress
from ..rdb.primitives import _read_string
from ..rdb.records import _Corrupt, _NeedMore
from ..rdb.values import ModuleValue, ValueNotRewritable, decode_payload
from ..spec import TaskSpec
from .bigkey import CHUNK_BYTES, CHUNK_ELEMENTS, BigKey

# Plain strings of a snapshot go to the target as one MSET per group of at most this many
# keys / value bytes (as the scan reader's), not a SET each.
STRINGS_KEYS = 1024
STRINGS_BYTES = 1 << 20


class Rewriter:
    """Turn one key's DUMP payload into COMMAND entries (see the module docstring)."""

    def __init__(self, plan: WritePlan, spec: TaskSpec, progress: Progress, *, source: str,
                 chunk_bytes: int = CHUNK_BYTES, chunk_elements: int = CHUNK_ELEMENTS) -> None:
        self.plan = plan
        self.task_id = spec.task_id
        self.skip_modules = spec.modules == "skip"
        self.progress = progress
        self.source = source
        self.chunk_bytes = chunk_bytes
        self.chunk_elements = chunk_elements

    def key(self, db: int, key: bytes, payload: bytes, expire_ms: int, replace: bool,
            out: list[Entry]) -> int:
        """Append the commands that write ``key`` (absolute expiry ms, <= 0: none; replace:
        the target's key is overwritten, else kept); return the bytes they carry (what a
        batch is sized by)."""
        try:
            kind, items, meta = decode_payload(payload)
        except ModuleValue as exc:
            if not self.skip_modules:
                raise FatalTaskError(f"{self.source}: key {key[:80]!r} (db {db}) cannot be "
                                     f"written with write_mode rewrite: {exc} (or set "
                                     f"\"modules\": \"skip\" to leave such keys out)") from None
            self.progress.not_written_key(f"db {db} key {key[:80]!r}: {exc}")
            return 0
        except ValueNotRewritable as exc:
            raise FatalTaskError(f"{self.source}: key {key[:80]!r} (db {db}) cannot be "
                                 f"written with write_mode rewrite: {exc}") from None
        if kind == "string":
            return self.string(db, key, items[0], expire_ms, replace, out)
        big = BigKey(db, key, kind, task_id=self.task_id, replace=replace,
                     chunk_bytes=self.chunk_bytes, chunk_elements=self.chunk_elements,
                     direct=replace, stream_counters=self.plan.stream_counters)
        n = big.begin(out)
        n += big.add_chunk(items, out)
        return n + big.finish(max(expire_ms, 0), out, meta)

    def snapshot_key(self, db: int, key: bytes, rdb_type: int, payload: bytes, expire_ms: int,
                     replace: bool, out: list[Entry]) -> int:
        """A key of a snapshot, as ``key`` does, except that a plain string without a TTL
        joins the STRINGS entry (one MSET) at the end of ``out`` (the writer counts those
        keys); any other key is counted in keys_done once queued."""
        if rdb_type == 0 and expire_ms <= 0:
            n = join_string(db, key, payload, out)
            if n:
                return n
        n = self.key(db, key, payload, expire_ms, replace, out)
        # The writer counts RESTOREs and STRINGS; a key written as commands counts here.
        self.progress.keys_done += 1
        self.progress.snapshot_bytes += len(payload)
        return n

    def restore_command(self, db: int, args: list[bytes]) -> list[list[bytes]]:
        """The commands with the effect of a replicated ``RESTORE key ttl payload
        [REPLACE] [ABSTTL] [IDLETIME s] [FREQ f]`` (a MIGRATE into the source, an app's
        DUMP/RESTORE), for a target that refuses the payload. It ran on the source, so the
        key was free there or REPLACE was given: on the copy it replaces. No MULTI: a
        stream batch is one transaction of the writer's already."""
        if len(args) < 4:
            return [args]
        key, ttl, payload = args[1], int(args[2]), args[3]
        absolute = any(a.lower() == b"absttl" for a in args[4:])
        expire = ttl if absolute else (int(time.time() * 1000) + ttl if ttl > 0 else 0)
        out: list[Entry] = []
        self.key(db, key, payload, expire if ttl > 0 else 0, True, out)
        return [e[2] for e in out if e[2][0] not in (b"MULTI", b"EXEC")]

    def string(self, db: int, key: bytes, value: bytes, expire_ms: int, replace: bool,
               out: list[Entry]) -> int:
        """Append the SET that writes a string (absolute expiry ms, <= 0: none)."""
        cmd = [b"SET", key, value]
        if expire_ms > 0:
            cmd += [b"PXAT", b"%d" % expire_ms]
        if not replace:
            cmd.append(b"NX")
        out.append((COMMAND, db, cmd))
        return len(key) + len(value) + 48


def join_string(db: int, key: bytes, payload: bytes, out: list[Entry]) -> int:
    """Append a plain string (its DUMP payload) to the STRINGS entry (one MSET) at the end
    of ``out``, or start one; return the bytes it adds, or 0 when the payload is not a
    readable string (then nothing is appended: whoever writes it says what is wrong)."""
    try:
        value = _read_string(payload, 1, len(payload) - 10)[0]
    except (_NeedMore, _Corrupt, IndexError):
        return 0
    last = out[-1] if out else None   # (an entry, or the splitter's record of another kind)
    if type(last) is tuple and last[0] == STRINGS and last[1] == db and \
            last[3] < STRINGS_KEYS and last[4] < STRINGS_BYTES:
        last[2].extend((key, value))
        out[-1] = (STRINGS, db, last[2], last[3] + 1, last[4] + len(value))
    else:
        out.append((STRINGS, db, [key, value], 1, len(value)))
    return len(key) + len(value) + 16
