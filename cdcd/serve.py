"""``cdcd serve``: its flags, and running the daemon until SIGTERM/SIGINT.

Exit status: 0 after a clean stop, 1 when the metadata store could not be written at
shutdown, 2 when the daemon could not start (a bad setting or tasks file, the data dir,
the address to listen on).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
from typing import Any

from . import __version__
from .config import SETTINGS, Config, ConfigError, check_bind, is_loopback, load
from .logs import setup

log = logging.getLogger("cdcd")


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``serve`` subcommand (one flag per setting of cdcd.config.SETTINGS)."""
    s: argparse.ArgumentParser = subparsers.add_parser(
        "serve", help="run the daemon",
        description="Run the daemon. Every setting comes from its flag, else its CDCD_* "
                    "environment variable, else the config file, else its default.")
    for setting in SETTINGS:
        if not setting.flag:
            continue
        text = f"{setting.help} (env {setting.env}, default {setting.default!r})"
        if setting.kind is bool:
            s.add_argument(setting.option, action="store_true", default=None, help=text)
        else:
            s.add_argument(setting.option, metavar=setting.name.upper(), help=text)
    return s


def serve(args: argparse.Namespace) -> int:
    flags = {s.name: getattr(args, s.name, None) for s in SETTINGS if s.flag}
    try:
        cfg = load(flags, os.environ)
    except ConfigError as exc:   # logging is not set up yet: its format is a setting
        setup("INFO", _wanted_format(args))
        log.critical("%s", exc)
        return 2
    setup(cfg.log_level, cfg.log_format)
    for warning in cfg.warnings:
        log.warning("%s", warning)
    log.info("cdcd %s starting: data dir %s, config %s, tasks %s", __version__, cfg.data_dir,
             cfg.config or "none", cfg.tasks or "none")
    changed = [f"{name} ({where})" for name, where in cfg.origins.items()]
    if changed:
        log.info("settings not at their default: %s", ", ".join(changed))
    try:
        from .server import make_app
        from .tasksfile import load as load_tasks

        token = cfg.token()
        check_bind(cfg, token)
        declared = load_tasks(cfg.tasks) if cfg.tasks else []
        app = make_app(cfg, declared)
    except ConfigError as exc:
        log.critical("%s", exc)
        return 2
    if not token and not is_loopback(cfg.host):
        log.warning("serving %s without an auth token (insecure_bind): whoever reaches the "
                    "port controls cdcd", cfg.host)
    from .readers import splitproc
    if cfg.rdb_processes >= 0:
        splitproc.max_helpers = cfg.rdb_processes
    log.info("RDB helper processes: up to %d at once (rdb_processes %d, %d CPUs)",
             splitproc.max_helpers, cfg.rdb_processes, os.cpu_count() or 1)
    # The pipelines allocate millions of short-lived tuples and lists that never form
    # cycles; the default thresholds (700 allocations) make the collector run thousands
    # of times a second under load. Cycles are still collected, just less often.
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    return asyncio.run(run(app, cfg))


def _wanted_format(args: argparse.Namespace) -> str:
    """The log format asked for, as far as it can be told when the settings are bad (so
    that even that error is a JSON line when JSON was asked for)."""
    for value in (getattr(args, "log_format", None), os.environ.get("CDCD_LOG_FORMAT")):
        if value and value.strip().lower() in ("json", "text"):
            return value.strip().lower()
    return "text"


async def run(app: Any, cfg: Config) -> int:
    """Open the store, bind, reconcile the tasks file, serve until a signal, stop."""
    from aiohttp import web

    from .errors import CdcdError
    from .server import MANAGER, SHUTDOWN, start_reconciliation

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=10)
    try:
        try:
            await runner.setup()   # the lifecycle: store opened, stored tasks loaded
        except CdcdError as exc:
            said = exc.message if cfg.data_dir in exc.message else \
                f"data dir {cfg.data_dir}: {exc.message}"
            log.critical("%s", said)
            return 2
        except OSError as exc:
            log.critical("data dir %s: cannot use it: %s", cfg.data_dir,
                         exc.strerror or exc)
            return 2
        if stop.is_set():
            return 0
        site = web.TCPSite(runner, cfg.host, cfg.port)
        try:
            await site.start()
        except OSError as exc:
            # asyncio's strerror repeats the address: say the errno's own words
            log.critical("cannot listen on %s:%d: %s", cfg.host, cfg.port,
                         os.strerror(exc.errno) if exc.errno else exc)
            return 2
        addrs = ", ".join(_url(a) for a in runner.addresses)
        log.info("listening on %s", addrs)
        await start_reconciliation(app)
        await stop.wait()
        manager = app[MANAGER]
        log.info("stopping: %d task(s), %d running", len(manager.tasks),
                 sum(t.running for t in manager.tasks.values()))
    finally:
        await runner.cleanup()   # stop serving, then the lifecycle stops the tasks
    store_error = app[SHUTDOWN].store_error
    if store_error:
        # the tasks are stopped, but what they did since the last write that succeeded is
        # not in cdcd.json: a restart resumes from older checkpoints
        log.error("stopped, but the metadata store could not be written: %s; %s keeps the "
                  "last version written", store_error, app[MANAGER].store.path)
        return 1
    log.info("stopped")
    return 0


def _url(addr: Any) -> str:
    host, port = addr[0], addr[1]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
