"""A background writer of mixed traffic against a source, for incremental tests."""

from __future__ import annotations

import random
import threading
from typing import Any

import redis


class Load:
    """Write mixed commands from a thread until stopped; bounded in count and time."""

    def __init__(self, client_factory: Any, *, dbs: tuple[int, ...] = (0, 1, 2),
                 max_ops: int = 2_000_000, seed: int = 7, kinds: str = "mixed") -> None:
        self.factory = client_factory
        self.dbs = dbs
        self.max_ops = max_ops
        self.rng = random.Random(seed)
        self.kinds = kinds
        self.ops = 0
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(30)
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        try:
            clients = {db: self.factory(db) for db in self.dbs}
            while not self.stop_event.is_set() and self.ops < self.max_ops:
                db = self.rng.choice(self.dbs)
                c = clients[db]
                if self.kinds in ("counters", "counters+lists"):
                    # the sharpest test of exactly-once: a duplicate or a loss shows
                    pipe = c.pipeline(transaction=False)
                    for _ in range(20):
                        i = self.rng.randrange(50)
                        pipe.incr(f"counter:{i}")
                        if self.kinds == "counters+lists":
                            pipe.rpush(f"list:{i % 20}", self.ops)
                    pipe.execute()
                    self.ops += 20
                else:
                    self.step(c)
                    self.ops += 1
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def step(self, c: redis.Redis[bytes]) -> None:
        r = self.rng
        n = r.randrange(200)
        op = r.randrange(14)
        if op == 0:
            ttl = r.choice([None, 60_000, 3_600_000])
            c.set(f"s:{n}", r.randbytes(r.randrange(1, 300)), px=ttl)
        elif op == 1:
            c.incr(f"counter:{n % 20}")
        elif op == 2:
            c.lpush(f"list:{n % 30}", r.randbytes(8))
        elif op == 3:
            c.hset(f"hash:{n % 30}", f"f{r.randrange(50)}", r.randrange(10**6))
        elif op == 4:
            c.delete(f"s:{n}")
        elif op == 5:
            c.expire(f"hash:{n % 30}", r.randrange(100, 10_000))
        elif op == 6:
            if c.exists(f"s:{n}"):
                try:
                    c.rename(f"s:{n}", f"renamed:{n}")
                except redis.ResponseError:
                    pass
        elif op == 7:
            p = c.pipeline(transaction=True)
            p.incr("tx:a")
            p.incrby("tx:b", 2)
            p.lpush("tx:list", n)
            p.execute()
        elif op == 8:
            c.eval("redis.call('INCR', KEYS[1]); return redis.call('SET', KEYS[2], ARGV[1])",
                   2, f"lua:counter:{n % 5}", f"lua:s:{n % 10}", n)
        elif op == 9:
            c.xadd(f"stream:{n % 3}", {"n": n}, maxlen=100, approximate=False)
        elif op == 10:
            c.zadd(f"zset:{n % 10}", {f"m{r.randrange(100)}": r.random()})
        elif op == 11:
            c.sadd(f"set:{n % 10}", r.randrange(1000))
        elif op == 12:
            c.lpop(f"list:{n % 30}")
        else:
            c.hincrby(f"hash:{n % 30}", "count", 1)
