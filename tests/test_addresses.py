"""Addresses in ``addrs``: host names (RFC 1123, IDNA), IP literals, ports, no control
characters, and redis:// / rediss:// URLs split into address, credentials and TLS."""

from __future__ import annotations

from typing import Any

import pytest

from cdcd.errors import RequestError
from cdcd.spec import TaskSpec, parse_spec

PATH = "request_data.source.addrs"


def parse(addrs: Any, **source: Any) -> TaskSpec:
    return parse_spec({"source": {"addrs": addrs, **source}, "target": {"addrs": "127.0.0.1:2"}})


@pytest.mark.parametrize("addrs,needle", [
    ("h\x00st:6379", "control characters"),
    ("host:6379\n2026-01-01 INFO forged", "control characters"),
    ("host\r:1", "control characters"),
    ("my host:6379", "spaces"),
    ("h\u2028:1", "control characters"),
    ("-host:6379", "not a host name"),
    ("host-:6379", "not a host name"),
    ("a..b:6379", "not a host name"),
    ("-host:6379", "not a host name"),
    ("a" * 64 + ".example:6379", "not a host name"),
    (".".join(["a" * 60] * 5) + ":6379", "longer than 253"),
    ("host:0", "1..65535"),
    ("host:65536", "1..65535"),
    ("host", "not host:port"),
    ("300.1.1.1:6379", "not an IPv4 address"),
    ("::1:6379", "in brackets"),
    ("[::1]", "not host:port"),
    ("[127.0.0.1]:6379", "IPv6 addresses only"),
    ("[::g]:6379", "not an IPv6 address"),
    ("redis://h:6379/0", "filter.dbs and db_mapping"),
    ("redis://h:6379/x", "path, query or fragment"),
    ("http://h:6379", "redis:// or rediss://"),
    ("user:pw@h:6379", "redis:// or rediss:// URL"),
    ("rediss://:a@h:1,rediss://:b@g:2", "disagree"),
    ("redis://h:1,rediss://g:2", "disagree"),
])
def test_bad_addresses_are_400_naming_the_field(addrs: str, needle: str) -> None:
    with pytest.raises(RequestError) as info:
        parse(addrs)
    assert info.value.code == 400
    assert info.value.message.startswith(PATH + ":") and needle in info.value.message
    assert "\n" not in info.value.message and "\x00" not in info.value.message


@pytest.mark.parametrize("addrs,hosts", [
    ("127.0.0.1:6379", [("127.0.0.1", 6379)]),
    ("project_redis_1:6379", [("project_redis_1", 6379)]),     # Docker Compose v1 names
    ("[::1]:6379", [("::1", 6379)]),
    ("[fe80::1]:1,localhost:65535", [("fe80::1", 1), ("localhost", 65535)]),
    ("bücher.example:6379", [("xn--bcher-kva.example", 6379)]),
    ("a-1.b2.example:7000 , db:7001", [("a-1.b2.example", 7000), ("db", 7001)]),
    (["a:1", "b:2"], [("a", 1), ("b", 2)]),
])
def test_good_addresses(addrs: Any, hosts: list[tuple[str, int]]) -> None:
    ep = parse(addrs).source
    assert list(ep.addrs) == hosts
    assert parse(ep.display).source.addrs == ep.addrs    # what the store keeps parses back


def test_urls_split_into_address_credentials_and_tls() -> None:
    ep = parse("redis://alice:p%40ss%2Cw@db.example:6380").source
    assert ep.addrs == (("db.example", 6380),) and ep.username == "alice"
    assert ep.password == "p@ss,w" and not ep.tls
    shown = ep.to_json(mask=True)
    assert shown["addrs"] == "db.example:6380" and shown["password"] == "***"
    assert "p@ss" not in repr(ep)
    ep = parse("rediss://:pw@[::1]").source          # the port defaults to 6379
    assert ep.addrs == (("::1", 6379),) and ep.password == "pw" and ep.tls
    assert ep.to_json(mask=False)["addrs"] == "[::1]:6379"
    ep = parse("rediss://a:1,b:2", password={"env": "PW"}).source
    assert ep.tls and ep.addrs == (("a", 1), ("b", 2))


@pytest.mark.parametrize("source,field", [
    ({"password": "x"}, "password"),
    ({"username": "u"}, "username"),
    ({"tls": False}, "tls"),
])
def test_url_conflicting_with_explicit_fields(source: dict[str, Any], field: str) -> None:
    with pytest.raises(RequestError, match=f"request_data.source.{field}:"):
        parse("rediss://u:p@h:1", **source)


def test_url_errors_never_quote_the_password() -> None:
    for addrs in ("redis://u:Secret-1@h:0", "redis://u:Secret-1@h:1/2", "redis://u:Secret-1@-h:1",
                  "u:Secret-1@h:1"):
        with pytest.raises(RequestError) as info:
            parse(addrs)
        assert "Secret-1" not in info.value.message, info.value.message
