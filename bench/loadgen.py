"""A paced writer of mixed commands (SET/INCR/HSET/LPUSH/ZADD) at a fixed rate.

redis-benchmark has no rate limit, so the lag measurements use this instead. It runs as
its own process (``python bench/loadgen.py HOST:PORT RATE SECONDS``) so that its work does
not compete for the GIL with the benchmark's samplers, and prints one JSON line at the end:
``{"sent": ..., "replies": ..., "errors": ..., "seconds": ..., "rate": ...}``.

Commands are encoded once up front and sent in paced slices over one connection (the
schedule is absolute: after a stall the deficit is sent at once, capped per tick).
"""

from __future__ import annotations

import json
import random
import signal
import socket
import sys
import time

import hiredis

POOL = 20_000          # distinct pre-encoded commands, cycled through
TICK = 0.002           # seconds between sends
MAX_PER_TICK = 5_000


def encode(*args: object) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def commands(seed: int, keyspace: int = 10_000) -> list[bytes]:
    r = random.Random(seed)
    cmds: list[bytes] = []
    for _ in range(POOL):
        op = r.randrange(5)
        n = r.randrange(keyspace)
        if op == 0:
            cmds.append(encode("SET", f"lg:str:{n}", r.randbytes(r.randrange(8, 64)).hex()))
        elif op == 1:
            cmds.append(encode("INCR", f"lg:counter:{n % 1000}"))
        elif op == 2:
            cmds.append(encode("HSET", f"lg:hash:{n % 1000}", f"f{r.randrange(100)}",
                               r.randrange(10**9)))
        elif op == 3:
            cmds.append(encode("LPUSH", f"lg:list:{n % 1000}", r.randrange(10**9)))
        else:
            cmds.append(encode("ZADD", f"lg:zset:{n % 1000}", r.randrange(10**6),
                               f"m{r.randrange(1000)}"))
    return cmds


def run(host: str, port: int, rate: float, seconds: float, seed: int = 1) -> dict[str, object]:
    pool = commands(seed)
    cycle = pool + pool[:MAX_PER_TICK]          # a slice never has to wrap around
    sock = socket.create_connection((host, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    reader = hiredis.Reader()
    sent = replies = errors = 0
    stop = False

    def on_term(*_: object) -> None:
        nonlocal stop
        stop = True
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)

    def drain(block: bool) -> None:
        nonlocal replies, errors
        sock.setblocking(block)
        while True:
            try:
                data = sock.recv(1 << 20)
            except BlockingIOError:
                return
            if not data:
                raise ConnectionError("server closed the connection")
            reader.feed(data)
            while True:
                rep = reader.gets()
                if rep is False:
                    break
                replies += 1
                if isinstance(rep, hiredis.ReplyError):
                    errors += 1
            if not block or replies >= sent:
                return

    t0 = time.perf_counter()
    while not stop:
        now = time.perf_counter() - t0
        if now >= seconds:
            break
        k = min(int(rate * now) - sent, MAX_PER_TICK)
        if k > 0:
            start = sent % POOL
            sock.setblocking(True)
            sock.sendall(b"".join(cycle[start:start + k]))
            sent += k
        drain(False)
        time.sleep(TICK)
    elapsed = time.perf_counter() - t0
    sock.settimeout(30)
    while replies < sent:
        drain(True)
    sock.close()
    return {"sent": sent, "replies": replies, "errors": errors, "seconds": round(elapsed, 3),
            "rate": round(sent / elapsed, 1) if elapsed else 0.0}


def main() -> None:
    addr, rate, seconds = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
    seed = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    host, port = addr.rsplit(":", 1)
    print(json.dumps(run(host, int(port), rate, seconds, seed)), flush=True)


if __name__ == "__main__":
    main()
