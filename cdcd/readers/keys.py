"""Apply a task's filter and db mapping to replicated commands.

Rules (the README repeats them):
- a command in a db the filter does not select is dropped;
- with key prefixes, DEL/UNLINK/EXISTS/TOUCH and MSET/MSETNX keep only the keys that pass;
  any other command is applied whole when its first key passes and dropped otherwise, so
  RENAME/SMOVE/LMOVE/... between a selected and an unselected key follow the source key;
- commands that name dbs (SELECT is handled by the reader, MOVE, COPY ... DB, SWAPDB) get
  the mapped numbers; FLUSHALL becomes FLUSHDB on each selected db when dbs are filtered
  or mapped;
- commands without keys (FLUSHDB, FUNCTION, SCRIPT, ...) are applied as they are.
"""

from __future__ import annotations

from ..spec import TaskSpec

# Commands whose every argument after the name is a key.
ALL_KEYS = {b"del", b"unlink", b"exists", b"touch"}
# Commands of key/value pairs.
PAIRS = {b"mset", b"msetnx"}
# Commands with no key at all.
NO_KEYS = {b"flushdb", b"flushall", b"function", b"script", b"swapdb", b"publish",
           b"spublish"}
# Commands whose keys come after a numkeys argument at this position.
NUMKEYS_AT = {b"eval": 2, b"evalsha": 2, b"eval_ro": 2, b"evalsha_ro": 2, b"fcall": 2,
              b"fcall_ro": 2}


class CommandFilter:
    def __init__(self, spec: TaskSpec, databases: int = 16) -> None:
        self.spec = spec
        self.flt = spec.filter
        self.databases = databases
        self.rewrite_dbs = bool(spec.db_mapping) or spec.filter.dbs is not None
        # Nothing to filter or rewrite: the reader skips the per-command call.
        self.trivial = not self.rewrite_dbs and not spec.filter.by_key

    def first_key(self, name: bytes, args: list[bytes]) -> bytes | None:
        if name in NO_KEYS or len(args) < 2:
            return None
        at = NUMKEYS_AT.get(name)
        if at is not None:
            try:
                n = int(args[at])
            except (ValueError, IndexError):
                return None
            return args[at + 1] if n > 0 and len(args) > at + 1 else None
        return args[1]

    def apply(self, db: int, args: list[bytes]) -> list[tuple[int, list[bytes]]]:
        """Return (source db, command) pairs to send for ``args`` replicated in ``db``."""
        return self._apply(db, args)

    def _apply(self, db: int, args: list[bytes]) -> list[tuple[int, list[bytes]]]:
        flt = self.flt
        name = args[0].lower()
        if name == b"flushall" and self.rewrite_dbs:
            dbs = flt.dbs if flt.dbs is not None else range(self.databases)
            return [(d, [b"FLUSHDB", *args[1:]]) for d in dbs]
        if not flt.db_ok(db):
            return []
        if name == b"swapdb" and len(args) == 3:
            a, b = int(args[1]), int(args[2])
            if not (flt.db_ok(a) and flt.db_ok(b)):
                return []
            return [(db, [args[0], str(self.spec.target_db(a)).encode(),
                          str(self.spec.target_db(b)).encode()])]
        if name == b"move" and len(args) == 3:
            if flt.by_key and not flt.key_ok(args[1]):
                return []
            return [(db, [args[0], args[1], str(self.spec.target_db(int(args[2]))).encode()])]
        if name == b"copy":
            args = self._map_copy(args)
        if not flt.by_key:
            return [(db, args)]
        if name in ALL_KEYS:
            keys = [k for k in args[1:] if flt.key_ok(k)]
            return [(db, [args[0], *keys])] if keys else []
        if name in PAIRS:
            kept: list[bytes] = []
            for i in range(1, len(args) - 1, 2):
                if flt.key_ok(args[i]):
                    kept += [args[i], args[i + 1]]
            return [(db, [args[0], *kept])] if kept else []
        key = self.first_key(name, args)
        if key is None or flt.key_ok(key):
            return [(db, args)]
        return []

    def _map_copy(self, args: list[bytes]) -> list[bytes]:
        out = list(args)
        for i in range(3, len(out) - 1):
            if out[i].lower() == b"db":
                out[i + 1] = str(self.spec.target_db(int(out[i + 1]))).encode()
        return out
