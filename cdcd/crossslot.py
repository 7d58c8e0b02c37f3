"""How a replicated command lands on a Redis Cluster target.

A standalone source runs multi-key commands freely; a cluster only takes commands whose
keys share one slot. ``plan`` looks at one command of the replication stream and says how
to apply it so the target ends exactly as the source:

- ``ONE``: every key in one slot (nearly every command): sent as it is, in that slot's
  MULTI/EXEC with the slot's marker;
- ``SPLIT``: a command whose per-slot parts have the same effect as the whole (MSET,
  MSETNX, DEL, UNLINK, TOUCH): one part per slot;
- ``RENAME``, ``COPY``, ``SMOVE``, ``LMOVE``: moved values, applied destination first, then
  source, each in its own slot's MULTI/EXEC (readers/values taken from the target, which
  holds exactly the source's state at that point of the stream);
- ``STORE``: a command that writes one destination from source keys of other slots (the
  *STORE family, PFMERGE, BITOP, SORT ... STORE, GEORADIUS ... STORE): the sources are
  copied into temporary keys of the destination's slot and the command runs on those, all
  in one MULTI/EXEC of the destination's slot;
- ``ALL``: keyless commands every master needs (FUNCTION, SCRIPT);
- ``FLUSH``: FLUSHALL/FLUSHDB, on every master;
- ``FATAL``: cannot be applied exactly (its ``why`` names it).

Everything here is pure: no I/O, so it is tested without servers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .topology import key_slot

ONE, SPLIT, RENAME, COPY, SMOVE, LMOVE, STORE, ALL, FLUSH, FATAL = range(10)

ALL_KEYS = {b"DEL", b"UNLINK", b"TOUCH", b"EXISTS"}
PAIRS = {b"MSET", b"MSETNX"}
TWO_KEYS = {b"RENAME": RENAME, b"RENAMENX": RENAME, b"COPY": COPY, b"SMOVE": SMOVE,
            b"LMOVE": LMOVE, b"BLMOVE": LMOVE, b"RPOPLPUSH": LMOVE, b"BRPOPLPUSH": LMOVE}
# dest, then every other argument a source key
DEST_FIRST = {b"SUNIONSTORE", b"SINTERSTORE", b"SDIFFSTORE", b"PFMERGE"}
# dest numkeys key ...
DEST_NUMKEYS = {b"ZUNIONSTORE", b"ZINTERSTORE", b"ZDIFFSTORE"}
# dest src ...
DEST_SRC = {b"ZRANGESTORE", b"GEOSEARCHSTORE"}
# keys after a numkeys argument at this position (all must share a slot)
NUMKEYS_AT = {b"EVAL": 2, b"EVALSHA": 2, b"EVAL_RO": 2, b"EVALSHA_RO": 2, b"FCALL": 2,
              b"FCALL_RO": 2, b"LMPOP": 1, b"ZMPOP": 1, b"BLMPOP": 2, b"BZMPOP": 2,
              b"SINTERCARD": 1, b"ZINTERCARD": 1}
# the key is not args[1]
KEY_AT = {b"XGROUP": 2, b"OBJECT": 2, b"MEMORY": 2}
ON_ALL = {b"FUNCTION", b"SCRIPT"}
KEYLESS = {b"PUBLISH"}          # no key: goes with slot 0's part of the batch


@dataclass(frozen=True)
class Plan:
    kind: int
    slot: int = 0
    # SPLIT: (slot, command) parts; STORE: (argument index, source key) of each source
    # outside the destination's slot
    parts: Sequence[tuple[int, list[bytes]]] = ()
    src: bytes = b""
    dst: bytes = b""
    dst_slot: int = 0
    src_slot: int = 0
    foreign: Sequence[tuple[int, bytes]] = ()
    why: str = ""


# Commands of the replication stream with exactly one key, at args[1]: the router takes
# their slot without building a Plan (most of a stream is these).
_SINGLE = ("SET SETNX SETEX PSETEX GETSET GETDEL GETEX APPEND SETRANGE SETBIT INCR INCRBY "
           "DECR DECRBY INCRBYFLOAT HSET HMSET HSETNX HDEL HINCRBY HINCRBYFLOAT LPUSH RPUSH "
           "LPUSHX RPUSHX LPOP RPOP LSET LTRIM LREM LINSERT SADD SREM SPOP ZADD ZREM ZINCRBY "
           "ZREMRANGEBYSCORE ZREMRANGEBYRANK ZREMRANGEBYLEX ZPOPMIN ZPOPMAX XADD XDEL XTRIM "
           "XACK XCLAIM XAUTOCLAIM XSETID PEXPIREAT EXPIREAT PEXPIRE EXPIRE PERSIST RESTORE "
           "PFADD GEOADD").split()
SINGLE_KEY = frozenset([n.encode() for n in _SINGLE] + [n.lower().encode() for n in _SINGLE])


def _name(args: list[bytes]) -> bytes:
    return args[0].upper()


def show(args: list[bytes]) -> str:
    head = args[0].decode(errors="replace").upper()
    if len(args) > 1:
        return f"{head} {args[1][:60]!r}"
    return head


def _one_slot(keys: list[bytes]) -> int | None:
    slots = {key_slot(k) for k in keys}
    return slots.pop() if len(slots) == 1 else None


def plan(args: list[bytes]) -> Plan:
    """Say how to apply one replicated command (args as the source sent them)."""
    name = _name(args)
    n = len(args)
    if name in ON_ALL:
        return Plan(ALL)
    if name in (b"FLUSHALL", b"FLUSHDB"):
        return Plan(FLUSH)
    if name in KEYLESS or n < 2:
        return Plan(ONE, 0)
    if name in (b"SWAPDB", b"MOVE"):
        return Plan(FATAL, why=f"{show(args)}: a Redis Cluster has db 0 only, so a command "
                               f"between dbs cannot be applied (filter the other dbs out)")
    if name in ALL_KEYS or name in PAIRS:
        step = 2 if name in PAIRS else 1
        if name in PAIRS and (n - 1) % 2:
            return Plan(FATAL, why=f"{show(args)}: odd number of arguments")
        out_name = b"MSET" if name == b"MSETNX" else args[0]
        by_slot: dict[int, list[bytes]] = {}
        for i in range(1, n, step):
            by_slot.setdefault(key_slot(args[i]), []).extend(args[i:i + step])
        if len(by_slot) == 1:
            return Plan(ONE, next(iter(by_slot)))
        # MSETNX is replicated only when it set every key (it sets all or none), so on a
        # target that holds the source's state it is an MSET.
        return Plan(SPLIT, parts=[(s, [out_name, *keys]) for s, keys in by_slot.items()])
    kind = TWO_KEYS.get(name)
    if kind is not None:
        if n < 3:
            return Plan(FATAL, why=f"{show(args)}: too few arguments")
        src, dst = args[1], args[2]
        ss, ds = key_slot(src), key_slot(dst)
        if ss == ds:
            return Plan(ONE, ss)
        if kind == COPY and any(a.upper() == b"DB" for a in args[3:]):
            return Plan(FATAL, why=f"{show(args)}: COPY to another db on a cluster")
        return Plan(kind, src=src, dst=dst, src_slot=ss, dst_slot=ds)
    if name in NUMKEYS_AT:
        at = NUMKEYS_AT[name]
        try:
            count = int(args[at])
        except (IndexError, ValueError):
            return Plan(FATAL, why=f"{show(args)}: cannot find its keys")
        keys = args[at + 1:at + 1 + count]
        if not keys:
            return Plan(ONE, 0)
        slot = _one_slot(keys)
        if slot is None:
            return Plan(FATAL, why=f"{show(args)}: its keys span several slots and its "
                                   f"effect cannot be split (a script or a blocking pop; "
                                   f"give them one {{hash tag}})")
        return Plan(ONE, slot)
    store = _store_keys(name, args)
    if store is not None:
        if isinstance(store, str):
            return Plan(FATAL, why=f"{show(args)}: {store}")
        dst_at, src_ats = store
        dst = args[dst_at]
        ds = key_slot(dst)
        foreign = [(i, args[i]) for i in src_ats if key_slot(args[i]) != ds]
        if not foreign:
            return Plan(ONE, ds)
        return Plan(STORE, dst=dst, dst_slot=ds, foreign=foreign)
    at = KEY_AT.get(name, 1)
    if n <= at:
        return Plan(ONE, 0)
    return Plan(ONE, key_slot(args[at]))


def _store_keys(name: bytes, args: list[bytes]) -> tuple[int, list[int]] | str | None:
    """(index of the destination, indexes of the source keys) of a command that writes
    one key from others; a string when the command cannot be mapped; None otherwise."""
    n = len(args)
    if name in DEST_FIRST and n >= 2:
        return 1, list(range(2, n))
    if name in DEST_SRC and n >= 3:
        return 1, [2]
    if name == b"BITOP" and n >= 4:
        return 2, list(range(3, n))
    if name in DEST_NUMKEYS and n >= 3:
        try:
            count = int(args[2])
        except ValueError:
            return "cannot find its keys"
        return 1, list(range(3, min(n, 3 + count)))
    if name in (b"SORT", b"GEORADIUS", b"GEORADIUSBYMEMBER"):
        dst_at = None
        for i in range(2, n - 1):
            word = args[i].upper()
            if word in (b"STORE", b"STOREDIST"):
                dst_at = i + 1
            elif name == b"SORT" and word in (b"BY", b"GET"):
                pattern = args[i + 1]
                if not (word == b"GET" and pattern == b"#") and b"*" in pattern:
                    return ("its BY/GET pattern reads other keys, which a cluster does not "
                            "allow")
        if dst_at is None:
            return None
        return dst_at, [1]
    return None


def slots_of(args: list[bytes]) -> list[int]:
    """The slots whose keys a replicated command touches ([] for one without keys, or one
    applied everywhere: FLUSHALL, FUNCTION, SCRIPT)."""
    name = _name(args)
    if len(args) < 2 or name in KEYLESS:
        return []
    at = NUMKEYS_AT.get(name)
    if at is not None:
        try:
            count = int(args[at])
        except (IndexError, ValueError):
            return []
        return sorted({key_slot(k) for k in args[at + 1:at + 1 + count]})
    p = plan(args)
    if p.kind == ONE:
        return [p.slot]
    if p.kind == SPLIT:
        return [s for s, _ in p.parts]
    if p.kind == STORE:
        return [p.dst_slot, *(key_slot(k) for _, k in p.foreign)]
    if p.kind in (RENAME, COPY, SMOVE, LMOVE):
        return [p.src_slot, p.dst_slot]
    return []
