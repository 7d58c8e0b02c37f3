"""Validate and normalise a task spec (the ``create`` request_data)."""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .compat import WRITE_MODES
from .errors import RequestError
from .secrets import Secret, SecretRef, parse_secret, reveal

MASK = "***"
METHODS = ("full_amount_migration", "incremental_migration")
READERS = ("auto", "psync", "scan")
RESUME_MODES = ("auto", "manual")
EXISTING_KEYS = ("replace", "skip", "fail")
FUNCTIONS = ("copy", "skip")
MODULES = ("fail", "skip")
MAX_RDB_PATH = 4096
EVICTION_ACTIONS = ("warn", "fail")
# Bounds on what one spec may hold, so one task cannot make the store megabytes long.
MAX_NAME = 256
MAX_SECRET = 4096
MAX_USERNAME = 256
MAX_ADDRS = 64
MAX_HOST = 253                # RFC 1123 host name, ASCII (IDNA) form
MAX_ADDRS_TEXT = 64 * 1024    # an addrs string or list, URLs with their passwords included
MAX_PATH = 4096
DEFAULT_PORT = 6379           # of a redis:// URL without a port
MAX_PREFIXES = 256
MAX_PREFIX_BYTES = 1024
MAX_DB_LIST = 1024
MAX_DB_MAPPING = 1024
MAX_HOST_MAPPING = 1024
LINK_TIMEOUT_S = 60           # like Redis's repl-timeout
MAX_LINK_TIMEOUT_S = 3600
TASK_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
# ASCII digits only: str.isdigit() accepts '²', which int() then refuses.
PORT_RE = re.compile(r"[0-9]{1,5}")
DB_RE = re.compile(r"[0-9]{1,5}")
# RFC 1123 labels, plus '_' (Docker Compose v1 and some cloud names use it; resolvers
# accept it).
HOST_LABEL_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
HOST_NUMERIC_RE = re.compile(r"[0-9.]+")
MAX_DB = 15_999


@dataclass(frozen=True, kw_only=True)
class Sentinel:
    """A deployment managed by Sentinel: ask these sentinels where master ``master_name``
    is (``SENTINEL get-master-addr-by-name``) at every connect."""

    addrs: tuple[tuple[str, int], ...]
    master_name: str
    username: str = ""
    password: Secret = ""

    @property
    def display(self) -> str:
        return ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.addrs)

    def password_bytes(self) -> bytes:
        return reveal(self.password, "sentinel password")

    def to_json(self, *, mask: bool) -> dict[str, Any]:
        if isinstance(self.password, SecretRef):
            password: Any = self.password.to_json()
        else:
            password = MASK if self.password and mask else self.password
        return {"addrs": self.display, "master_name": self.master_name,
                "username": self.username, "password": password}


@dataclass(frozen=True, kw_only=True)
class Endpoint:
    """Where a Redis deployment is, how to log in and how to speak TLS to it.

    ``password`` is a string or a SecretRef (read at connect time by ``password_bytes``);
    the repr never prints a password, and the TLS files are paths, read when connecting.
    """

    addrs: tuple[tuple[str, int], ...]
    username: str = ""
    password: Secret = ""
    tls: bool = False
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_server_name: str = ""
    tls_skip_verify: bool = False
    # Cluster nodes that announce an address cdcd cannot dial: {"announced": "dial"}, each
    # "host:port" or a bare host (cdcd.topology.HostMapping reads it).
    host_mapping: dict[str, str] = field(default_factory=dict)
    # Managed by Sentinel: ``addrs`` is then the master's address found at the last
    # connect (empty before the first), never stored.
    sentinel: Sentinel | None = None
    # A cluster source: read each shard from its master (default) or one of its replicas.
    read_from: str = "master"
    # A source that is a backup file (an absolute path the daemon reads), not a server.
    rdb_file: str = ""

    def __repr__(self) -> str:
        pw = self.password if isinstance(self.password, SecretRef) else \
            (MASK if self.password else "")
        tls = ", tls=True" if self.tls else ""
        return (f"Endpoint(addrs={self.display!r}, username={self.username!r}, "
                f"password={pw!r}{tls})")

    @property
    def display(self) -> str:
        addrs = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.addrs)
        if self.sentinel is None:
            return addrs
        return (f"master {self.sentinel.master_name} of sentinel {self.sentinel.display}"
                + (f" (now {addrs})" if addrs else ""))

    def password_bytes(self, role: str) -> bytes:
        """Return the password's value now (a reference is read again at every connect)."""
        return reveal(self.password, f"{role} password")

    def to_json(self, *, mask: bool) -> dict[str, Any]:
        """A reference (``{"env": ...}``, ``{"file": ...}``) is shown as is: it is not a
        secret; a password string is ``***`` when masked."""
        if self.rdb_file:
            return {"rdb_file": self.rdb_file}
        if isinstance(self.password, SecretRef):
            password: Any = self.password.to_json()
        else:
            password = MASK if self.password and mask else self.password
        where: dict[str, Any] = {"addrs": self.display} if self.sentinel is None else \
            {"sentinel": self.sentinel.to_json(mask=mask)}
        return {
            **where,
            "username": self.username,
            "password": password,
            "tls": self.tls,
            "tls_ca_file": self.tls_ca_file,
            "tls_cert_file": self.tls_cert_file,
            "tls_key_file": self.tls_key_file,
            "tls_server_name": self.tls_server_name,
            "tls_skip_verify": self.tls_skip_verify,
            "host_mapping": dict(sorted(self.host_mapping.items())),
            **({"read_from": self.read_from} if self.read_from != "master" else {}),
        }


@dataclass(frozen=True, kw_only=True)
class Filter:
    dbs: tuple[int, ...] | None = None
    include_prefixes: tuple[bytes, ...] = ()
    exclude_prefixes: tuple[bytes, ...] = ()

    def key_ok(self, key: bytes) -> bool:
        if self.include_prefixes and not key.startswith(self.include_prefixes):
            return False
        return not (self.exclude_prefixes and key.startswith(self.exclude_prefixes))

    def db_ok(self, db: int) -> bool:
        return self.dbs is None or db in self.dbs

    @property
    def by_key(self) -> bool:
        return bool(self.include_prefixes or self.exclude_prefixes)

    def rdb_want(self) -> Callable[[int, bytes], bool] | None:
        """The RDB splitter's ``want``: whether a key of a db is copied (None: all are)."""
        if not self.by_key and self.dbs is None:
            return None
        return lambda db, key: self.db_ok(db) and self.key_ok(key)


@dataclass(frozen=True, kw_only=True)
class ContinuousVerify:
    """Compare ``sample`` random keys every ``every_s`` seconds while the task runs."""

    sample: int = 1000
    every_s: int = 300


@dataclass(frozen=True, kw_only=True)
class TaskSpec:
    task_id: str
    name: str = ""
    source: Endpoint
    target: Endpoint
    migration_method: str = "full_amount_migration"
    reader: str = "auto"
    resume_mode: str = "auto"
    bandwidth_limit_mb: int | None = None
    start_at: datetime | None = None
    filter: Filter = field(default_factory=Filter)
    db_mapping: dict[int, int] = field(default_factory=dict)
    existing_keys: str = "replace"
    # How snapshot values are written: RESTORE of DUMP payloads, commands, or whichever
    # the target takes (cdcd.compat).
    write_mode: str = "auto"
    # The source's function libraries: copied (psync reader), or left out ("skip").
    functions: str = "copy"
    # A module value where values are written as commands: fail the task, or leave it out.
    modules: str = "fail"
    # Another task may write the same target dbs (the operator vouches for it).
    shared_target: bool = False
    # Seconds without an answer from a server before its link is declared dead.
    link_timeout_s: int = LINK_TIMEOUT_S
    on_target_eviction: str = "warn"
    continuous_verify: ContinuousVerify | None = None

    @property
    def incremental(self) -> bool:
        return self.migration_method == "incremental_migration"

    def target_db(self, db: int) -> int:
        return self.db_mapping.get(db, db)

    def to_json(self, *, mask: bool) -> dict[str, Any]:
        """Return the spec as the API shows it (mask=True) or as the store keeps it."""
        out: dict[str, Any] = {
            "task_id": self.task_id,
            "name": self.name,
            "source": self.source.to_json(mask=mask),
            "target": self.target.to_json(mask=mask),
            "migration_method": self.migration_method,
            "reader": self.reader,
            "resume_mode": self.resume_mode,
            "bandwidth_limit_mb": self.bandwidth_limit_mb,
            "start_at": _fmt_time(self.start_at) if self.start_at else None,
            "filter": {
                "dbs": list(self.filter.dbs) if self.filter.dbs is not None else None,
                "include_prefixes": [p.decode("utf-8", "surrogateescape")
                                     for p in self.filter.include_prefixes],
                "exclude_prefixes": [p.decode("utf-8", "surrogateescape")
                                     for p in self.filter.exclude_prefixes],
            },
            "db_mapping": {str(k): v for k, v in sorted(self.db_mapping.items())},
            "existing_keys": self.existing_keys,
            "write_mode": self.write_mode,
            "functions": self.functions,
            "modules": self.modules,
            "shared_target": self.shared_target,
            "link_timeout_s": self.link_timeout_s,
            "on_target_eviction": self.on_target_eviction,
            "continuous_verify": (None if self.continuous_verify is None else
                                  {"sample": self.continuous_verify.sample,
                                   "every_s": self.continuous_verify.every_s}),
        }
        return out

    def __repr__(self) -> str:
        return f"TaskSpec(task_id={self.task_id!r}, source={self.source!r}, target={self.target!r})"


def _fmt_time(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- parsing --------------------------------------------------------------------------------

class _Fields:
    """Pop typed fields from a JSON object, naming the path in every error."""

    def __init__(self, obj: Any, path: str) -> None:
        if not isinstance(obj, dict):
            raise RequestError(f"{path}: must be an object")
        self.obj = dict(obj)
        self.path = path

    def _name(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def pop(self, key: str, kind: type | tuple[type, ...], default: Any = None, *,
            required: bool = False) -> Any:
        if key not in self.obj or self.obj[key] is None:
            self.obj.pop(key, None)
            if required:
                raise RequestError(f"{self._name(key)}: required")
            return default
        value = self.obj.pop(key)
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds:
            raise RequestError(f"{self._name(key)}: must be {_kind_name(kinds)}")
        if not isinstance(value, kinds):
            raise RequestError(f"{self._name(key)}: must be {_kind_name(kinds)}")
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        value = self.pop(key, str, default)
        if value not in choices:
            raise RequestError(f"{self._name(key)}: must be one of {', '.join(choices)}")
        return str(value)

    def sub(self, key: str, *, required: bool = False) -> _Fields | None:
        value = self.pop(key, dict, None, required=required)
        return None if value is None else _Fields(value, self._name(key))

    def done(self) -> None:
        if self.obj:
            raise RequestError(f"{self._name(sorted(self.obj)[0])}: unknown field")


def _kind_name(kinds: tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", bool: "a boolean", dict: "an object",
             list: "a list", float: "a number"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


# --- addresses ------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class AddrList:
    """An ``addrs`` value taken apart; what its ``redis://`` URLs said, when they said it."""

    addrs: tuple[tuple[str, int], ...]
    username: str = ""
    password: str = ""
    tls: bool | None = None      # True for rediss://, False for redis://, None without a URL


def _bad_char(text: str) -> bool:
    """Say whether ``text`` holds a control character, a space or another blank."""
    return any(ch.isspace() or not ch.isprintable() for ch in text)


def parse_host(host: str, path: str) -> str:
    """Validate a host name (RFC 1123; IDNA names become their ASCII form) or an IP
    literal (IPv6 without brackets); return the host to dial."""
    if not host:
        raise RequestError(f"{path}: empty host")
    if _bad_char(host):
        raise RequestError(f"{path}: a host must not contain spaces or control characters")
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise RequestError(f"{path}: {_quote(host)} is not an IPv6 address") from None
        return host
    if HOST_NUMERIC_RE.fullmatch(host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise RequestError(f"{path}: {_quote(host)} is not an IPv4 address") from None
        return host
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise RequestError(f"{path}: {_quote(host)} is not a valid international "
                               f"host name") from None
    if len(host) > MAX_HOST:
        raise RequestError(f"{path}: host name longer than {MAX_HOST} characters")
    if not all(HOST_LABEL_RE.fullmatch(label) for label in host.split(".")):
        raise RequestError(f"{path}: {_quote(host)} is not a host name (dot-separated labels "
                           f"of 1-63 letters, digits, '_' and '-', not starting or ending with "
                           f"'-')")
    return host


def _quote(text: str) -> str:
    return repr(text if len(text) <= 80 else text[:80] + "...")


def _host_port(text: str, path: str, shown: str, default_port: int | None) -> tuple[str, int]:
    """Split ``host:port`` or ``[v6]:port`` (a URL may leave the port out)."""
    if text.startswith("["):
        host, close, rest = text[1:].partition("]")
        if not close or (rest and not rest.startswith(":")):
            raise RequestError(f"{path}: {shown} is not [IPv6]:port")
        if ":" not in host:
            raise RequestError(f"{path}: {shown}: brackets are for IPv6 addresses only")
        port = rest[1:] if rest else None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            host, port = text, None
        else:
            port = port_text
        if ":" in host:
            raise RequestError(f"{path}: {shown}: write an IPv6 address in brackets, "
                               f"e.g. [::1]:6379")
    if port is None:
        if default_port is None:
            raise RequestError(f"{path}: {shown} is not host:port")
        number = default_port
    elif not PORT_RE.fullmatch(port) or not 0 < int(port) < 65536:
        raise RequestError(f"{path}: {shown}: the port must be a number 1..65535")
    else:
        number = int(port)
    if not host:
        raise RequestError(f"{path}: {shown} is not host:port")
    return parse_host(host, path), number


def _unquote(text: str, path: str, what: str) -> str:
    try:
        return urllib.parse.unquote(text, errors="strict")
    except UnicodeDecodeError:
        raise RequestError(f"{path}: the URL's {what} is not UTF-8 once percent-decoded") \
            from None


def _split_url(part: str, path: str) -> tuple[tuple[str, int], str, str, bool]:
    """Take ``redis[s]://[user[:password]@]host[:port][/]`` apart: (address, username,
    password, tls). Errors never quote the URL, which may hold a password."""
    scheme, _, rest = part.partition("://")
    scheme = scheme.lower()
    if scheme not in ("redis", "rediss"):
        raise RequestError(f"{path}: unsupported URL scheme (use redis:// or rediss://)")
    cut = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority, tail = rest[:cut], rest[cut:]
    if tail and tail != "/":
        if DB_RE.fullmatch(tail[1:]) and tail.startswith("/"):
            raise RequestError(f"{path}: a database in the URL (/{tail[1:]}) is not supported: "
                               f"select databases with filter.dbs and db_mapping")
        raise RequestError(f"{path}: a {scheme}:// URL may not have a path, query or fragment "
                           f"(percent-encode '/', '?', '#' in a password)")
    userinfo, at, hostport = authority.rpartition("@")
    username = password = ""
    if at:
        user, colon, pw = userinfo.partition(":")
        username = _unquote(user, path, "username")
        password = _unquote(pw, path, "password") if colon else ""
        if len(username) > MAX_USERNAME:
            raise RequestError(f"{path}: the URL's username is longer than {MAX_USERNAME} "
                               f"characters")
        if len(password) > MAX_SECRET:
            raise RequestError(f"{path}: the URL's password is longer than {MAX_SECRET} "
                               f"characters")
    shown = f"the address in the {scheme}:// URL"
    addr = _host_port(hostport, path, shown, default_port=DEFAULT_PORT)
    return addr, username, password, scheme == "rediss"


def split_addrs(value: Any, path: str) -> AddrList:
    """Parse ``addrs``: ``host:port``, ``[v6]:port`` or ``redis[s]://`` URLs, one or a
    comma-separated list (or a JSON list). The URLs' credentials and scheme must agree."""
    if isinstance(value, str):
        if len(value) > MAX_ADDRS_TEXT:
            raise RequestError(f"{path}: at most {MAX_ADDRS_TEXT} characters")
        parts = value.split(",")
    elif isinstance(value, list) and all(isinstance(p, str) for p in value):
        if sum(len(p) for p in value) > MAX_ADDRS_TEXT:
            raise RequestError(f"{path}: at most {MAX_ADDRS_TEXT} characters")
        parts = list(value)
    else:
        raise RequestError(f"{path}: must be a string 'host:port[,host:port]' or a list of them")
    if len(parts) > MAX_ADDRS:
        raise RequestError(f"{path}: at most {MAX_ADDRS} addresses")
    out: list[tuple[str, int]] = []
    urls: set[tuple[str, str, bool]] = set()
    for raw in parts:
        part = raw.strip(" ")   # spaces around the commas only
        if _bad_char(part):
            raise RequestError(f"{path}: must not contain spaces or control characters")
        if "://" in part:
            addr, username, password, tls = _split_url(part, path)
            urls.add((username, password, tls))
            out.append(addr)
        elif "@" in part:   # not quoted: what precedes the '@' may be a password
            raise RequestError(f"{path}: credentials in an address need a redis:// or "
                               f"rediss:// URL (or use username and password)")
        else:
            out.append(_host_port(part, path, _quote(part), default_port=None))
    if not out:
        raise RequestError(f"{path}: required")
    if len(urls) > 1:
        raise RequestError(f"{path}: the URLs disagree on the scheme or the credentials")
    if not urls:
        return AddrList(addrs=tuple(out))
    username, password, tls = urls.pop()
    return AddrList(addrs=tuple(out), username=username, password=password, tls=tls)


def parse_addrs(value: Any, path: str) -> tuple[tuple[str, int], ...]:
    """Parse ``addrs`` where only addresses count: a URL's credentials or rediss:// scheme
    would be lost here, so they are refused rather than dropped."""
    got = split_addrs(value, path)
    if got.username or got.password or got.tls:
        raise RequestError(f"{path}: a URL with credentials or rediss:// is accepted only in "
                           f"an endpoint's addrs")
    return got.addrs


def parse_sentinel(fields: _Fields) -> Sentinel:
    raw = fields.pop("addrs", (str, list), required=True)
    got = split_addrs(raw, fields._name("addrs"))
    if got.username or got.password or got.tls:
        raise RequestError(f"{fields._name('addrs')}: give the sentinels' credentials as "
                           f"username and password, not in URLs")
    name = fields.pop("master_name", str, required=True)
    if not name or len(name) > MAX_NAME or _bad_char(name) or " " in name:
        raise RequestError(f"{fields._name('master_name')}: 1-{MAX_NAME} printable "
                           f"characters without spaces")
    username = _bounded(fields, "username", MAX_USERNAME)
    pw_raw = fields.obj.pop("password", None)
    password: Secret = "" if pw_raw is None else \
        parse_secret(pw_raw, fields._name("password"), MAX_SECRET)
    fields.done()
    return Sentinel(addrs=got.addrs, master_name=name, username=username, password=password)


def parse_endpoint(fields: _Fields) -> Endpoint:
    if "rdb_file" in fields.obj:
        path = fields.pop("rdb_file", str, "")
        others = sorted(fields.obj)
        if others:
            raise RequestError(f"{fields._name(others[0])}: an rdb_file source takes no "
                               f"other field")
        if not path.startswith("/") or len(path) > MAX_RDB_PATH:
            raise RequestError(f"{fields._name('rdb_file')}: must be an absolute path (at "
                               f"most {MAX_RDB_PATH} characters) the daemon can read")
        return Endpoint(addrs=(), rdb_file=path)
    sentinel_fields = fields.sub("sentinel")
    sentinel = None
    if sentinel_fields is not None:
        if fields.obj.get("addrs") is not None:
            raise RequestError(f"{fields._name('addrs')}: give addrs or sentinel, not both")
        if fields.obj.get("host_mapping"):
            raise RequestError(f"{fields._name('host_mapping')}: is for cluster nodes, not "
                               f"a Sentinel-managed master")
        sentinel = parse_sentinel(sentinel_fields)
        raw: Any = []
    else:
        raw = fields.pop("addrs", (str, list), required=True)
    got = split_addrs(raw, fields._name("addrs")) if sentinel is None else \
        AddrList(addrs=(), username="", password="", tls=None)
    username = _bounded(fields, "username", MAX_USERNAME)
    pw_raw = fields.obj.pop("password", None)
    password: Secret = "" if pw_raw is None else \
        parse_secret(pw_raw, fields._name("password"), MAX_SECRET)
    tls_given = fields.obj.get("tls")
    tls = fields.pop("tls", bool, False)
    if got.username:
        if username:
            raise RequestError(f"{fields._name('username')}: given twice, in the addrs URL "
                               f"and here; keep one")
        username = got.username
    if got.password:
        if password:
            raise RequestError(f"{fields._name('password')}: given twice, in the addrs URL "
                               f"and here; keep one")
        password = got.password
    if got.tls is not None:
        if tls_given is not None and tls != got.tls:
            scheme = "rediss://" if got.tls else "redis://"
            raise RequestError(f"{fields._name('tls')}: is {str(tls).lower()} but addrs is a "
                               f"{scheme} URL")
        tls = got.tls
    ca = _tls_path(fields, "tls_ca_file")
    cert = _tls_path(fields, "tls_cert_file")
    key = _tls_path(fields, "tls_key_file")
    server_name = _bounded(fields, "tls_server_name", MAX_HOST)
    if server_name:
        server_name = parse_host(server_name, fields._name("tls_server_name"))
    skip = fields.pop("tls_skip_verify", bool, False)
    set_fields = [name for name, value in (("tls_ca_file", ca), ("tls_cert_file", cert),
                                           ("tls_key_file", key),
                                           ("tls_server_name", server_name),
                                           ("tls_skip_verify", skip)) if value]
    if set_fields and not tls:
        raise RequestError(f"{fields._name(set_fields[0])}: needs tls: true")
    if bool(cert) != bool(key):
        missing = "tls_key_file" if cert else "tls_cert_file"
        raise RequestError(f"{fields._name(missing)}: required with "
                           f"{'tls_cert_file' if cert else 'tls_key_file'} (a client "
                           f"certificate needs both)")
    if skip and ca:
        raise RequestError(f"{fields._name('tls_ca_file')}: has no use with "
                           f"tls_skip_verify: true (nothing is verified)")
    ep = Endpoint(addrs=got.addrs, username=username, password=password, tls=tls,
                  tls_ca_file=ca, tls_cert_file=cert, tls_key_file=key,
                  tls_server_name=server_name, tls_skip_verify=skip,
                  host_mapping=parse_host_mapping(fields), sentinel=sentinel,
                  read_from=fields.choice("read_from", ("master", "replica"), "master"))
    fields.done()
    return ep


def parse_host_mapping(fields: _Fields) -> dict[str, str]:
    """``{"announced host:port": "dial host:port"}`` or ``{"host": "host"}``."""
    raw = fields.pop("host_mapping", dict, {})
    path = fields._name("host_mapping")
    if len(raw) > MAX_HOST_MAPPING:
        raise RequestError(f"{path}: at most {MAX_HOST_MAPPING} entries")
    out: dict[str, str] = {}
    for announced, dial in raw.items():
        if not isinstance(dial, str):
            raise RequestError(f"{path}.{announced}: must be a string")
        a = _mapping_side(announced, f"{path} key {announced!r}"[:200])
        d = _mapping_side(dial, f"{path}.{announced}"[:200])
        if (a[1] is None) != (d[1] is None):
            raise RequestError(f"{path}.{announced}: map host:port to host:port, or a host "
                               f"to a host")
        out[_show(a)] = _show(d)
    return out


def _mapping_side(text: str, path: str) -> tuple[str, int | None]:
    if _bad_char(text) or len(text) > MAX_HOST + 8:
        raise RequestError(f"{path}: not a host or host:port")
    host, sep, port = text.rpartition(":")
    if sep and PORT_RE.fullmatch(port) and (host.startswith("[") or ":" not in host):
        if not 0 < int(port) < 65536:
            raise RequestError(f"{path}: port must be 1..65535")
        return parse_host(host.strip("[]"), path), int(port)
    return parse_host(text.strip("[]"), path), None


def _show(side: tuple[str, int | None]) -> str:
    host, port = side
    if port is None:
        return host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _tls_path(fields: _Fields, key: str) -> str:
    value = _bounded(fields, key, MAX_PATH)
    if value and (not value.startswith("/") or _bad_char(value)):
        raise RequestError(f"{fields._name(key)}: must be an absolute path without control "
                           f"characters")
    return value


def _bounded(fields: _Fields, key: str, limit: int) -> str:
    value = str(fields.pop(key, str, ""))
    if len(value) > limit:
        raise RequestError(f"{fields._name(key)}: at most {limit} characters")
    return value


def _prefixes(fields: _Fields, key: str) -> tuple[bytes, ...]:
    items = fields.pop(key, list, [])
    if len(items) > MAX_PREFIXES:
        raise RequestError(f"{fields._name(key)}: at most {MAX_PREFIXES} prefixes")
    for i, item in enumerate(items):
        if not isinstance(item, str) or not item:
            raise RequestError(f"{fields._name(key)}[{i}]: must be a non-empty string")
        if len(item.encode("utf-8", "surrogateescape")) > MAX_PREFIX_BYTES:
            raise RequestError(f"{fields._name(key)}[{i}]: at most {MAX_PREFIX_BYTES} bytes")
    return tuple(str(item).encode("utf-8", "surrogateescape") for item in items)


def parse_filter(fields: _Fields | None) -> Filter:
    if fields is None:
        return Filter()
    dbs = fields.pop("dbs", list, None)
    if dbs is not None:
        if not dbs:
            raise RequestError(f"{fields._name('dbs')}: must list at least one db (leave it "
                               f"out to copy every db)")
        if len(dbs) > MAX_DB_LIST:
            raise RequestError(f"{fields._name('dbs')}: at most {MAX_DB_LIST} dbs")
        for i, db in enumerate(dbs):
            if isinstance(db, bool) or not isinstance(db, int) or not 0 <= db <= MAX_DB:
                raise RequestError(f"{fields._name('dbs')}[{i}]: must be a db number 0..{MAX_DB}")
        dbs = tuple(sorted(set(dbs)))
    flt = Filter(dbs=dbs, include_prefixes=_prefixes(fields, "include_prefixes"),
                 exclude_prefixes=_prefixes(fields, "exclude_prefixes"))
    fields.done()
    return flt


def parse_time(value: str, path: str) -> datetime:
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise RequestError(f"{path}: {value!r} is not an ISO 8601 time") from None
    if t.tzinfo is None:
        raise RequestError(f"{path}: needs a time zone (e.g. 2026-12-01T02:00:00Z)")
    try:
        return t.astimezone(UTC)
    except OverflowError:  # e.g. 9999-12-31T23:59:59-05:00 is past datetime.max in UTC
        raise RequestError(f"{path}: {value!r} is out of range") from None


def parse_spec(data: Any, *, path: str = "request_data") -> TaskSpec:
    """Turn a create request's ``request_data`` into a TaskSpec, or raise RequestError."""
    f = _Fields(data, path)
    task_id = f.pop("task_id", str, None)
    if task_id is None:
        task_id = uuid.uuid4().hex
    elif not TASK_ID_RE.fullmatch(task_id):
        raise RequestError(f"{path}.task_id: use 1-128 letters, digits, '_', '.', '-'")
    name = _bounded(f, "name", MAX_NAME)
    src = f.sub("source", required=True)
    dst = f.sub("target", required=True)
    assert src is not None and dst is not None
    source = parse_endpoint(src)
    target = parse_endpoint(dst)
    if target.rdb_file:
        raise RequestError(f"{path}.target.rdb_file: a file is a source only")
    if source.rdb_file:
        if f.obj.get("migration_method", "full_amount_migration") != "full_amount_migration":
            raise RequestError(f"{path}.migration_method: an rdb_file source is copied once: "
                               f"full_amount_migration only")
        if f.obj.get("reader", "auto") not in ("auto", "psync"):
            raise RequestError(f"{path}.reader: an rdb_file source is read as an RDB: leave "
                               f"reader out (or auto)")
    if target.read_from != "master":
        raise RequestError(f"{path + '.' if path else ''}target.read_from: only a source "
                           f"is read from")
    method = f.choice("migration_method", METHODS, "full_amount_migration")
    reader = f.choice("reader", READERS, "auto")
    resume_mode = f.choice("resume_mode", RESUME_MODES, "auto")
    bw = f.pop("bandwidth_limit_mb", int, None)
    if bw is not None and not 1 <= bw <= 10240:
        raise RequestError(f"{path}.bandwidth_limit_mb: must be 1..10240")
    start_raw = f.pop("start_at", str, None)
    start_at = parse_time(start_raw, f"{path}.start_at") if start_raw else None
    flt = parse_filter(f.sub("filter"))
    mapping_raw = f.pop("db_mapping", dict, {})
    if len(mapping_raw) > MAX_DB_MAPPING:
        raise RequestError(f"{path}.db_mapping: at most {MAX_DB_MAPPING} entries")
    mapping: dict[int, int] = {}
    for k, v in mapping_raw.items():
        if not (isinstance(k, str) and DB_RE.fullmatch(k) and int(k) <= MAX_DB):
            raise RequestError(f"{path}.db_mapping: key {k!r} is not a db number")
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_DB:
            raise RequestError(f"{path}.db_mapping.{k}: must be a db number 0..{MAX_DB}")
        mapping[int(k)] = v
    existing = f.choice("existing_keys", EXISTING_KEYS, "replace")
    write_mode = f.choice("write_mode", WRITE_MODES, "auto")
    functions = f.choice("functions", FUNCTIONS, "copy")
    modules = f.choice("modules", MODULES, "fail")
    shared = f.pop("shared_target", bool, False)
    link_timeout = f.pop("link_timeout_s", int, LINK_TIMEOUT_S)
    if not 1 <= link_timeout <= MAX_LINK_TIMEOUT_S:
        raise RequestError(f"{path}.link_timeout_s: must be 1..{MAX_LINK_TIMEOUT_S}")
    eviction = f.choice("on_target_eviction", EVICTION_ACTIONS, "warn")
    cv = parse_continuous_verify(f.sub("continuous_verify"))
    f.done()
    if not source.rdb_file and source.addrs == target.addrs:
        raise RequestError(f"{path}.target.addrs: must differ from source.addrs")
    return TaskSpec(task_id=task_id, name=name, source=source, target=target,
                    migration_method=method, reader=reader, resume_mode=resume_mode,
                    bandwidth_limit_mb=bw, start_at=start_at, filter=flt, db_mapping=mapping,
                    existing_keys=existing, write_mode=write_mode, functions=functions,
                    modules=modules,
                    shared_target=shared,
                    link_timeout_s=link_timeout, on_target_eviction=eviction,
                    continuous_verify=cv)


def parse_continuous_verify(fields: _Fields | None) -> ContinuousVerify | None:
    if fields is None:
        return None
    sample = fields.pop("sample", int, 1000)
    every = fields.pop("every_s", int, 300)
    fields.done()
    if not 1 <= sample <= 100_000:
        raise RequestError(f"{fields.path}.sample: must be 1..100000")
    if not 10 <= every <= 86_400:
        raise RequestError(f"{fields.path}.every_s: must be 10..86400")
    return ContinuousVerify(sample=sample, every_s=every)


def spec_from_store(data: dict[str, Any]) -> TaskSpec:
    """Rebuild a spec from what the store kept (unmasked, already validated once)."""
    return parse_spec(data, path="stored spec")


def same_spec(a: TaskSpec, b: TaskSpec) -> bool:
    """The same task as declared (a Sentinel endpoint's master found at run time aside)."""
    return a.to_json(mask=False) == b.to_json(mask=False)
