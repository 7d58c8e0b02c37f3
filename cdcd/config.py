"""Daemon configuration: defaults < config file < command-line flags."""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CdcdError

DEFAULT_CONFIG = Path("config/cdcd.toml")


class ConfigError(CdcdError):
    pass


@dataclass(kw_only=True)
class Config:
    host: str = "127.0.0.1"
    port: int = 8444
    data_dir: str = "./data"
    max_tasks: int = 100
    max_body_bytes: int = 1 << 20
    auth_token: str = ""
    auth_token_file: str = ""
    metrics_need_token: bool = False
    log_level: str = "INFO"

    def __repr__(self) -> str:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if fields["auth_token"]:
            fields["auth_token"] = "***"
        return "Config(" + ", ".join(f"{k}={v!r}" for k, v in fields.items()) + ")"

    def token(self) -> str:
        """The bearer token, from CDCD_AUTH_TOKEN, the token file, or the config."""
        env = os.environ.get("CDCD_AUTH_TOKEN", "")
        if env:
            return env
        if self.auth_token_file:
            try:
                return Path(self.auth_token_file).read_text().strip()
            except OSError as exc:
                raise ConfigError(f"auth_token_file {self.auth_token_file}: {exc}") from exc
        return self.auth_token


def load(path: str | None, overrides: dict[str, Any]) -> Config:
    """Read the config file (the given one, else config/cdcd.toml if present), then flags."""
    cfg = Config()
    file = Path(path) if path else DEFAULT_CONFIG
    if path or file.exists():
        try:
            doc = tomllib.loads(file.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"config file {file}: {exc}") from exc
        section = doc.get("daemon", doc)
        apply(cfg, section, str(file))
    apply(cfg, {k: v for k, v in overrides.items() if v is not None}, "command line")
    return cfg


def apply(cfg: Config, values: dict[str, Any], origin: str) -> None:
    types = {f.name: f.type for f in dataclasses.fields(cfg)}
    for key, value in values.items():
        if key not in types:
            raise ConfigError(f"{origin}: unknown setting {key!r}")
        want = {"str": str, "int": int, "bool": bool}[str(types[key])]
        if want is int and isinstance(value, bool) or not isinstance(value, want):
            raise ConfigError(f"{origin}: {key} must be a {want.__name__}")
        setattr(cfg, key, value)
    if not 0 <= cfg.port < 65536:
        raise ConfigError(f"{origin}: port must be 0..65535")
