"""Passwords given by reference: ``{"env": "NAME"}`` or ``{"file": "/run/secrets/x"}``.

The spec (and so the store and the task view) keeps the reference, never the value; the
value is read each time a connection is opened, so a rotated secret file is picked up at
the next reconnect. Errors name the reference, never a value.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from .errors import EndpointError, RequestError

ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MAX_ENV_NAME = 256
MAX_PATH = 4096
MAX_VALUE = 4096        # bytes of a resolved secret, as for a password given inline


@dataclass(frozen=True, kw_only=True)
class SecretRef:
    """Where a secret is read from: an environment variable or a file (one of them)."""

    env: str = ""
    file: str = ""

    def __repr__(self) -> str:
        return f"SecretRef({self.describe})"

    @property
    def describe(self) -> str:
        return f"environment variable {self.env}" if self.env else f"file {self.file}"

    def to_json(self) -> dict[str, str]:
        return {"env": self.env} if self.env else {"file": self.file}


Secret = str | SecretRef


def parse_secret(value: Any, path: str, limit: int) -> Secret:
    """Accept a string (at most ``limit`` characters) or a reference; name ``path`` in errors."""
    if isinstance(value, str):
        if len(value) > limit:
            raise RequestError(f"{path}: at most {limit} characters")
        return value
    if not isinstance(value, dict):
        raise RequestError(f'{path}: must be a string, {{"env": "NAME"}} or {{"file": "/path"}}')
    if set(value) - {"env", "file"}:
        unknown = sorted(set(value) - {"env", "file"})[0]
        raise RequestError(f"{path}.{unknown}: unknown field (use env or file)")
    if len(value) != 1:
        raise RequestError(f'{path}: give exactly one of "env" and "file"')
    (kind, ref), = value.items()
    if not isinstance(ref, str):
        raise RequestError(f"{path}.{kind}: must be a string")
    if kind == "env":
        if len(ref) > MAX_ENV_NAME or not ENV_NAME_RE.fullmatch(ref):
            raise RequestError(f"{path}.env: must be an environment variable name "
                               f"([A-Za-z_][A-Za-z0-9_]*, at most {MAX_ENV_NAME} characters)")
        return SecretRef(env=ref)
    if len(ref) > MAX_PATH:
        raise RequestError(f"{path}.file: at most {MAX_PATH} characters")
    if not ref.startswith("/") or any(c < " " or c == "\x7f" for c in ref):
        raise RequestError(f"{path}.file: must be an absolute path without control characters")
    return SecretRef(file=ref)


def reveal(secret: Secret, what: str) -> bytes:
    """Return the secret's value, read now; ``what`` ('source password') starts errors.

    A file's content loses one trailing newline. A missing variable, an unreadable, empty
    or oversized file is an EndpointError naming the reference (a fresh task fails on it,
    a running one retries, so a secret being rotated is waited for).
    """
    if isinstance(secret, str):
        return secret.encode()
    if secret.env:
        raw = os.environ.get(secret.env)
        if raw is None:
            raise EndpointError(f"{what}: environment variable {secret.env} is not set")
        value = os.fsencode(raw)
    else:
        try:
            with open(secret.file, "rb") as fh:
                value = fh.read(MAX_VALUE + 3)
        except OSError as exc:
            raise EndpointError(f"{what}: cannot read file {secret.file}: "
                                f"{exc.strerror or type(exc).__name__}") from None
        if value.endswith(b"\n"):
            value = value[:-2] if value.endswith(b"\r\n") else value[:-1]
    if not value:
        raise EndpointError(f"{what}: {secret.describe} is empty")
    if len(value) > MAX_VALUE:
        raise EndpointError(f"{what}: {secret.describe} holds more than {MAX_VALUE} bytes")
    return value
