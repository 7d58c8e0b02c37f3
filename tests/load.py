"""A background writer of mixed traffic against a source, for incremental tests."""

from __future__ import annotations

import random
import threading
import time
from typing import Any

import redis


class Load:
    """Write mixed commands from a thread until stopped; bounded in count and time."""

    def __init__(self, client_factory: Any, *, dbs: tuple[int, ...] = (0, 1, 2),
                 max_ops: int = 2_000_000, seed: int = 7, kinds: str = "mixed",
                 resilient: bool = False) -> None:
        self.factory = client_factory
        self.dbs = dbs
        self.max_ops = max_ops
        self.rng = random.Random(seed)
        self.kinds = kinds
        # Go on with a new client after an error (redis-py's cluster client fails on a
        # master that joins under it); a write that failed half way is no matter for
        # tests that compare the target with the source, not with expected counts.
        self.resilient = resilient
        self.client_errors = 0
        self.ops = 0
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def run_all(self, timeout: float = 120) -> Load:
        """Run the load to its ``max_ops`` in the background thread and wait for it."""
        self.thread.start()
        self.thread.join(timeout)
        self.stop()
        return self

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
                if self.resilient:
                    try:
                        self._one(c)
                    except (redis.RedisError, AttributeError):
                        self.client_errors += 1
                        time.sleep(0.05)
                        clients[db] = self.factory(db)
                    continue
                self._one(c)
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def _one(self, c: Any) -> None:
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
        elif self.kinds == "crossslot":
            self.cross_step(c)
            self.ops += 1
        else:
            self.step(c)
            self.ops += 1

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

    def cross_step(self, c: redis.Redis[bytes]) -> None:
        """Commands whose keys span cluster slots (a standalone source runs them freely),
        mixed with plain ones: what a cluster target must still end equal to."""
        r = self.rng
        n = r.randrange(40)
        m = (n + 1 + r.randrange(39)) % 40
        op = r.randrange(22)
        if op == 0:
            c.mset({f"ms:{n}": r.randbytes(8), f"ms:{m}": r.randbytes(8), f"s:{n}": n})
        elif op == 1:
            c.delete(f"ms:{n}", f"ms:{m}", f"gone:{n}")
        elif op == 2:
            if c.exists(f"s:{n}"):
                c.rename(f"s:{n}", f"s:{m}")
            else:
                c.set(f"s:{n}", r.randbytes(10), px=r.choice([None, 600_000]))
        elif op == 3:
            c.sadd(f"set:{n}", r.randrange(30))
            c.smove(f"set:{n}", f"set:{m}", r.randrange(30))
        elif op == 4:
            c.rpush(f"list:{n}", r.randbytes(6))
            c.rpoplpush(f"list:{n}", f"list:{m}")
        elif op == 5:
            c.lmove(f"list:{m}", f"list:{n}", r.choice(["LEFT", "RIGHT"]),
                    r.choice(["LEFT", "RIGHT"]))
        elif op == 6:
            c.sunionstore(f"union:{n}", [f"set:{n}", f"set:{m}", f"set:{(m + 7) % 40}"])
        elif op == 7:
            c.zadd(f"z:{n}", {f"m{r.randrange(50)}": r.randrange(100)})
            c.zunionstore(f"zu:{n}", {f"z:{n}": 1, f"z:{m}": 2}, aggregate="MAX")
        elif op == 8:
            c.zrangestore(f"zr:{n}", f"z:{m}", 0, 5)
        elif op == 9:
            c.pfadd(f"hll:{n}", *[r.randrange(1000) for _ in range(5)])
            c.pfmerge(f"hll:{m}", f"hll:{n}", f"hll:{(n + 3) % 40}")
        elif op == 10:
            c.setbit(f"bits:{n}", r.randrange(64), 1)
            c.bitop("OR", f"bitor:{n}", f"bits:{n}", f"bits:{m}")
        elif op == 11:
            c.copy(f"z:{n}", f"zcopy:{m}", replace=True)
        elif op == 12:
            c.msetnx({f"nx:{n}:{r.randrange(10**6)}": 1, f"nx:{m}:{r.randrange(10**6)}": 2})
        elif op == 13:
            c.sort(f"list:{n}", alpha=True, store=f"sorted:{m}")
        elif op == 14:
            c.geoadd(f"geo:{n}", (13.36 + n / 100, 38.11, f"p{r.randrange(20)}"))
            c.geosearchstore(f"geos:{m}", f"geo:{n}", longitude=13.4, latitude=38.1,
                             radius=500, unit="km")
        elif op == 15:
            p = c.pipeline(transaction=True)
            p.incr(f"counter:{n}")
            p.rpush(f"list:{m}", n)
            p.set(f"tx:{n}", m)
            p.execute()
        elif op == 16:
            c.eval("redis.call('INCR', KEYS[1]); redis.call('RPUSH', KEYS[2], ARGV[1]); "
                   "return redis.call('SET', KEYS[3], ARGV[1])", 3,
                   f"counter:{n}", f"list:{m}", f"lua:{n}", n)
        elif op == 17:
            c.sinterstore(f"inter:{n}", [f"set:{n}", f"set:{m}"])
            c.sdiffstore(f"diff:{n}", [f"set:{m}", f"set:{n}"])
        elif op == 18:
            c.zinterstore(f"zi:{n}", [f"z:{n}", f"z:{m}"])
        elif op == 19:
            if c.exists(f"ms:{n}"):
                c.renamenx(f"ms:{n}", f"ms:new:{m}")
        elif op == 20:
            c.hset(f"h:{n}", f"f{r.randrange(9)}", r.randrange(1000))
            c.expire(f"h:{n}", r.randrange(100, 10_000))
        else:
            c.incr(f"counter:{n}")
            c.lpush(f"list:{n}", r.randbytes(4))
