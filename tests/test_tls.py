"""TLS to the source and the target, end to end through the daemon, against real
redis-server processes listening on a TLS port only (certificates made here with
``cryptography``): psync and scan copies, mutual TLS, verify, the precheck's tls check,
and the failures an operator meets (wrong CA, wrong name, missing client certificate).
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from .compare import assert_same, fill_mixed, wait_same
from .daemon import Daemon, endpoint
from .servers import RedisServer, wait_for

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402

Servers = Callable[..., RedisServer]


def _write(path: Path, cert: Any, key: Any) -> tuple[str, str]:
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return str(path.with_suffix(".crt")), str(path.with_suffix(".key"))


def _cert(name: str, issuer: tuple[Any, Any] | None, *, ca: bool = False,
          san: list[Any] | None = None, client: bool = False) -> tuple[Any, Any]:
    """A P-256 key and its certificate, self-signed when ``issuer`` is None."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_cert, issuer_key = issuer if issuer else (None, key)
    now = datetime.datetime.now(datetime.UTC)
    b = (x509.CertificateBuilder().subject_name(subject)
         .issuer_name(issuer_cert.subject if issuer_cert else subject)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(hours=1))
         .not_valid_after(now + datetime.timedelta(days=2))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False,
                                          False), critical=True)
    else:
        usage = [ExtendedKeyUsageOID.CLIENT_AUTH] if client else \
            [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        b = b.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
    if san:
        b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return b.sign(issuer_key, hashes.SHA256()), key


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A CA, a server certificate for 127.0.0.1/localhost, a client certificate, and a
    server certificate of another CA."""
    d = tmp_path_factory.mktemp("tls")
    ca = _cert("cdcd test CA", None, ca=True)
    other_ca = _cert("another CA", None, ca=True)
    san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    out: dict[str, str] = {}
    out["ca"], _ = _write(d / "ca", *ca)
    out["other_ca"], _ = _write(d / "other_ca", *other_ca)
    out["cert"], out["key"] = _write(d / "server", *_cert("server", ca, san=san))
    out["client_cert"], out["client_key"] = _write(d / "client",
                                                   *_cert("cdcd", ca, client=True))
    out["other_cert"], out["other_key"] = _write(d / "other", *_cert("x", other_ca, san=san))
    return out


def tls_server(servers: Servers, certs: dict[str, str], *, mutual: bool = False) -> RedisServer:
    """A TLS-only server; ``mutual`` makes it require a client certificate."""
    tls = {k: certs[k] for k in ("cert", "key", "ca", "client_cert", "client_key")}
    tls["auth_clients"] = "yes" if mutual else "optional"
    return servers(tls=tls)


def tls_endpoint(server: RedisServer, certs: dict[str, str], **kw: Any) -> dict[str, Any]:
    out = endpoint(server, tls=True, tls_ca_file=certs["ca"])
    out.update(kw)
    return {k: v for k, v in out.items() if v is not None}


def mutual(certs: dict[str, str]) -> dict[str, str]:
    return {"tls_cert_file": certs["client_cert"], "tls_key_file": certs["client_key"]}


def checks_of(answer: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {c["name"]: c for c in answer["checks"]}


def test_psync_incremental_over_tls_with_mutual_tls_target(
        daemon: Daemon, servers: Servers, certs: dict[str, str]) -> None:
    src = tls_server(servers, certs)
    dst = tls_server(servers, certs, mutual=True)
    fill_mixed(src.client())
    data = {"task_id": "tls-psync", "source": tls_endpoint(src, certs),
            "target": tls_endpoint(dst, certs, **mutual(certs)),
            "migration_method": "incremental_migration", "reader": "psync"}
    daemon.create(data)
    wait_for(lambda: daemon.task("tls-psync")["phase"] == "incremental", 60,
             what="the incremental phase")
    src.client().set("after", "snapshot")
    src.client().hset("h-after", mapping={"a": "1"})
    wait_same(src.client(), dst.client(), ignore=[b"cdcd:checkpoint:tls-psync"])
    t = daemon.task("tls-psync")
    assert t["state"] == "Running" and t["progress"]["reader"] == "psync", t
    pre = {c["name"]: c for c in t["prechecks"]}
    assert pre["source.tls"]["status"] == "ok" and "TLSv1." in pre["source.tls"]["message"]
    assert pre["target.tls"]["status"] == "ok" and "client certificate" in \
        pre["target.tls"]["message"]
    assert t["spec"]["target"]["tls_cert_file"] == certs["client_cert"]
    vid = daemon.ok("verify", {"task_id": "tls-psync"})["verification_id"]

    def finished() -> dict[str, Any] | None:
        v = daemon.ok("get", {"verification_id": vid})["verification"]
        return v if v["state"] in ("done", "failed") else None
    v = wait_for(finished, 60, what="the verification")
    assert v["state"] == "done" and v["result"]["consistent"], v


def test_scan_full_over_tls(daemon: Daemon, servers: Servers, certs: dict[str, str]) -> None:
    src = tls_server(servers, certs, mutual=True)
    dst = tls_server(servers, certs)
    fill_mixed(src.client(), big=False)
    daemon.create({"task_id": "tls-scan", "source": tls_endpoint(src, certs, **mutual(certs)),
                   "target": tls_endpoint(dst, certs, tls_server_name="localhost"),
                   "migration_method": "full_amount_migration", "reader": "scan"})
    daemon.wait_state("tls-scan", "Succeeded")
    assert_same(src.client(), dst.client())


def test_tls_failures_and_skip_verify(daemon: Daemon, servers: Servers,
                                      certs: dict[str, str]) -> None:
    src = tls_server(servers, certs, mutual=True)
    dst = tls_server(servers, certs)
    src.client().set("k", "v")

    def precheck(source: dict[str, Any], target: dict[str, Any] | None = None
                 ) -> dict[str, dict[str, str]]:
        return checks_of(daemon.ok("precheck", {
            "source": source, "target": target or tls_endpoint(dst, certs), "reader": "scan"}))

    wrong_ca = tls_endpoint(src, certs, tls_ca_file=certs["other_ca"], **mutual(certs))
    c = precheck(wrong_ca)["source.connection"]
    assert c["status"] == "error" and "TLS handshake failed: certificate verify failed" in \
        c["message"], c
    c = precheck(tls_endpoint(src, certs, tls_server_name="db.example", **mutual(certs)))
    assert "certificate verify failed" in c["source.connection"]["message"]
    assert "db.example" in c["source.connection"]["message"]
    c = precheck(tls_endpoint(src, certs))["source.connection"]   # no client certificate
    assert c["status"] == "error" and "set tls_cert_file" in c["message"], c
    c = precheck(tls_endpoint(src, certs, tls_ca_file="/nonexistent/ca.pem"))
    assert c["source.connection"]["message"] == \
        "source TLS: cannot read tls_ca_file /nonexistent/ca.pem: No such file or directory"
    # a server whose certificate another CA signed is refused; skip_verify accepts it
    other = servers(tls={"cert": certs["other_cert"], "key": certs["other_key"],
                         "ca": certs["other_ca"]})
    c = precheck(tls_endpoint(src, certs, **mutual(certs)), tls_endpoint(other, certs))
    assert "certificate verify failed" in c["target.connection"]["message"], c
    skip = tls_endpoint(other, certs, tls_ca_file=None, tls_skip_verify=True)
    c = precheck(tls_endpoint(src, certs, **mutual(certs)), skip)
    assert c["target.connection"]["status"] == "ok", c
    assert c["target.tls"]["status"] == "warning" and "tls_skip_verify" in \
        c["target.tls"]["message"]

    daemon.create({"task_id": "skip", "source": tls_endpoint(src, certs, **mutual(certs)),
                   "target": skip, "reader": "scan"})
    t = daemon.wait_state("skip", "Succeeded")
    assert other.client().get("k") == b"v"
    assert {c["name"]: c["status"] for c in t["prechecks"]}["target.tls"] == "warning"
    daemon.create({"task_id": "wrong-ca", "source": wrong_ca,
                   "target": tls_endpoint(dst, certs), "reader": "scan"})
    t = daemon.wait_state("wrong-ca", "Failed")
    assert "certificate verify failed" in t["reason"], t


@pytest.mark.parametrize("field,value,needle", [
    ("tls_ca_file", "/ca.pem", "needs tls: true"),
    ("tls_skip_verify", True, "needs tls: true"),
    ("tls_server_name", "db.example", "needs tls: true"),
])
def test_tls_fields_need_tls(field: str, value: Any, needle: str) -> None:
    from cdcd.errors import RequestError
    from cdcd.spec import parse_spec
    with pytest.raises(RequestError, match=f"request_data.source.{field}: {needle}"):
        parse_spec({"source": {"addrs": "127.0.0.1:1", field: value},
                    "target": {"addrs": "127.0.0.1:2"}})
    with pytest.raises(RequestError, match="tls_key_file: required"):
        parse_spec({"source": {"addrs": "127.0.0.1:1", "tls": True, "tls_cert_file": "/c"},
                    "target": {"addrs": "127.0.0.1:2"}})
