"""``cdcd serve``: its flags, and running the daemon until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from . import __version__


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``serve`` subcommand to the CLI's subparsers."""
    s: argparse.ArgumentParser = subparsers.add_parser("serve", help="run the daemon")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--data-dir")
    s.add_argument("--config", help="TOML file (default: config/cdcd.toml when present)")
    s.add_argument("--log-level")
    return s


def serve(args: argparse.Namespace) -> int:
    from aiohttp import web

    from .config import ConfigError, load
    from .errors import CdcdError
    from .server import SHUTDOWN, make_app

    try:
        cfg = load(args.config, {"host": args.host, "port": args.port,
                                 "data_dir": args.data_dir, "log_level": args.log_level})
        logging.basicConfig(level=cfg.log_level.upper(),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        app = make_app(cfg)
    except (ConfigError, CdcdError, ValueError) as exc:
        print(f"cdcd: {exc}", file=sys.stderr)
        return 2
    logging.getLogger("cdcd").info("cdcd %s listening on http://%s:%d, data in %s",
                                   __version__, cfg.host, cfg.port, cfg.data_dir)
    try:
        web.run_app(app, host=cfg.host, port=cfg.port, print=None, access_log=None,
                    shutdown_timeout=10)
    except CdcdError as exc:
        print(f"cdcd: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"cdcd: cannot listen on {cfg.host}:{cfg.port}: {exc.strerror or exc}",
              file=sys.stderr)
        return 2
    store_error = app[SHUTDOWN].store_error
    if store_error:
        # the tasks are stopped, but what they did since the last write that succeeded is
        # not in cdcd.json: a restart resumes from older checkpoints
        print(f"cdcd: stopped, but the metadata store could not be written: {store_error}; "
              f"{Path(cfg.data_dir) / 'cdcd.json'} keeps the last version written",
              file=sys.stderr)
        return 1
    return 0
