"""cdcd benchmark: cdcd against native Redis replication, side by side, on this machine.

Run from the repository root::

    python -m bench.run                 # the full run (~10 min on 2 cores)
    python -m bench.run --quick         # a smoke run (~2 min)
    python -m bench.run --only snapshot,memory --keys 500000 --json out.json

Every server is started here (``tests.servers.RedisServer``: real ``redis-server``
processes on free ports in temporary directories) and so is the daemon
(``tests.daemon.Daemon``: ``python -m cdcd serve`` as a subprocess); everything is stopped
at the end, on an error and on Ctrl-C. The headline numbers are ratios against native
Redis replication measured in the same run, so they mean something on a noisy machine.

Sections (``--only``):

snapshot     DEBUG POPULATE N keys; native replica (REPLICAOF until link up with N keys)
             vs cdcd full_amount_migration (create until Succeeded) with reader=psync and
             reader=scan, each into a fresh empty server; one warm-up round on a small
             dataset, then 3 interleaved rounds, medians. Then a mixed dataset (hashes,
             zsets, lists, sets, streams of 10..300 elements) the same way: keys/s, MB/s.
incremental  (a) redis-benchmark SET -P 16 against the source alone, (a') with a native
             replica attached, (b) with a cdcd incremental task attached: applied ops/s
             over the benchmark window and lag_bytes over time, (c) a paced 50k ops/s
             mixed load: the task view's lag_ms sampled every 50 ms, and end-to-end lag
             (a key written on the source, polled on the target) for cdcd and a native
             replica at once.
memory       the daemon's peak RSS (VmHWM) while snapshotting the N-key dataset and a
             big-key dataset (a 300 MB string, a 5M-field hash, a 5M-element list;
             scaled by --big-scale).
rewrite      write_mode rewrite (values decoded and written as commands, what a copy into
             an older server does): the N-key dataset and the mixed dataset, native vs
             cdcd reader=psync with write_mode rewrite into a fresh server of the same
             version, interleaved rounds, medians, as in snapshot.
bandwidth    a task with bandwidth_limit_mb=5 copying more than it can in the window:
             bytes/s arriving at the target (INFO total_net_input_bytes) vs the limit.
tasks        50 incremental tasks on one daemon under a light load: list/get latency.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# The daemon subprocess runs in a temp dir: let it import this tree's cdcd.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])

import redis  # noqa: E402

from tests.cluster import Cluster  # noqa: E402
from tests.daemon import Daemon  # noqa: E402
from tests.servers import RedisServer, wait_for  # noqa: E402

SECTIONS = ("snapshot", "rewrite", "incremental", "memory", "bandwidth", "tasks")
MB = 1_000_000          # bandwidth_limit_mb is in 10^6 bytes (cdcd/ratelimit.py); so is MB/s
MiB = 1 << 20           # RSS is reported in MiB
GB = 1_000_000_000      # the memory dataset is 2 GB of source used_memory
SOURCE_ARGS = ["--enable-debug-command", "yes"]


class NotAvailable(Exception):
    """A measurement that could not be made (a cdcd feature missing or failing)."""


# --- small helpers ----------------------------------------------------------------------------

def pct(values: list[float], p: float) -> float:
    """Percentile with linear interpolation (p in 0..100)."""
    if not values:
        return float("nan")
    v = sorted(values)
    k = (len(v) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def keys_of(keyspace: dict[str, Any]) -> int:
    return sum(int(v["keys"]) for k, v in keyspace.items()
               if k.startswith("db") and isinstance(v, dict))


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS/VmHWM (kB) of a process, {} when it is gone."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    k, v = line.split(":", 1)
                    out[k] = int(v.split()[0])
    except OSError:
        pass
    return out


def cpu_seconds(pid: int, *, children: bool = False) -> float:
    """utime + stime of a process, in seconds; ``children``: of its children that have
    ended instead (the daemon's RDB helper processes, reaped once their RDB is split)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        at = 13 if children else 11
        return (int(fields[at]) + int(fields[at + 1])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def fmt_s(x: float) -> str:
    return f"{x:.2f} s"


def fmt_ms(x: float) -> str:
    return f"{x:.1f} ms"


def fmt_rate(x: float) -> str:
    return f"{x:,.0f}/s"


def short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    msg = text[0] if text else ""
    return f"{type(exc).__name__}: {msg}"[:200] if not isinstance(exc, NotAvailable) else msg[:300]


class Sampler:
    """Call ``fn`` every ``interval`` seconds in a thread; keep (t, value) pairs."""

    def __init__(self, fn: Callable[[], Any], interval: float) -> None:
        self.fn = fn
        self.interval = interval
        self.samples: list[tuple[float, Any]] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        nxt = time.perf_counter()
        while not self._stop.is_set():
            try:
                v = self.fn()
                self.samples.append((time.perf_counter(), v))
            except Exception:
                self.errors += 1
            nxt += self.interval
            delay = nxt - time.perf_counter()
            if delay > 0:
                self._stop.wait(delay)
            else:
                nxt = time.perf_counter()

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def stop(self) -> list[tuple[float, Any]]:
        self._stop.set()
        self._thread.join(10)
        return self.samples


class Api:
    """A keep-alive HTTP client for the daemon's POST /cdc."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn: http.client.HTTPConnection | None = None
        self.lock = threading.Lock()

    def call(self, request_type: str, data: dict[str, Any] | None = None) -> tuple[int, Any]:
        body = json.dumps({"request_type": request_type, "request_data": data or {}})
        with self.lock:
            for attempt in (0, 1):
                try:
                    if self.conn is None:
                        self.conn = http.client.HTTPConnection("127.0.0.1", self.port,
                                                               timeout=60)
                    self.conn.request("POST", "/cdc", body,
                                      {"Content-Type": "application/json"})
                    r = self.conn.getresponse()
                    return r.status, json.loads(r.read())
                except (http.client.HTTPException, OSError):
                    if self.conn is not None:
                        self.conn.close()
                    self.conn = None
                    if attempt:
                        raise
        raise AssertionError("unreachable")

    def ok(self, request_type: str, data: dict[str, Any] | None = None) -> Any:
        code, doc = self.call(request_type, data)
        if code != 200:
            raise NotAvailable(f"{request_type} answered {code}: "
                               f"{doc.get('message', doc) if isinstance(doc, dict) else doc}")
        return doc["data"]

    def task(self, task_id: str) -> dict[str, Any]:
        return dict(self.ok("get", {"task_id": task_id})["task"])

    def close(self) -> None:
        with self.lock:
            if self.conn is not None:
                self.conn.close()
                self.conn = None


class Row:
    def __init__(self, section: str, metric: str, value: str, target: str = "",
                 verdict: str = "info") -> None:
        self.section, self.metric, self.value, self.target, self.verdict = (
            section, metric, value, target, verdict)

    def to_json(self) -> dict[str, str]:
        return {"section": self.section, "metric": self.metric, "value": self.value,
                "target": self.target, "verdict": self.verdict}


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


# --- Lua dataset builders ------------------------------------------------------------------

MIXED_LUA = """
local s = tonumber(ARGV[1]); local n = tonumber(ARGV[2])
for i = s, s + n - 1 do
  local m = 10 + (i * 7919) % 291
  local kind = i % 5
  local t = {}
  if kind == 0 then
    for j = 1, m do t[#t+1] = 'field:' .. j; t[#t+1] = 'value:' .. ((i * 31 + j * 17) % 100000) end
    redis.call('HSET', 'hash:' .. i, unpack(t))
  elseif kind == 1 then
    for j = 1, m do t[#t+1] = (i + j * 13) % 1000; t[#t+1] = 'member:' .. j end
    redis.call('ZADD', 'zset:' .. i, unpack(t))
  elseif kind == 2 then
    for j = 1, m do t[#t+1] = 'item:' .. i .. ':' .. j end
    redis.call('RPUSH', 'list:' .. i, unpack(t))
  elseif kind == 3 then
    if i % 2 == 0 then
      for j = 1, m do t[#t+1] = j * 3 end
    else
      for j = 1, m do t[#t+1] = 'm:' .. j end
    end
    redis.call('SADD', 'set:' .. i, unpack(t))
  else
    local e = 5 + m % 100
    for j = 1, e do
      redis.call('XADD', 'stream:' .. i, '*', 'n', j, 'payload', 'data-' .. ((i * j) % 9973))
    end
  end
end
return n
"""

HASH_LUA = """
local t = {}
for i = tonumber(ARGV[1]), tonumber(ARGV[2]) do
  t[#t+1] = 'field:' .. i; t[#t+1] = i
  if #t >= 4000 then redis.call('HSET', KEYS[1], unpack(t)); t = {} end
end
if #t > 0 then redis.call('HSET', KEYS[1], unpack(t)) end
return 1
"""

LIST_LUA = """
local t = {}
for i = tonumber(ARGV[1]), tonumber(ARGV[2]) do
  t[#t+1] = 'element:' .. i
  if #t >= 4000 then redis.call('RPUSH', KEYS[1], unpack(t)); t = {} end
end
if #t > 0 then redis.call('RPUSH', KEYS[1], unpack(t)) end
return 1
"""


# --- the benchmark ---------------------------------------------------------------------------

class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick: bool = args.quick
        self.stack = contextlib.ExitStack()
        self.tmp = Path(tempfile.mkdtemp(prefix="cdcd-bench-"))
        self.rows: list[Row] = []
        self.results: dict[str, Any] = {}
        self.failed = False
        self.daemons = 0
        self.procs: list[subprocess.Popen[bytes]] = []
        self.shutdowns: list[float] = []     # seconds from SIGTERM to exit, per daemon
        self.stack.callback(self._kill_procs)

    # --- resources -------------------------------------------------------------------

    def close(self) -> None:
        self._kill_procs()     # load generators first, so nothing writes while we stop
        self.stack.close()
        if not self.failed and not self.args.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            print(f"\n(daemon logs and data kept in {self.tmp})")

    def _kill_procs(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    def server(self, *, source: bool = False) -> RedisServer:
        s = RedisServer("redis7", args=SOURCE_ARGS if source else None)
        self.stack.callback(s.cleanup)
        return s.start()

    def daemon(self, env: dict[str, str] | None = None) -> tuple[Daemon, Api]:
        self.daemons += 1
        d = Daemon(self.tmp / f"daemon{self.daemons}" / "data", env=env)
        d.data_dir.mkdir(parents=True)
        self.stack.callback(self.stop_daemon, d)
        d.start()
        return d, Api(d.port)

    def stop_daemon(self, d: Daemon) -> None:
        """SIGTERM (the daemon saves every checkpoint and exits), SIGKILL after 15 s."""
        if d.proc is None or d.proc.poll() is not None:
            return
        t0 = time.perf_counter()
        try:
            d.stop(timeout=15)
            self.shutdowns.append(time.perf_counter() - t0)
        except Exception:
            self.shutdowns.append(float("inf"))
            print(f"  (daemon pid {d.proc.pid} did not exit within 15 s of SIGTERM: killed; "
                  f"log {d.log})", flush=True)
            self.failed = True
            with contextlib.suppress(Exception):
                d.kill()

    def popen(self, cmd: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(cmd, **kw)
        self.procs.append(p)
        return p

    def row(self, section: str, metric: str, value: str, target: str = "",
            verdict_: str = "info") -> None:
        self.rows.append(Row(section, metric, value, target, verdict_))
        print(f"  {metric}: {value}" + (f"   [target {target}: {verdict_}]" if target else ""),
              flush=True)

    def unavailable(self, section: str, metric: str, exc: BaseException,
                    target: str = "") -> None:
        self.failed = True
        self.row(section, metric, f"not available: {short(exc)}", target, "n/a")
        if self.args.verbose:
            traceback.print_exception(exc)

    # --- datasets --------------------------------------------------------------------

    def populate(self, src: RedisServer, n: int, prefix: str = "key", size: int = 100) -> None:
        src.client().execute_command("DEBUG", "POPULATE", n, prefix, size)

    def populate_random(self, src: RedisServer, n: int, prefix: str, size: int) -> None:
        """n keys of incompressible values (DEBUG POPULATE values are NUL padding, which the
        RDB's LZF compression shrinks to nothing)."""
        c = src.client()
        chunk = os.urandom(MiB + size)
        pipe = c.pipeline(transaction=False)
        for i in range(n):
            off = (i * 7919) % MiB
            pipe.set(f"{prefix}:{i}", chunk[off:off + size])
            if i % 1000 == 999:
                pipe.execute()
        pipe.execute()

    def build_mixed(self, src: RedisServer, n: int) -> None:
        c = src.client()
        sha = c.script_load(MIXED_LUA)
        step = 500
        for s in range(0, n, step):
            c.evalsha(sha, 0, s, min(step, n - s))

    def build_big(self, src: RedisServer, scale: float) -> dict[str, int]:
        c = src.client()
        string_bytes = min(int(300 * MiB * scale), 500 * MiB)
        fields = int(5_000_000 * scale)
        elements = int(5_000_000 * scale)
        chunk = os.urandom(MiB)
        left = string_bytes
        while left > 0:
            c.append("big:string", chunk[:min(left, MiB)])
            left -= MiB
        for lua, key, count in ((HASH_LUA, "big:hash", fields), (LIST_LUA, "big:list", elements)):
            sha = c.script_load(lua)
            for s in range(1, count + 1, 200_000):
                c.evalsha(sha, 1, key, s, min(s + 199_999, count))
        # 1 KB strings up to a 2 GB dataset (scaled): the big keys among many small ones
        used = int(c.info("memory")["used_memory"])
        fill = max(0, int((2 * GB * scale - used) / 1100))
        if fill:
            c.execute_command("DEBUG", "POPULATE", fill, "fill", 1000)
        return {"string_bytes": string_bytes, "hash_fields": fields, "list_elements": elements,
                "fill_keys": fill}

    # --- one sync, native or cdcd ------------------------------------------------------

    def native_sync(self, src: RedisServer, nkeys: int, timeout: float) -> dict[str, Any]:
        rep = self.server()
        try:
            c = rep.client()
            t0 = time.perf_counter()
            c.execute_command("REPLICAOF", "127.0.0.1", str(src.port))
            while True:
                p = c.pipeline(transaction=False)
                p.info("replication")
                p.info("keyspace")
                r, ks = p.execute()
                if r.get("master_link_status") == "up" and keys_of(ks) >= nkeys:
                    break
                if time.perf_counter() - t0 > timeout:
                    raise TimeoutError(f"native replica not in sync after {timeout:.0f}s")
                time.sleep(0.005)
            return {"seconds": time.perf_counter() - t0}
        finally:
            rep.cleanup()

    def cdcd_sync(self, src: RedisServer, reader: str, nkeys: int, timeout: float,
                  cluster: bool = False, **spec: Any) -> dict[str, Any]:
        """A full migration into a fresh server (or a fresh 3-master cluster) with a fresh
        daemon; create .. Succeeded."""
        d, api = self.daemon()
        tgt: RedisServer | Cluster = Cluster(replicas=0).start() if cluster else self.server()
        nodes = tgt.masters if isinstance(tgt, Cluster) else [tgt]
        assert d.proc is not None
        pid = d.proc.pid
        rss = Sampler(lambda: proc_status(pid).get("VmRSS", 0), 0.05).start()

        class Keys:   # the keys the target holds, summed over a cluster's masters
            def info(self, section: str) -> dict[str, Any]:
                held = [n.client().info("keyspace").get("db0", {}).get("keys", 0)
                        for n in nodes]
                return {"db0": {"keys": sum(held)}}
        try:
            tc = Keys()
            addrs = tgt.addrs if isinstance(tgt, Cluster) else tgt.addr
            body = {"source": {"addrs": src.addr}, "target": {"addrs": addrs},
                    "migration_method": "full_amount_migration", "reader": reader, **spec}
            cpu0, helpers0 = cpu_seconds(pid), cpu_seconds(pid, children=True)
            t0 = time.perf_counter()
            task_id = api.ok("create", body)["task_id"]
            last_api = 0.0
            close = False      # every key is on the target: poll the API closely
            while True:
                now = time.perf_counter()
                if close or now - last_api >= 1.0:
                    last_api = now
                    view = api.task(task_id)
                    if view["state"] == "Succeeded":
                        break
                    if view["state"] == "Failed":
                        raise NotAvailable(f"{reader} task failed: {view['reason']}")
                    if now - t0 > timeout:
                        raise NotAvailable(f"{reader} task not done after {timeout:.0f}s "
                                           f"(state {view['state']}, phase {view['phase']}, "
                                           f"{view['progress']['snapshot']})")
                if not close and keys_of(tc.info("keyspace")) >= nkeys:
                    close = True
                time.sleep(0.01 if close else 0.02)
            seconds = time.perf_counter() - t0
            cpu = cpu_seconds(pid) - cpu0
            helpers = cpu_seconds(pid, children=True) - helpers0
            st = proc_status(pid)
            got = keys_of(tc.info("keyspace"))
            if got != nkeys:
                raise NotAvailable(f"{reader}: target holds {got} keys, source {nkeys}")
            samples = [v for _, v in rss.stop()]
            return {"seconds": seconds, "cpu_seconds": cpu, "helper_cpu_seconds": helpers,
                    "hwm_mb": st.get("VmHWM", 0) / 1024,
                    "rss_max_sampled_mb": max(samples, default=0) / 1024,
                    "snapshot_bytes": view["progress"]["snapshot"]["bytes"],
                    "reader": view["progress"].get("reader", reader)}
        finally:
            rss.stop()
            api.close()
            self.stop_daemon(d)
            tgt.stop() if isinstance(tgt, Cluster) else tgt.cleanup()

    def compare(self, src: RedisServer, nkeys: int, rounds: int, timeout: float,
                readers: tuple[str, ...] = ("psync", "scan")) -> dict[str, Any]:
        """Interleaved rounds of native, psync, scan; per-run numbers and medians."""
        runs: dict[str, list[dict[str, Any]]] = {"native": [], **{r: [] for r in readers}}
        errors: dict[str, str] = {}
        for i in range(rounds):
            for kind in runs:
                if kind in errors:
                    continue
                try:
                    if kind == "native":
                        r = self.native_sync(src, nkeys, timeout)
                    else:   # "psync", "scan", or "psync+rewrite": a reader and a write_mode
                        reader, _, mode = kind.partition("+")
                        r = self.cdcd_sync(src, reader, nkeys, timeout,
                                           **({"write_mode": mode} if mode else {}))
                except (NotAvailable, TimeoutError, AssertionError, redis.RedisError,
                        OSError) as exc:
                    errors[kind] = short(exc)
                    print(f"    round {i + 1} {kind}: FAILED {errors[kind]}", flush=True)
                    continue
                runs[kind].append(r)
                extra = (f" (daemon cpu {r['cpu_seconds']:.1f} s + RDB helpers "
                         f"{r['helper_cpu_seconds']:.1f} s, VmHWM {r['hwm_mb']:.0f} MiB)"
                         if kind != "native" else "")
                print(f"    round {i + 1} {kind:6s} {r['seconds']:7.2f} s{extra}", flush=True)
        med = {k: statistics.median(x["seconds"] for x in v) for k, v in runs.items() if v}
        return {"runs": runs, "median_seconds": med, "errors": errors}

    # --- sections ------------------------------------------------------------------------

    def section_snapshot(self) -> None:
        S = "snapshot"
        n = self.args.keys
        rounds = self.args.rounds
        timeout = max(120.0, n / 5_000)
        print(f"\n== snapshot: DEBUG POPULATE {n:,} key 100; {rounds} rounds, medians ==",
              flush=True)
        warm_n = min(50_000, n)
        warm = self.server(source=True)
        self.populate(warm, warm_n)
        print(f"  warm-up round ({warm_n:,} keys)", flush=True)
        self.compare(warm, warm_n, 1, timeout)
        warm.cleanup()

        src = self.server(source=True)
        self.populate(src, n)
        info = src.client().info("memory")
        res = self.compare(src, n, rounds, timeout)
        self.results["snapshot"] = {"keys": n, "source_used_memory": info["used_memory"], **res}
        med = res["median_seconds"]
        if "native" not in med:
            self.unavailable(S, f"{n:,} keys native replication", NotAvailable(
                res["errors"].get("native", "?")))
            src.cleanup()
        else:
            self.row(S, f"{n:,} keys: native replica sync (median)", fmt_s(med["native"]))
            for reader in ("psync", "scan"):
                metric = f"{n:,} keys: cdcd/native time, reader={reader}"
                if reader in med:
                    ratio = med[reader] / med["native"]
                    self.results["snapshot"][f"ratio_{reader}"] = ratio
                    self.row(S, metric, f"{ratio:.2f}x ({fmt_s(med[reader])}, "
                             f"{n / med[reader]:,.0f} keys/s)", "<= 2.0 (aim 1.5)",
                             verdict(ratio <= 2.0))
                else:
                    self.unavailable(S, metric, NotAvailable(res["errors"].get(reader, "?")),
                                     "<= 2.0 (aim 1.5)")
            self._memory_rows_from(res, n)
            self._cluster_target_row(src, n, timeout, med.get("psync"))
            src.cleanup()
            self._cluster_source_rows(n, timeout)

        # the mixed dataset
        mn = self.args.mixed_keys
        print(f"\n== snapshot: mixed dataset, {mn:,} keys (hash/zset/list/set/stream, "
              f"10..300 elements) ==", flush=True)
        src = self.server(source=True)
        t0 = time.perf_counter()
        self.build_mixed(src, mn)
        used = src.client().info("memory")["used_memory"]
        print(f"  built in {time.perf_counter() - t0:.1f} s, source used_memory "
              f"{used / MB:.1f} MB", flush=True)
        res = self.compare(src, mn, rounds, timeout)
        src.cleanup()
        med = res["median_seconds"]
        dump_bytes = next((r["snapshot_bytes"] for k in ("psync", "scan")
                           for r in res["runs"].get(k, [])), 0)
        self.results["snapshot_mixed"] = {"keys": mn, "source_used_memory": used,
                                          "dump_bytes": dump_bytes, **res}
        mb = dump_bytes / MB
        unit = ("MB = sum of DUMP payload sizes (cdcd progress.snapshot.bytes, "
                f"{mb:.1f} MB; source used_memory {used / MB:.1f} MB)")
        print(f"  {unit}")
        if "native" in med:
            self.row(S, f"mixed {mn:,} keys: native", f"{fmt_s(med['native'])}, "
                     f"{mn / med['native']:,.0f} keys/s, {mb / med['native']:.1f} MB/s")
        for reader in ("psync", "scan"):
            metric = f"mixed {mn:,} keys: cdcd/native time, reader={reader}"
            if reader in med and "native" in med:
                ratio = med[reader] / med["native"]
                self.results["snapshot_mixed"][f"ratio_{reader}"] = ratio
                self.row(S, metric, f"{ratio:.2f}x ({fmt_s(med[reader])}, "
                         f"{mn / med[reader]:,.0f} keys/s, {mb / med[reader]:.1f} MB/s)",
                         "<= 2.0 (aim 1.5)", verdict(ratio <= 2.0))
            else:
                self.unavailable(S, metric, NotAvailable(
                    res["errors"].get(reader) or res["errors"].get("native", "?")),
                    "<= 2.0 (aim 1.5)")
        self.results["mixed_mb_unit"] = unit

    def section_rewrite(self) -> None:
        """write_mode rewrite against native replication: DEBUG POPULATE keys (strings:
        one SET each instead of RESTORE) and the mixed dataset (every value decoded)."""
        S = "rewrite"
        rounds = self.args.rounds
        kind = "psync+rewrite"
        for label, n, build in (("", self.args.keys, self.populate),
                                ("mixed ", self.args.mixed_keys, self.build_mixed)):
            timeout = max(120.0, n / 2_000)
            print(f"\n== rewrite: {label or 'DEBUG POPULATE '}{n:,} keys, write_mode rewrite; "
                  f"{rounds} rounds, medians ==", flush=True)
            src = self.server(source=True)
            try:
                build(src, n)
                res = self.compare(src, n, rounds, timeout, readers=(kind,))
            finally:
                src.cleanup()
            key = f"rewrite{'_mixed' if label else ''}"
            self.results[key] = {"keys": n, **res}
            med = res["median_seconds"]
            metric = f"{label}{n:,} keys: cdcd/native time, reader=psync, write_mode rewrite"
            if kind in med and "native" in med:
                ratio = med[kind] / med["native"]
                self.results[key]["ratio"] = ratio
                self.row(S, metric, f"{ratio:.2f}x ({fmt_s(med[kind])}, {n / med[kind]:,.0f} "
                         f"keys/s; native {fmt_s(med['native'])})")
            else:
                self.unavailable(S, metric, NotAvailable(
                    res["errors"].get(kind) or res["errors"].get("native", "?")))

    def _cluster_target_row(self, src: RedisServer, n: int, timeout: float,
                            standalone: float | None) -> None:
        """The same psync snapshot into a 3-master cluster, as a ratio to the standalone
        target's median time in this run (the masters are written in parallel)."""
        metric = f"{n:,} keys into a 3-master cluster target: time / standalone target"
        print(f"\n== snapshot: {n:,} keys into a 3-master cluster target ==", flush=True)
        try:
            if standalone is None:
                raise NotAvailable("no standalone psync time to compare with")
            r = self.cdcd_sync(src, "psync", n, timeout, cluster=True)
        except (NotAvailable, TimeoutError, AssertionError, RuntimeError, redis.RedisError,
                OSError) as exc:
            self.unavailable("snapshot", metric, exc, "<= 1.0")
            return
        ratio = r["seconds"] / standalone
        self.results["snapshot"]["ratio_cluster_target"] = ratio
        self.row("snapshot", metric, f"{ratio:.2f}x ({fmt_s(r['seconds'])}, "
                 f"{n / r['seconds']:,.0f} keys/s; daemon cpu {r['cpu_seconds']:.1f} s + RDB "
                 f"helpers {r['helper_cpu_seconds']:.1f} s)", "<= 1.0", verdict(ratio <= 1.0))

    def _cluster_source_rows(self, n: int, timeout: float) -> None:
        """A 3-master cluster source holding n keys of 100 B: cdcd's full copy (one psync
        link per shard, into a standalone target) against three native replicas syncing
        from the three masters at once, side by side in this run; cdcd twice, with its
        default rdb_processes and with a helper per shard."""
        from cdcd.markers import slot_tags
        settings: tuple[int | None, ...] = (None, 3)
        print(f"\n== snapshot: a 3-shard cluster source, {n:,} keys ==", flush=True)
        cluster = None
        try:
            cluster = Cluster(replicas=0).start()
            tags = slot_tags()
            value = b"v" * 100
            per = n // 3
            counts = []
            for i, m in enumerate(cluster.masters):
                a = i * (16384 // 3)
                c = m.client()
                pipe = c.pipeline(transaction=False)
                for j in range(per):
                    slot = a + j % 5000
                    pipe.set(b"{" + tags[slot] + b"}:%d" % j, value)
                    if j % 2000 == 1999:
                        pipe.execute()
                pipe.execute()
                counts.append(c.dbsize())
            # native: a replica per master, all three at once
            reps = [self.server() for _ in cluster.masters]
            t0 = time.perf_counter()
            for rep, m in zip(reps, cluster.masters):
                rep.client().execute_command("REPLICAOF", "127.0.0.1", str(m.port))
            while not all(r.client().dbsize() >= k and r.client().info("replication")
                          .get("master_link_status") == "up" for r, k in zip(reps, counts)):
                if time.perf_counter() - t0 > timeout:
                    raise TimeoutError("native replicas not in sync")
                time.sleep(0.005)
            native = time.perf_counter() - t0
            for r in reps:
                r.cleanup()
        except (NotAvailable, TimeoutError, AssertionError, RuntimeError, redis.RedisError,
                OSError) as exc:
            for helpers in settings:
                self.unavailable("snapshot", self._cluster_source_metric(n, helpers), exc,
                                 "<= 2.0")
            if cluster is not None:
                cluster.stop()
            return
        try:
            for helpers in settings:
                self._cluster_source_copy(cluster, n, sum(counts), native, timeout, helpers)
        finally:
            cluster.stop()

    @staticmethod
    def _cluster_source_metric(n: int, helpers: int | None) -> str:
        how = "" if helpers is None else f", rdb_processes {helpers}"
        return f"snapshot of a 3-shard cluster source, {n:,} keys{how}: cdcd / native replicas"

    def _cluster_source_copy(self, cluster: Cluster, n: int, total: int, native: float,
                             timeout: float, helpers: int | None) -> None:
        """One cdcd copy of the 3-shard source above (``helpers``: the daemon's
        rdb_processes, None: its default) and its rows."""
        how = "" if helpers is None else f", rdb_processes {helpers}"
        metric = self._cluster_source_metric(n, helpers)
        try:
            d, api = self.daemon(None if helpers is None else
                                 {"CDCD_RDB_PROCESSES": str(helpers)})
            tgt = self.server()
            try:
                assert d.proc is not None
                cpu0 = cpu_seconds(d.proc.pid)
                helpers0 = cpu_seconds(d.proc.pid, children=True)
                t0 = time.perf_counter()
                task_id = api.ok("create", {"source": {"addrs": cluster.addrs},
                                            "target": {"addrs": tgt.addr},
                                            "migration_method": "full_amount_migration"}
                                 )["task_id"]
                lat: list[float] = []
                while True:
                    a = time.perf_counter()
                    api.call("list", {})
                    b = time.perf_counter()
                    view = api.task(task_id)
                    lat += [b - a, time.perf_counter() - b]
                    if view["state"] == "Succeeded":
                        break
                    if view["state"] == "Failed":
                        raise NotAvailable(f"cluster source task failed: {view['reason']}")
                    if time.perf_counter() - t0 > timeout:
                        raise TimeoutError("cluster source task not done")
                    time.sleep(0.02)
                took = time.perf_counter() - t0
                cpu = cpu_seconds(d.proc.pid) - cpu0
                helper_cpu = cpu_seconds(d.proc.pid, children=True) - helpers0
                got = tgt.client().dbsize()
                if got != total:
                    raise NotAvailable(f"target holds {got} keys, source {total}")
            finally:
                api.close()
                self.stop_daemon(d)
                tgt.cleanup()
            ratio = took / native
            p99 = pct(lat, 99) * 1000
            key = "cluster_source" if helpers is None else f"cluster_source_helpers_{helpers}"
            self.results["snapshot"][key] = {
                "keys": total, "seconds": took, "native_seconds": native,
                "ratio": ratio, "daemon_cpu_seconds": cpu, "helper_cpu_seconds": helper_cpu,
                "api_p99_ms": p99}
            self.row("snapshot", f"API list/get p99 during the 3-shard snapshot{how}",
                     f"{p99:.1f} ms ({len(lat)} requests)", "< 20 ms", verdict(p99 < 20))
            self.row("snapshot", metric, f"{ratio:.2f}x ({fmt_s(took)}, {total / took:,.0f} "
                     f"keys/s; native {fmt_s(native)}; daemon cpu {cpu:.1f} s, its RDB "
                     f"helpers {helper_cpu:.1f} s)", "<= 2.0", verdict(ratio <= 2.0))
        except (NotAvailable, TimeoutError, AssertionError, RuntimeError, redis.RedisError,
                OSError) as exc:
            self.unavailable("snapshot", metric, exc, "<= 2.0")

    def _cluster_drain_row(self, src: RedisServer, api: Api,
                           benchmark: Callable[[], tuple[float, float, float]],
                           standalone_rate: float | None) -> None:
        """(e) The (d) drain into a 3-master cluster target: every slot's part of a batch
        is one MULTI/EXEC with its marker, as a ratio to the standalone target's rate."""
        S = "incremental"
        metric = "(e) apply capacity into a 3-master cluster target / standalone target"
        sc = src.client()
        cluster = None
        try:
            cluster = Cluster(replicas=0).start()
            task_id = api.ok("create", {
                "task_id": "bench-cluster-incremental", "source": {"addrs": src.addr},
                "target": {"addrs": cluster.addrs},
                "migration_method": "incremental_migration", "reader": "psync"})["task_id"]
            self._wait_phase(api, task_id, "incremental", 300)

            def view() -> dict[str, Any]:
                return dict(api.task(task_id)["progress"]["incremental"])
            self._wait(lambda: view()["lag_bytes"] == 0, 300, "the cluster task to catch up")
            api.ok("pause", {"task_id": task_id})
            self._wait(lambda: api.task(task_id)["state"] == "Paused", 30, "pause")
            ops0 = view()["ops_applied"]
            benchmark()
            end_offset = int(sc.info("replication")["master_repl_offset"])
            t0 = time.perf_counter()
            api.ok("resume", {"task_id": task_id})
            self._wait(lambda: view()["applied_offset"] >= end_offset, 600, "the drain")
            drain = time.perf_counter() - t0
            rate = (view()["ops_applied"] - ops0) / drain
            api.ok("delete", {"task_id": task_id})
            self._drain_row(metric, "cluster_drain", rate, drain, standalone_rate)
        except (NotAvailable, TimeoutError, AssertionError) as exc:
            self.unavailable(S, metric, exc, ">= 0.7")
        finally:
            if cluster is not None:
                cluster.stop()

    def _drain_row(self, metric: str, key: str, rate: float, drain: float,
                   standalone_rate: float | None) -> None:
        """A drain's rate as a ratio to the standalone (d) drain's."""
        self.results["incremental"][key] = {"rate": rate, "seconds": drain}
        ratio = rate / standalone_rate if standalone_rate else None
        self.row("incremental", metric, (f"{ratio:.2f} " if ratio else "") +
                 f"({fmt_rate(rate)} over {fmt_s(drain)})", ">= 0.7",
                 verdict(bool(ratio and ratio >= 0.7)))

    def _cluster_source_drain_row(self, api: Api, nreq: int,
                                  standalone_rate: float | None) -> None:
        """(f) The (d) drain from a 3-master cluster source into a standalone target:
        three psync links, each command looked at for its slot (slots moving between
        shards are ordered), as a ratio to the standalone source's rate."""
        S = "incremental"
        metric = "(f) apply capacity from a 3-shard cluster source / standalone source"
        cluster = None
        try:
            if not shutil.which("redis-benchmark"):
                raise NotAvailable("redis-benchmark not installed")
            cluster = Cluster(replicas=0, args=["--repl-backlog-size", str(1 << 30)]).start()
            tgt = self.server()
            task_id = api.ok("create", {
                "task_id": "bench-cluster-source", "source": {"addrs": cluster.addrs},
                "target": {"addrs": tgt.addr},
                "migration_method": "incremental_migration", "reader": "psync"})["task_id"]
            self._wait_phase(api, task_id, "incremental", 300)

            def view() -> dict[str, Any]:
                return dict(api.task(task_id)["progress"])

            def ends() -> int:
                return sum(int(m.client().info("replication")["master_repl_offset"])
                           for m in cluster.masters)   # type: ignore[union-attr]
            api.ok("pause", {"task_id": task_id})
            self._wait(lambda: api.task(task_id)["state"] == "Paused", 30, "pause")
            ops0 = view()["incremental"]["ops_applied"]
            m0 = cluster.masters[0]
            p = self.popen(["redis-benchmark", "--cluster", "-h", "127.0.0.1", "-p",
                            str(m0.port), "-t", "set", "-P", "16", "-n", str(nreq), "-r",
                            "100000", "-q"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            text = p.communicate()[0].decode(errors="replace")
            if p.returncode:
                raise NotAvailable(f"redis-benchmark --cluster failed: {text[-300:]}")
            end = ends()
            t0 = time.perf_counter()
            api.ok("resume", {"task_id": task_id})
            self._wait(lambda: view()["incremental"]["applied_offset"] >= end, 600,
                       "the drain")
            drain = time.perf_counter() - t0
            rate = (view()["incremental"]["ops_applied"] - ops0) / drain
            api.ok("delete", {"task_id": task_id})
            self._drain_row(metric, "cluster_source_drain", rate, drain, standalone_rate)
        except (NotAvailable, TimeoutError, AssertionError) as exc:
            self.unavailable(S, metric, exc, ">= 0.7")
        finally:
            if cluster is not None:
                cluster.stop()

    def _memory_rows_from(self, res: dict[str, Any], n: int) -> None:
        mem = self.results.setdefault("memory", {})
        for reader in ("psync", "scan"):
            runs = res["runs"].get(reader) or []
            if runs:
                mem[f"snapshot_{n}_{reader}_hwm_mb"] = max(r["hwm_mb"] for r in runs)

    def section_memory(self) -> None:
        S = "memory"
        n = self.args.keys
        mem = self.results.setdefault("memory", {})
        print("\n== memory: daemon VmHWM during snapshots ==", flush=True)
        if f"snapshot_{n}_psync_hwm_mb" not in mem and f"snapshot_{n}_scan_hwm_mb" not in mem:
            src = self.server(source=True)
            self.populate(src, n)
            res = self.compare(src, n, 1, max(120.0, n / 5_000))
            src.cleanup()
            self._memory_rows_from(res, n)
            for reader, err in res["errors"].items():
                if reader != "native":
                    mem[f"snapshot_{n}_{reader}_error"] = err
        for reader in ("psync", "scan"):
            key = f"snapshot_{n}_{reader}_hwm_mb"
            metric = f"daemon VmHWM, {n:,}-key snapshot, reader={reader}"
            if key in mem:
                self.row(S, metric, f"{mem[key]:.0f} MiB", "< 200 MiB", verdict(mem[key] < 200))
            else:
                self.unavailable(S, metric, NotAvailable(
                    mem.get(f"snapshot_{n}_{reader}_error", "snapshot failed")), "< 200 MiB")

        scale = self.args.big_scale
        src = self.server(source=True)
        t0 = time.perf_counter()
        try:
            shape = self.build_big(src, scale)
        except redis.RedisError as exc:
            self.unavailable(S, "big-key dataset", exc)
            src.cleanup()
            return
        used = src.client().info("memory")["used_memory"]
        desc = (f"{shape['string_bytes'] / MiB:.0f} MiB string, {shape['hash_fields']:,}-field "
                f"hash, {shape['list_elements']:,}-element list, {shape['fill_keys']:,} strings "
                f"of 1 KB")
        print(f"  big keys (--big-scale {scale:g}): {desc}; built in "
              f"{time.perf_counter() - t0:.1f} s, source used_memory {used / MB:.0f} MB",
              flush=True)
        mem["big"] = {"scale": scale, **shape, "source_used_memory": used}
        timeout = max(180.0, 600 * scale)
        res = self.compare(src, 3 + shape["fill_keys"], 1, timeout)
        src.cleanup()
        mem["big"].update(res)
        med = res["median_seconds"]
        for reader in ("psync", "scan"):
            metric = (f"daemon VmHWM, {used / GB:.1f} GB dataset with the big keys "
                      f"(x{scale:g}), reader={reader}")
            runs = res["runs"].get(reader) or []
            if runs:
                hwm = max(r["hwm_mb"] for r in runs)
                extra = ""
                if "native" in med:
                    extra = f"; time {med[reader] / med['native']:.2f}x native"
                self.row(S, metric, f"{hwm:.0f} MiB ({fmt_s(med[reader])}{extra})",
                         "< 200 MiB", verdict(hwm < 200))
            else:
                self.unavailable(S, metric, NotAvailable(res["errors"].get(reader, "?")),
                                 "< 200 MiB")

    def section_incremental(self) -> None:
        S = "incremental"
        q = self.quick
        nreq = self.args.bench_requests
        print(f"\n== incremental: redis-benchmark -t set -P 16 -n {nreq:,} -r 100000 ==",
              flush=True)
        if not shutil.which("redis-benchmark"):
            self.unavailable(S, "incremental", NotAvailable("redis-benchmark is not on PATH"))
            return
        out: dict[str, Any] = {"requests": nreq}
        self.results["incremental"] = out
        src = self.server(source=True)
        sc = src.client()

        def benchmark() -> tuple[float, float, float]:
            cmd = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(src.port), "-t", "set",
                   "-P", "16", "-n", str(nreq), "-r", "100000", "-q"]
            t0 = time.perf_counter()
            p = self.popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            text = p.communicate()[0].decode(errors="replace")
            t1 = time.perf_counter()
            m = re.findall(r"SET: ([\d.]+) requests per second", text)
            if p.returncode or not m:
                raise NotAvailable(f"redis-benchmark failed: {text[-300:]}")
            return float(m[-1]), t0, t1

        # (a) the source alone, (a') with a native replica attached
        benchmark()   # warm-up (also fills the 100k keys)
        alone, _, _ = benchmark()
        out["source_alone_ops"] = alone
        self.row(S, "(a) source alone, SET -P 16", fmt_rate(alone))
        rep = self.server()
        rc = rep.client()
        rc.execute_command("REPLICAOF", "127.0.0.1", str(src.port))
        self._wait(lambda: rc.info("replication").get("master_link_status") == "up", 60,
                   "native replica link up")

        def native_lag() -> int:
            return int(sc.info("replication")["master_repl_offset"]) - int(
                rc.info("replication")["slave_repl_offset"])
        lag = Sampler(native_lag, 0.1).start()
        with_native, _, _ = benchmark()
        nl = [v for _, v in lag.stop()]
        out["source_with_native_replica_ops"] = with_native
        out["native_lag_bytes_max"] = max(nl, default=0)
        self.row(S, "(a') source with a native replica", f"{fmt_rate(with_native)}, replica "
                 f"lag max {max(nl, default=0) / MB:.2f} MB")
        rep.cleanup()

        # (b) a cdcd incremental task following the source
        tgt = self.server()
        d, api = self.daemon()
        try:
            task_id = api.ok("create", {
                "task_id": "bench-incremental",
                "source": {"addrs": src.addr}, "target": {"addrs": tgt.addr},
                "migration_method": "incremental_migration", "reader": "psync"})["task_id"]
            self._wait_phase(api, task_id, "incremental", 120)
        except (NotAvailable, TimeoutError) as exc:
            self.unavailable(S, "(b) cdcd incremental task", exc, ">= 0.7 of (a)")
            self.unavailable(S, "(c) lag at 50k ops/s", exc, "p99 < 100 ms")
            return
        view0 = api.task(task_id)

        def sample_view() -> dict[str, Any]:
            v = api.task(task_id)
            inc = v["progress"].get("incremental") or {}
            return {"ops": inc.get("ops_applied", 0), "lag_bytes": inc.get("lag_bytes", 0),
                    "lag_ms": inc.get("lag_ms"), "applied": inc.get("applied_offset", 0),
                    "state": v["state"], "retries": v["progress"]["retries"],
                    "resyncs": v["progress"].get("full_resyncs", 0)}
        def caught_up() -> bool:
            return bool(sample_view()["applied"] >=
                        int(sc.info("replication")["master_repl_offset"]) - 1000)
        sampler = Sampler(sample_view, 0.1).start()
        try:
            src_rate, t0, t1 = benchmark()
        except NotAvailable as exc:
            sampler.stop()
            self.unavailable(S, "(b) cdcd incremental task", exc, ">= 0.7 of (a)")
            return
        end_offset = int(sc.info("replication")["master_repl_offset"])
        caught = None
        deadline = time.perf_counter() + (60 if q else 180)
        while time.perf_counter() < deadline:
            s = sample_view()
            if s["applied"] >= end_offset:
                caught = time.perf_counter()
                break
            if s["state"] == "Failed":
                break
            time.sleep(0.05)
        samples = sampler.stop()
        win = [(t, s) for t, s in samples if t0 <= t <= t1]

        def ops_at(t: float) -> float:
            # linear interpolation between the samples around t
            before = [(ts, s["ops"]) for ts, s in samples if ts <= t]
            after = [(ts, s["ops"]) for ts, s in samples if ts >= t]
            if not before or not after:
                return float((before or after)[-1 if before else 0][1])
            (ta, a), (tb, b) = before[-1], after[0]
            return a if tb == ta else a + (b - a) * (t - ta) / (tb - ta)
        applied_rate = (ops_at(t1) - ops_at(t0)) / (t1 - t0)
        lags = [s["lag_bytes"] for _, s in win]
        last = samples[-1][1] if samples else view0
        out.update({"source_with_cdcd_ops": src_rate, "window_seconds": t1 - t0,
                    "applied_rate": applied_rate, "fraction_of_alone": applied_rate / alone,
                    "lag_bytes_max": max(lags, default=0),
                    "lag_bytes_timeline": [(round(t - t0, 2), s["lag_bytes"])
                                           for t, s in samples if t >= t0][::5],
                    "caught_up_seconds_after_end": None if caught is None else caught - t1,
                    "retries": last.get("retries"), "full_resyncs": last.get("resyncs")})
        self.row(S, "(b) source rate with cdcd attached", f"{fmt_rate(src_rate)} (cdcd applied "
                 f"{applied_rate / src_rate:.2f} of it)")
        frac = applied_rate / alone
        self.row(S, "(b) cdcd applied rate / source-alone rate",
                 f"{frac:.2f} ({fmt_rate(applied_rate)} over {t1 - t0:.1f} s)",
                 ">= 0.7", verdict(frac >= 0.7))
        if lags:
            ts = [t - t0 for t, _ in win]
            slope = 0.0
            if len(win) > 2:
                mt, ml = statistics.fmean(ts), statistics.fmean(lags)
                den = sum((t - mt) ** 2 for t in ts)
                cov = sum((t - mt) * (b - ml) for t, b in zip(ts, lags, strict=True))
                slope = cov / den if den else 0.0
            out["lag_bytes_trend_per_s"] = slope
            tl = out["lag_bytes_timeline"]
            timeline = ", ".join(f"{t:.1f}s:{b / MB:.1f}" for t, b in tl[::max(1, len(tl) // 8)])
            self.row(S, "(b) lag_bytes during the window",
                     f"max {max(lags) / MB:.1f} MB, at end {lags[-1] / MB:.1f} MB, trend "
                     f"{slope / MB:+.1f} MB/s; MB at t: {timeline}")
        self.row(S, "(b) catch-up after the benchmark ended",
                 "not caught up" if caught is None else fmt_s(caught - t1) +
                 f" (total {nreq / (caught - t0):,.0f} ops/s sustained)")
        if last.get("retries") or last.get("resyncs"):
            self.row(S, "(b) link trouble", f"retries {last.get('retries')}, "
                     f"full_resyncs {last.get('resyncs')}")

        # (d) apply capacity: pause the task, let the same benchmark fill the backlog, resume
        # and time the drain (the load generator no longer competes for the 2 cores)
        try:
            self._wait(caught_up, 120, "the task to catch up before (d)")
            sc.config_set("repl-backlog-size", str(1 << 30))
            api.ok("pause", {"task_id": task_id})
            self._wait(lambda: api.task(task_id)["state"] == "Paused", 30, "pause")
            ops0 = sample_view()["ops"]
            benchmark()
            end_offset = int(sc.info("replication")["master_repl_offset"])
            t0 = time.perf_counter()
            api.ok("resume", {"task_id": task_id})
            self._wait(lambda: sample_view()["applied"] >= end_offset, 300, "the drain")
            drain = time.perf_counter() - t0
            v = sample_view()
            drained = v["ops"] - ops0
            rate = drained / drain
            out["drain"] = {"ops": drained, "seconds": drain, "rate": rate,
                            "fraction_of_alone": rate / alone, "full_resyncs": v["resyncs"]}
            self.row(S, "(d) apply capacity: backlog drained after a pause / source-alone rate",
                     f"{rate / alone:.2f} ({fmt_rate(rate)}: {drained:,} ops in {fmt_s(drain)}, "
                     f"incl. reconnect + PSYNC; full resyncs {v['resyncs']})",
                     ">= 0.7", verdict(rate / alone >= 0.7 and drained >= nreq))
        except (NotAvailable, TimeoutError) as exc:
            self.unavailable(S, "(d) apply capacity", exc, ">= 0.7")
        self._cluster_drain_row(src, api, benchmark, out.get("drain", {}).get("rate"))
        self._cluster_source_drain_row(api, nreq, out.get("drain", {}).get("rate"))

        # (c) a paced mixed load: view lag_ms and end-to-end lag, with a native replica too
        rate = 50_000
        secs = 5.0 if q else 10.0
        print(f"\n== incremental: paced mixed load {rate:,} ops/s for {secs:g} s ==", flush=True)
        rep = self.server()
        rc = rep.client()
        rc.execute_command("REPLICAOF", "127.0.0.1", str(src.port))
        self._wait(lambda: rc.info("replication").get("master_link_status") == "up", 60,
                   "native replica link up")
        self._wait(caught_up, 120, "the task to catch up before (c)")
        gen = self.popen([sys.executable, str(BENCH / "loadgen.py"), src.addr, str(rate),
                          str(secs + 1.5)], stdout=subprocess.PIPE)
        time.sleep(1.0)
        lagms = Sampler(lambda: sample_view()["lag_ms"], 0.05).start()
        e2e: dict[str, list[float]] = {"cdcd": [], "native": []}
        missed = {"cdcd": 0, "native": 0}
        stop = threading.Event()

        def probe() -> None:
            s_c, t_c, n_c = src.client(), tgt.client(), rep.client()
            seq = 0
            while not stop.is_set():
                key = f"bench:e2e:{seq}"
                t_start = time.perf_counter()
                s_c.set(key, seq)
                seen: dict[str, float] = {}
                while len(seen) < 2 and time.perf_counter() - t_start < 5:
                    for name, c in (("cdcd", t_c), ("native", n_c)):
                        if name not in seen and c.exists(key):
                            seen[name] = (time.perf_counter() - t_start) * 1000
                    time.sleep(0.0003)
                for name in e2e:
                    if name in seen:
                        e2e[name].append(seen[name])
                    else:
                        missed[name] += 1
                seq += 1
                stop.wait(max(0.0, 0.1 - (time.perf_counter() - t_start)))
        th = threading.Thread(target=probe, daemon=True)
        th.start()
        time.sleep(secs)
        stop.set()
        th.join(10)
        ms = [v for _, v in lagms.stop() if v is not None]
        try:
            gen_out = json.loads(gen.communicate(timeout=60)[0].decode().strip() or "{}")
        except (subprocess.TimeoutExpired, json.JSONDecodeError):
            gen.kill()
            gen_out = {}
        out["paced"] = {"target_rate": rate, "seconds": secs, "loadgen": gen_out,
                        "lag_ms_samples": len(ms),
                        "view_lag_ms": {p: pct(ms, p) for p in (50, 90, 99)},
                        "e2e_ms": {k: {p: pct(v, p) for p in (50, 90, 99)}
                                   for k, v in e2e.items()},
                        "e2e_missed": missed}
        achieved = gen_out.get("rate", 0)
        self.row(S, "(c) paced load achieved", f"{achieved:,.0f} ops/s "
                 f"(errors {gen_out.get('errors', '?')})")
        if ms:
            p99 = pct(ms, 99)
            self.row(S, "(c) task view lag_ms p50/p90/p99",
                     " / ".join(fmt_ms(pct(ms, p)) for p in (50, 90, 99)) +
                     f" ({len(ms)} samples)", "p99 < 100 ms", verdict(p99 < 100))
        else:
            self.unavailable(S, "(c) task view lag_ms", NotAvailable("lag_ms was always null"),
                             "p99 < 100 ms")
        for name in ("cdcd", "native"):
            v = e2e[name]
            if not v:
                self.unavailable(S, f"(c) end-to-end lag {name}",
                                 NotAvailable(f"no probe key arrived ({missed[name]} missed)"))
                continue
            text = " / ".join(fmt_ms(pct(v, p)) for p in (50, 90, 99)) + \
                f" ({len(v)} probes, {missed[name]} missed)"
            if name == "cdcd":
                self.row(S, "(c) end-to-end lag cdcd p50/p90/p99", text, "p99 < 100 ms",
                         verdict(pct(v, 99) < 100 and not missed[name]))
            else:
                self.row(S, "(c) end-to-end lag native replica p50/p90/p99", text)
        if e2e["cdcd"] and e2e["native"]:
            r50 = pct(e2e["cdcd"], 50) / max(pct(e2e["native"], 50), 1e-3)
            r99 = pct(e2e["cdcd"], 99) / max(pct(e2e["native"], 99), 1e-3)
            out["paced"]["e2e_ratio"] = {"p50": r50, "p99": r99}
            self.row(S, "(c) end-to-end lag cdcd/native", f"p50 {r50:.1f}x, p99 {r99:.1f}x")
        # consistency: after catching up, target db 0 = source db 0 (the task's marker
        # lives in a db the task does not write)
        try:
            self._wait(caught_up, 60, "catch-up")
            time.sleep(0.5)
            s_keys = sc.dbsize()
            t_keys = tgt.client().dbsize()
            out["consistent_key_count"] = s_keys == t_keys
            self.row(S, "after the run: key counts source/target",
                     f"{s_keys:,} / {t_keys:,} (DBSIZE of db 0)", "equal",
                     verdict(s_keys == t_keys))
        except TimeoutError as exc:
            self.unavailable(S, "after the run: catch-up", exc)
        api.close()
        self.stop_daemon(d)

    def section_bandwidth(self) -> None:
        S = "bandwidth"
        limit = 5
        window = 10.0 if self.quick else 30.0
        warm = 1.0 if self.quick else 2.0
        size = 1000
        n = int((window + warm) * limit * MB * 1.4 / size)
        print(f"\n== bandwidth: bandwidth_limit_mb={limit}, {n:,} keys x {size} random bytes, "
              f"{window:g} s window ==", flush=True)
        src = self.server(source=True)
        self.populate_random(src, n, "bw", size)
        out: dict[str, Any] = {"limit_mb": limit, "window_seconds": window, "keys": n}
        self.results["bandwidth"] = out
        for reader in ("psync", "scan") if not self.quick else ("psync",):
            tgt = self.server()
            d, api = self.daemon()
            tc = tgt.client()
            try:
                def net(tc: redis.Redis = tc) -> int:  # type: ignore[type-arg]
                    return int(tc.info("stats")["total_net_input_bytes"])
                base = net()
                t0 = time.perf_counter()
                task_id = api.ok("create", {
                    "source": {"addrs": src.addr}, "target": {"addrs": tgt.addr},
                    "migration_method": "full_amount_migration", "reader": reader,
                    "bandwidth_limit_mb": limit})["task_id"]
                samples = Sampler(lambda api=api, task_id=task_id: (net(), api.task(task_id)),
                                  0.5).start()
                time.sleep(warm + window + 0.6)
                pts = samples.stop()
                states = {s[1]["state"] for _, s in pts}
                if "Failed" in states:
                    reason = next(s[1]["reason"] for _, s in pts if s[1]["state"] == "Failed")
                    raise NotAvailable(f"task failed: {reason}")
                inwin = [(t, s[0]) for t, s in pts if t0 + warm <= t <= t0 + warm + window]
                if len(inwin) < 2:
                    raise NotAvailable("too few samples")
                (ta, a), (tb, b) = inwin[0], inwin[-1]
                rate = (b - a) / (tb - ta) / MB
                ratio = rate / limit
                done = "Succeeded" in states
                secs = [(pts[i + 1][1][0] - pts[i][1][0]) / (pts[i + 1][0] - pts[i][0]) / MB
                        for i in range(len(pts) - 1)]
                out[reader] = {"rate_mb_s": rate, "ratio": ratio, "finished_early": done,
                               "total_bytes": pts[-1][1][0] - base,
                               "per_half_second_mb_s": [round(x, 2) for x in secs]}
                self.row(S, f"write rate to target / limit, reader={reader}",
                         f"{ratio:.3f} ({rate:.2f} MB/s over {tb - ta:.1f} s"
                         f"{'; task finished inside the window' if done else ''}; "
                         f"0.5 s samples min {min(secs):.1f} max {max(secs):.1f} MB/s)",
                         "0.9 .. 1.1", verdict(0.9 <= ratio <= 1.1))
                t_del = time.perf_counter()
                api.ok("delete", {"task_id": task_id})
                out[reader]["delete_seconds"] = time.perf_counter() - t_del
            except (NotAvailable, redis.RedisError, OSError) as exc:
                self.unavailable(S, f"write rate / limit, reader={reader}", exc, "0.9 .. 1.1")
            finally:
                api.close()
                self.stop_daemon(d)
                tgt.cleanup()
        src.cleanup()

    def section_tasks(self) -> None:
        S = "tasks"
        ntasks = 50
        ntargets = 5
        reqs = 200 if not self.quick else 100
        print(f"\n== tasks: {ntasks} incremental tasks on one daemon ({ntargets} targets x "
              f"{ntasks // ntargets} dbs) ==", flush=True)
        src = self.server(source=True)
        self.populate(src, 1000, "small", 100)
        targets = [self.server() for _ in range(ntargets)]
        d, api = self.daemon()
        out: dict[str, Any] = {"tasks": ntasks}
        self.results["tasks"] = out

        def latency(request_type: str, pick: Callable[[int], dict[str, Any]]) -> list[float]:
            lat = []
            for i in range(reqs):
                t = time.perf_counter()
                code, _ = api.call(request_type, pick(i))
                lat.append((time.perf_counter() - t) * 1000)
                if code != 200:
                    raise NotAvailable(f"{request_type} answered {code}")
                time.sleep(0.005)
            return lat

        try:
            idle_list = latency("list", lambda i: {})
            create_lat = []
            ids = []
            for i in range(ntasks):
                t = time.perf_counter()
                tid = api.ok("create", {
                    "task_id": f"bench-many-{i}",
                    "source": {"addrs": src.addr},
                    "target": {"addrs": targets[i // (ntasks // ntargets)].addr},
                    "migration_method": "incremental_migration", "reader": "psync",
                    "filter": {"dbs": [0]},   # each task writes one target db of its own
                    "db_mapping": {"0": i % (ntasks // ntargets) + 1}})["task_id"]
                create_lat.append((time.perf_counter() - t) * 1000)
                ids.append(tid)
            t0 = time.perf_counter()

            def all_incremental() -> bool:
                tasks = api.ok("list", {})["tasks"]
                failed = [t for t in tasks if t["state"] == "Failed"]
                if failed:
                    raise NotAvailable(f"{len(failed)} tasks failed, e.g. {failed[0]['reason']}")
                return sum(t["phase"] == "incremental" for t in tasks) == ntasks
            self._wait(all_incremental, 120, f"{ntasks} tasks in phase incremental")
            out["all_incremental_seconds"] = time.perf_counter() - t0
            load_rate = 1000
            gen = self.popen([sys.executable, str(BENCH / "loadgen.py"), src.addr,
                              str(load_rate), "600"], stdout=subprocess.PIPE)
            time.sleep(1.0)
            dpid = d.proc.pid if d.proc is not None else 0
            cpu0, tc0 = cpu_seconds(dpid), time.perf_counter()
            list_lat = latency("list", lambda i: {})
            get_lat = latency("get", lambda i: {"task_id": ids[(i * 7) % ntasks]})
            cpu = (cpu_seconds(dpid) - cpu0) / (time.perf_counter() - tc0)
            gen.terminate()
            gen.communicate(timeout=30)
            tasks = api.ok("list", {})["tasks"]
            running = sum(t["state"] == "Running" for t in tasks)
            applied = sum((t["progress"].get("incremental") or {}).get("ops_applied", 0)
                          for t in tasks)
            out.update({"idle_list_ms": {p: pct(idle_list, p) for p in (50, 99)},
                        "create_ms": {p: pct(create_lat, p) for p in (50, 99)},
                        "list_ms": {p: pct(list_lat, p) for p in (50, 99)},
                        "get_ms": {p: pct(get_lat, p) for p in (50, 99)},
                        "running": running, "ops_applied_total": applied,
                        "daemon_cpu_fraction": cpu, "load_rate": load_rate})
            self.row(S, "list latency, no tasks (p50/p99)",
                     f"{fmt_ms(pct(idle_list, 50))} / {fmt_ms(pct(idle_list, 99))}")
            self.row(S, "create latency (p50/p99)",
                     f"{fmt_ms(pct(create_lat, 50))} / {fmt_ms(pct(create_lat, 99))}")
            self.row(S, "tasks Running / phase incremental reached in",
                     f"{running}/{ntasks} / {fmt_s(out['all_incremental_seconds'])}")
            self.row(S, f"daemon CPU with {ntasks} tasks applying {load_rate:,} ops/s each",
                     f"{cpu * 100:.0f}% of one core")
            for name, lat in (("list", list_lat), ("get", get_lat)):
                p99 = pct(lat, 99)
                self.row(S, f"{name} latency with {ntasks} tasks running (p50/p99)",
                         f"{fmt_ms(pct(lat, 50))} / {fmt_ms(p99)}", "p99 < 20 ms",
                         verdict(p99 < 20))
            t = time.perf_counter()
            for tid in ids:
                api.ok("delete", {"task_id": tid})
            out["delete_all_seconds"] = time.perf_counter() - t
        except (NotAvailable, TimeoutError, OSError) as exc:
            self.unavailable(S, f"{ntasks} tasks", exc, "p99 < 20 ms")
        finally:
            api.close()
            self.stop_daemon(d)

    # --- waiting ---------------------------------------------------------------------

    @staticmethod
    def _wait(pred: Callable[[], Any], timeout: float, what: str) -> Any:
        return wait_for(pred, timeout, 0.05, what, error=TimeoutError)

    def _wait_phase(self, api: Api, task_id: str, phase: str, timeout: float) -> None:
        def reached() -> bool:
            v = api.task(task_id)
            if v["state"] == "Failed":
                raise NotAvailable(f"task failed: {v['reason']}")
            return bool(v["phase"] == phase and v["state"] == "Running")
        self._wait(reached, timeout, f"phase {phase}")

    # --- output ----------------------------------------------------------------------

    def header(self) -> None:
        rs = RedisServer("redis7")
        ver = subprocess.run([rs.bin, "--version"], capture_output=True, text=True).stdout.strip()
        shutil.rmtree(rs.dir, ignore_errors=True)
        meta = {
            "argv": sys.argv[1:], "quick": self.quick, "keys": self.args.keys,
            "mixed_keys": self.args.mixed_keys, "big_scale": self.args.big_scale,
            "rounds": self.args.rounds, "redis": ver, "python": platform.python_version(),
            "cpus": os.cpu_count(), "loadavg": os.getloadavg(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        self.results["meta"] = meta
        print(f"cdcd benchmark ({'quick' if self.quick else 'full'} run) - {ver}")
        print(f"  {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}, "
              f"Python {platform.python_version()}, sections: {', '.join(self.args.only)}")
        print("  Every source runs with --repl-diskless-sync-delay 0 (redis 7 defaults to "
              "diskless sync with a 5 s delay,\n  which would dominate the native sync times), "
              "save '' and appendonly no; replicas and targets use\n  the defaults otherwise. "
              "Native and cdcd run on the same machine in the same run; ratios are the "
              "headline.")

    def headline(self) -> list[str]:
        r = self.results
        out = []
        snap = r.get("snapshot", {})
        for reader in ("psync", "scan"):
            if f"ratio_{reader}" in snap:
                out.append(f"snapshot {snap['keys']:,} keys, {reader}: "
                           f"{snap[f'ratio_{reader}']:.2f}x native time (target <= 2.0)")
        mixed = r.get("snapshot_mixed", {})
        for reader in ("psync", "scan"):
            if f"ratio_{reader}" in mixed:
                out.append(f"snapshot mixed {mixed['keys']:,} keys, {reader}: "
                           f"{mixed[f'ratio_{reader}']:.2f}x native time")
        for key, what in (("rewrite", ""), ("rewrite_mixed", "mixed ")):
            if "ratio" in r.get(key, {}):
                out.append(f"snapshot {what}{r[key]['keys']:,} keys, psync, write_mode rewrite: "
                           f"{r[key]['ratio']:.2f}x native time")
        inc = r.get("incremental", {})
        if "fraction_of_alone" in inc:
            out.append(f"incremental applied rate: {inc['fraction_of_alone']:.2f} of the "
                       f"source's own SET capacity (target >= 0.7)")
        ratio = inc.get("paced", {}).get("e2e_ratio")
        if ratio:
            out.append(f"end-to-end lag at 50k ops/s: {ratio['p50']:.1f}x native at p50, "
                       f"{ratio['p99']:.1f}x at p99")
        bw = r.get("bandwidth", {})
        for reader in ("psync", "scan"):
            if reader in bw:
                out.append(f"bandwidth, {reader}: {bw[reader]['ratio']:.3f} of the limit "
                           f"(target 0.9..1.1)")
        return out

    def table_narrow(self) -> str:
        """metric | value | target | result, one row per line, value wrapped if long."""
        head = ("metric", "value", "target", "result")
        rows = [(f"[{r.section}] {r.metric}", r.value, r.target, r.verdict) for r in self.rows]
        w0 = max([len(head[0])] + [len(r[0]) for r in rows])
        w2 = max([len(head[2])] + [len(r[2]) for r in rows])
        w3 = 6
        lines = [f"{head[0]:<{w0}}  {head[2]:<{w2}}  {head[3]:<{w3}}  {head[1]}",
                 "-" * (w0 + w2 + w3 + 40)]
        for m, v, t, res in rows:
            lines.append(f"{m:<{w0}}  {t:<{w2}}  {res:<{w3}}  {v}")
        return "\n".join(lines)


# --- main ------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keys", type=int, default=None,
                    help="keys in the DEBUG POPULATE dataset (default 1,000,000; quick 100,000)")
    ap.add_argument("--quick", action="store_true",
                    help="smaller datasets and shorter phases (a smoke run, ~2 minutes)")
    ap.add_argument("--only", default=",".join(SECTIONS),
                    help=f"comma-separated sections to run: {','.join(SECTIONS)}")
    ap.add_argument("--json", metavar="FILE", help="also write every result to FILE as JSON")
    ap.add_argument("--big-scale", type=float, default=None,
                    help="scale of the big-key memory dataset (default 1.0 = 300 MiB string, "
                         "5M-field hash, 5M-element list; quick 0.05)")
    ap.add_argument("--mixed-keys", type=int, default=None,
                    help="keys in the mixed dataset (default 50,000; quick 20,000)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="rounds of each snapshot comparison (median taken; default 3)")
    ap.add_argument("--bench-requests", type=int, default=None,
                    help="redis-benchmark -n for the incremental section "
                         "(default 4,000,000; quick 2,000,000)")
    ap.add_argument("--keep", action="store_true", help="keep daemon logs and data dirs")
    ap.add_argument("-v", "--verbose", action="store_true", help="tracebacks of failures")
    args = ap.parse_args(argv)
    q = args.quick
    args.keys = args.keys if args.keys is not None else (100_000 if q else 1_000_000)
    args.big_scale = args.big_scale if args.big_scale is not None else (0.05 if q else 1.0)
    args.mixed_keys = args.mixed_keys if args.mixed_keys is not None else (
        20_000 if q else 50_000)
    args.rounds = args.rounds if args.rounds is not None else 3
    args.bench_requests = args.bench_requests if args.bench_requests is not None else (
        2_000_000 if q else 4_000_000)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in only if s not in SECTIONS]
    if bad or not only:
        ap.error(f"--only: unknown section(s) {', '.join(bad) or '(none given)'}; "
                 f"choose from {','.join(SECTIONS)}")
    args.only = [s for s in SECTIONS if s in only]
    if args.keys < 1 or args.mixed_keys < 5 or args.rounds < 1 or args.big_scale <= 0:
        ap.error("--keys, --mixed-keys, --rounds and --big-scale must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    # Also when started with SIGINT ignored (a background job of a non-interactive shell).
    signal.signal(signal.SIGINT, on_term)

    bench = Bench(args)
    t_start = time.perf_counter()
    interrupted = False
    try:
        bench.header()
        for name in args.only:
            try:
                getattr(bench, f"section_{name}")()
            except KeyboardInterrupt:
                raise
            except BaseException as exc:   # pytest.skip (a missing server) is a BaseException
                bench.unavailable(name, f"section {name}", exc)
                if args.verbose:
                    traceback.print_exc()
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: stopping every server and daemon", flush=True)
    finally:
        bench.close()
    if bench.shutdowns:
        worst = max(bench.shutdowns)
        bench.results["daemon_shutdown_seconds"] = [
            None if x == float("inf") else round(x, 3) for x in bench.shutdowns]
        bench.rows.append(Row("daemon", f"SIGTERM to exit, worst of {len(bench.shutdowns)} "
                              "daemons", "did not exit (killed after 15 s)" if worst == float(
                                  "inf") else fmt_s(worst), "< 10 s", verdict(worst < 10)))
    elapsed = time.perf_counter() - t_start
    bench.results["meta"] = {**bench.results.get("meta", {}), "seconds": round(elapsed, 1),
                             "interrupted": interrupted}
    print(f"\n== results ({'quick' if args.quick else 'full'} run, {elapsed:.0f} s"
          f"{', INTERRUPTED' if interrupted else ''}) ==")
    headline = bench.headline()
    if headline:
        print("headline (cdcd relative to native Redis replication / to its targets, same "
              "machine, same run):")
        for line in headline:
            print(f"  {line}")
        print()
    print(bench.table_narrow())
    verdicts = [r.verdict for r in bench.rows]
    print(f"\n{verdicts.count('PASS')} pass, {verdicts.count('FAIL')} fail, "
          f"{verdicts.count('n/a')} not available")
    if args.json:
        doc = {"results": bench.results, "table": [r.to_json() for r in bench.rows]}
        Path(args.json).write_text(json.dumps(doc, indent=2, default=str))
        print(f"results written to {args.json}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
