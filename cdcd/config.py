"""Daemon configuration: defaults < config file < ``CDCD_*`` environment < command-line flags.

Every setting is declared once in ``SETTINGS`` (type, default, range, help); the flags of
``cdcd serve``, the environment variable names, the config file's keys and the checks all
come from that table. A bad value is refused naming the setting and where it came from
(``CDCD_PORT: must be an integer 0..65535, got 'abc'``).
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CdcdError

DEFAULT_CONFIG = Path("config/cdcd.toml")
ENV_PREFIX = "CDCD_"
# CDCD_* variables that are not daemon settings (the command-line client's).
CLIENT_ENV = frozenset({"CDCD_URL"})
BOOL_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
INT_RE = re.compile(r"[+-]?[0-9]+")

# Where a value came from, weakest first.
DEFAULT, FILE, ENV, FLAG = 0, 1, 2, 3


class ConfigError(CdcdError):
    pass


@dataclass(frozen=True, kw_only=True)
class Setting:
    """One daemon setting: its type, default, allowed values and documentation."""

    name: str
    kind: type
    default: Any
    help: str
    lo: int = 0
    hi: int = 0
    choices: tuple[str, ...] = ()
    flag: bool = True        # ``cdcd serve --name`` exists (never for a secret)
    in_file: bool = True     # may be set in the config file
    path: bool = False       # a file system path, made absolute at start

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def range(self) -> str:
        """The allowed values, as the README table and the error messages say them."""
        if self.kind is int:
            return f"{self.lo}..{self.hi}"
        if self.kind is bool:
            return "true/false/1/0/yes/no"
        if self.choices:
            return ", ".join(self.choices)
        return "a path" if self.path else "a string"


SETTINGS: tuple[Setting, ...] = (
    Setting(name="host", kind=str, default="127.0.0.1",
            help="address the HTTP API listens on; a non-loopback one needs an auth token "
                 "or insecure_bind"),
    Setting(name="port", kind=int, default=8444, lo=0, hi=65535,
            help="TCP port of the HTTP API (0: any free port, logged)"),
    Setting(name="data_dir", kind=str, default="./data", path=True,
            help="task metadata and checkpoints (cdcd.json, mode 0600); the container uses "
                 "/var/lib/cdcd"),
    Setting(name="config", kind=str, default=str(DEFAULT_CONFIG), path=True, in_file=False,
            help="TOML config file; the default is read only when it exists, a given one "
                 "must exist; the container uses /etc/cdcd/cdcd.toml"),
    Setting(name="max_tasks", kind=int, default=100, lo=1, hi=100_000,
            help="create answers 409 once this many tasks exist"),
    Setting(name="max_body_bytes", kind=int, default=1 << 20, lo=1, hi=1 << 30,
            help="request bodies larger than this answer 413"),
    Setting(name="body_read_timeout_s", kind=int, default=30, lo=1, hi=3600,
            help="seconds a client may take to send a request body (408 after), and "
                 "that an idle or silent connection is kept open"),
    Setting(name="max_connections", kind=int, default=256, lo=1, hi=65535,
            help="HTTP connections served at once; a request on one more is answered "
                 "503 (/healthz, /readyz, /metrics are still answered)"),
    Setting(name="auth_token", kind=str, default="", flag=False,
            help="bearer token required on every request except /healthz and /readyz; "
                 "prefer CDCD_AUTH_TOKEN or auth_token_file (no flag: it would show in ps)"),
    Setting(name="auth_token_file", kind=str, default="", path=True,
            help="file holding the bearer token (surrounding white space stripped; an "
                 "empty file is refused)"),
    Setting(name="metrics_need_token", kind=bool, default=False,
            help="whether /metrics needs the token too (when one is set)"),
    Setting(name="insecure_bind", kind=bool, default=False,
            help="allow a non-loopback host without an auth token"),
    Setting(name="log_level", kind=str, default="INFO",
            choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
            help="least severe level logged (case-insensitive)"),
    Setting(name="log_format", kind=str, default="text", choices=("text", "json"),
            help="text lines, or one JSON object per line (ts, level, logger, msg, task_id, "
                 "exc)"),
    Setting(name="rdb_processes", kind=int, default=-1, lo=-1, hi=256,
            help="helper processes that may split source RDBs at once, each taking over "
                 "one RDB once 1 MiB of it has been read; 0: every RDB is split in the "
                 "daemon's event loop; -1: one per CPU beyond two"),
    Setting(name="tasks", kind=str, default="", path=True,
            help="tasks file (JSON) or directory of *.json files created at start-up, "
                 "idempotently by task_id"),
)
BY_NAME = {s.name: s for s in SETTINGS}
PRECEDENCE_NAMES = {DEFAULT: "default", FILE: "config file", ENV: "environment",
                    FLAG: "command line"}


@dataclass(kw_only=True)
class Config:
    host: str = "127.0.0.1"
    port: int = 8444
    data_dir: str = "./data"
    config: str = ""
    max_tasks: int = 100
    max_body_bytes: int = 1 << 20
    body_read_timeout_s: int = 30
    max_connections: int = 256
    auth_token: str = ""
    auth_token_file: str = ""
    metrics_need_token: bool = False
    insecure_bind: bool = False
    log_level: str = "INFO"
    log_format: str = "text"
    rdb_processes: int = -1
    tasks: str = ""
    # Where each setting not at its default came from ("CDCD_PORT", "--port", "/x.toml:
    # port"), and how strongly (FILE, ENV, FLAG).
    origins: dict[str, str] = field(default_factory=dict, compare=False)
    ranks: dict[str, int] = field(default_factory=dict, compare=False)
    # Things to log once logging is set up (e.g. an unknown CDCD_* variable).
    warnings: list[str] = field(default_factory=list, compare=False)

    def __repr__(self) -> str:
        shown = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                 if f.name in BY_NAME}
        if shown["auth_token"]:
            shown["auth_token"] = "***"
        return "Config(" + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"

    def origin(self, name: str) -> str:
        return self.origins.get(name, "default")

    def token(self) -> str:
        """The bearer token: auth_token or the content of auth_token_file, whichever was
        set with the higher precedence ("" when neither is set)."""
        token_rank = self.ranks.get("auth_token", DEFAULT)
        file_rank = self.ranks.get("auth_token_file", DEFAULT)
        if not self.auth_token_file or (self.auth_token and token_rank > file_rank):
            return self.auth_token
        where = self.origin("auth_token_file")
        try:
            token = Path(self.auth_token_file).read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or exc
            raise ConfigError(f"{where}: cannot read the token file "
                              f"{self.auth_token_file}: {reason}") from exc
        if not token:
            raise ConfigError(f"{where}: the token file {self.auth_token_file} is empty")
        return token


def convert(s: Setting, value: Any, where: str, *, typed: bool = False) -> Any:
    """Check one raw value (a string from a flag or the environment, a TOML value from the
    file: ``typed``, where "80" is not a number) and return it typed; raise ConfigError
    naming ``where``."""
    text = isinstance(value, str) and not typed
    if s.kind is int:
        if text and INT_RE.fullmatch(value.strip()):
            value = int(value.strip())
        if isinstance(value, bool) or not isinstance(value, int) or not s.lo <= value <= s.hi:
            raise ConfigError(f"{where}: must be an integer {s.range}, got {value!r}")
        return value
    if s.kind is bool:
        if text and value.strip().lower() in BOOL_WORDS:
            return BOOL_WORDS[value.strip().lower()]
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: must be a boolean (true/false/1/0/yes/no), "
                              f"got {value!r}")
        return value
    if not isinstance(value, str):
        raise ConfigError(f"{where}: must be a string, got {value!r}")
    if s.choices:
        folded = value.strip().upper() if s.name == "log_level" else value.strip().lower()
        if folded not in s.choices:
            raise ConfigError(f"{where}: must be one of {s.range}, got {value!r}")
        return folded
    if s.name in ("host", "data_dir", "config") and not value.strip():
        raise ConfigError(f"{where}: must not be empty")
    if "\0" in value:
        raise ConfigError(f"{where}: must not hold a NUL character")
    return value.strip() if s.name == "host" else value


def _did_you_mean(word: str, names: list[str]) -> str:
    close = difflib.get_close_matches(word, names, n=1)
    return f"; did you mean {close[0]}?" if close else ""


def read_file(path: Path, where: str) -> dict[str, Any]:
    """The [daemon] table of a config file (or its top level when it has none)."""
    try:
        doc = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"config file {path} ({where}): {exc.strerror or exc}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path}: {exc}") from exc
    if "daemon" not in doc:
        return doc
    others = sorted(k for k in doc if k != "daemon")
    if others:
        raise ConfigError(f"config file {path}: unknown table or key {others[0]!r} (the "
                          f"settings go under [daemon])")
    section = doc["daemon"]
    if not isinstance(section, dict):
        raise ConfigError(f"config file {path}: daemon must be a table ([daemon])")
    return section


def _config_file(cfg: Config, given: tuple[Any, str, int] | None) -> Path | None:
    """The config file to read: the one given (which must exist), else the default one
    when it exists."""
    if given is None:
        return DEFAULT_CONFIG.resolve() if DEFAULT_CONFIG.is_file() else None
    value, where, rank = given
    cfg.origins["config"], cfg.ranks["config"] = where, rank
    file = Path(convert(BY_NAME["config"], value, where)).expanduser()
    if not file.is_file():
        raise ConfigError(f"{where}: config file {file} does not exist (or is not a file)")
    return file.resolve()


def load(flags: Mapping[str, Any], environ: Mapping[str, str]) -> Config:
    """Merge defaults, the config file, ``CDCD_*`` variables and flags (``None`` = not
    given); check every value; make the paths absolute."""
    cfg = Config()
    raw: dict[str, tuple[Any, str, int]] = {}   # name -> (value, where, rank)

    for s in SETTINGS:
        value = environ.get(s.env, "")
        if value != "":   # an empty variable counts as unset
            raw[s.name] = (value, s.env, ENV)
        if flags.get(s.name) is not None:
            raw[s.name] = (flags[s.name], s.option, FLAG)

    known = {s.env for s in SETTINGS}
    for name in sorted(environ):
        if name.startswith(ENV_PREFIX) and name not in known | CLIENT_ENV:
            cfg.warnings.append(f"environment variable {name} is not a cdcd setting and is "
                                f"ignored" + _did_you_mean(name, sorted(known)))

    file = _config_file(cfg, raw.pop("config", None))
    if file is not None:
        cfg.config = str(file)
        section = read_file(file, cfg.origin("config"))
        names = [s.name for s in SETTINGS if s.in_file]
        for key, value in section.items():
            if key not in names:
                raise ConfigError(f"config file {file}: unknown setting {key!r}"
                                  + _did_you_mean(key, names))
            where = f"{file}: {key}"
            value = convert(BY_NAME[key], value, where, typed=True)  # even if overridden
            if key not in raw:
                raw[key] = (value, where, FILE)

    for name, (value, where, rank) in raw.items():
        s = BY_NAME[name]
        setattr(cfg, name, convert(s, value, where))
        cfg.origins[name], cfg.ranks[name] = where, rank

    for s in SETTINGS:
        value = getattr(cfg, s.name)
        if s.path and value and s.name != "config":
            setattr(cfg, s.name, str(Path(value).expanduser().resolve()))
    if cfg.auth_token and cfg.auth_token_file and \
            cfg.ranks.get("auth_token") == cfg.ranks.get("auth_token_file"):
        raise ConfigError(f"{cfg.origin('auth_token')} and {cfg.origin('auth_token_file')}: "
                          f"set auth_token or auth_token_file, not both")
    return cfg


def is_loopback(host: str) -> bool:
    """Whether ``host`` only ever means this machine (127.0.0.0/8, ::1, localhost)."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return False   # a name may resolve anywhere
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def check_bind(cfg: Config, token: str) -> None:
    """Refuse to serve a non-loopback address without a token, unless told to."""
    if token or cfg.insecure_bind or is_loopback(cfg.host):
        return
    raise ConfigError(f"refusing to listen on {cfg.host} ({cfg.origin('host')}): it is not a "
                      f"loopback address and no auth token is configured; set "
                      f"CDCD_AUTH_TOKEN (or auth_token_file), or pass --insecure-bind "
                      f"(CDCD_INSECURE_BIND=true) to serve it without one")


def settings_table() -> str:
    """The README's table of settings (Markdown), from ``SETTINGS``."""
    rows = ["| setting | flag | environment | default | allowed | meaning |",
            "|---|---|---|---|---|---|"]
    for s in SETTINGS:
        default = s.default
        shown = ("`\"\"`" if default == "" else f"`{str(default).lower()}`"
                 if isinstance(default, bool) else f"`{default}`")
        flag = f"`{s.option}`" if s.flag else "-"
        name = f"`{s.name}`" if s.in_file else f"`{s.name}` (not in the file)"
        rows.append(f"| {name} | {flag} | `{s.env}` | {shown} | {s.range} | {s.help} |")
    return "\n".join(rows)
