"""Passwords by reference (``{"env": ...}``, ``{"file": ...}``) through the real daemon and
real servers with requirepass: the task works, the data dir never holds the values, the
view shows the references, a missing variable fails the task naming it, and a rotated
file is read again at the next reconnect.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from cdcd.errors import EndpointError, RequestError
from cdcd.secrets import SecretRef, reveal
from cdcd.spec import parse_spec

from .compare import wait_same
from .daemon import Daemon, endpoint
from .servers import RedisServer, wait_for

SRC_PW, DST_PW, DST_PW2 = "Src-Env-Secret-7", "Dst-File-Secret-8", "Dst-Rotated-Secret-9"


def test_env_and_file_references_end_to_end(
        servers: Callable[..., RedisServer], daemon_factory: Callable[..., Daemon],
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src, dst = servers(password=SRC_PW), servers(password=DST_PW)
    monkeypatch.setenv("CDCD_TEST_SRC_PW", SRC_PW)
    monkeypatch.delenv("CDCD_TEST_UNSET_PW", raising=False)
    pw_file = tmp_path / "dst-password"
    pw_file.write_text(DST_PW + "\n")
    daemon = daemon_factory()      # inherits the environment
    src.client().set("k1", "v1")
    data = {"task_id": "refs", "migration_method": "incremental_migration", "reader": "psync",
            "source": endpoint(src.addr, password={"env": "CDCD_TEST_SRC_PW"}),
            "target": endpoint(dst.addr, password={"file": str(pw_file)})}
    daemon.create(data)
    wait_for(lambda: daemon.task("refs")["phase"] == "incremental", 60, what="streaming")
    ignore = [b"cdcd:checkpoint:refs"]
    wait_same(src.client(), dst.client(), ignore=ignore)
    view = daemon.task("refs")["spec"]
    assert view["source"]["password"] == {"env": "CDCD_TEST_SRC_PW"}
    assert view["target"]["password"] == {"file": str(pw_file)}

    # rotate the target's password: the next reconnect reads the file again
    pw_file.write_text(DST_PW2 + "\n")
    admin = dst.client()
    admin.config_set("requirepass", DST_PW2)
    admin.client_kill_filter(_type="normal", skipme=True)
    dst.password = DST_PW2
    src.client().set("k2", "after rotation")
    wait_same(src.client(), dst.client(), ignore=ignore)
    t = daemon.task("refs")
    assert t["state"] == "Running" and t["progress"]["retries"] >= 1, t

    daemon.create({"task_id": "unset", "source": endpoint(src.addr, password={
        "env": "CDCD_TEST_UNSET_PW"}), "target": endpoint(dst.addr), "reader": "scan",
        "shared_target": True})
    t = daemon.wait_state("unset", "Failed")
    assert "source password: environment variable CDCD_TEST_UNSET_PW is not set" in \
        t["reason"], t

    daemon.stop()
    for path in daemon.data_dir.rglob("*"):
        if path.is_file():
            raw = path.read_bytes()
            for secret in (SRC_PW, DST_PW, DST_PW2):
                assert secret.encode() not in raw, (path, secret)
    assert daemon.store()["tasks"]["refs"]["spec"]["source"]["password"] == \
        {"env": "CDCD_TEST_SRC_PW"}
    log = daemon.log_text()
    assert SRC_PW not in log and DST_PW not in log and DST_PW2 not in log


def test_reveal_and_reference_shapes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "pw"
    f.write_bytes(b"line1\nline2\r\n")
    assert reveal(SecretRef(file=str(f)), "source password") == b"line1\nline2"
    monkeypatch.setenv("CDCD_X", "Env-Value-3")
    assert reveal(SecretRef(env="CDCD_X"), "source password") == b"Env-Value-3"
    with pytest.raises(EndpointError, match=f"target password: cannot read file "
                                            f"{tmp_path}/nope: No such file or directory"):
        reveal(SecretRef(file=str(tmp_path / "nope")), "target password")
    spec = parse_spec({"source": {"addrs": "h:1", "password": {"env": "CDCD_X"}},
                       "target": {"addrs": "h:2"}})
    assert "Env-Value-3" not in repr(spec) and "CDCD_X" in repr(spec)
    for bad, needle in [({"env": "1X"}, "password.env"), ({"file": "rel/x"}, "password.file"),
                        ({"env": "A", "file": "/x"}, "exactly one"), ({}, "exactly one"),
                        ({"envv": "A"}, "password.envv"), ({"env": 5}, "password.env"),
                        (5, "request_data.source.password"), ("x" * 4097, "4096")]:
        with pytest.raises(RequestError, match=needle):
            parse_spec({"source": {"addrs": "h:1", "password": bad}, "target": {"addrs": "h:2"}})
