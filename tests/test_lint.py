"""The package stays mypy --strict and ruff clean (STYLE.md)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def tool(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{module} is missing on CI (it is a test extra)")
        pytest.skip(f"{module} is not installed")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_mypy_strict() -> None:
    tool("mypy")
    result = run("mypy", "cdcd")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff() -> None:
    tool("ruff")
    result = run("ruff", "check", "cdcd")
    assert result.returncode == 0, result.stdout + result.stderr
