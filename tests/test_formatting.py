"""The repository's formatting is enforced, not only configured: `ruff check`, `ruff format
--check` and `snakefmt --check` over the whole tree, with the settings of pyproject.toml."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _run(tool: str, *args: str) -> subprocess.CompletedProcess:
    exe = BIN / tool
    if not exe.exists():
        pytest.fail(
            f"{tool} is missing from {BIN}: install the test extras (pip install -e '.[test]')"
        )
    return subprocess.run([str(exe), *args], cwd=ROOT, capture_output=True, text=True, check=False)


def _check(result: subprocess.CompletedProcess, fix: str) -> None:
    assert result.returncode == 0, f"{result.stdout}{result.stderr}\nfix with: {fix}"


def test_ruff_check():
    _check(_run("ruff", "check", "--no-cache", "."), "ruff check --fix .")


def test_ruff_format():
    _check(_run("ruff", "format", "--check", "--no-cache", "."), "ruff format .")


def test_snakefmt():
    _check(_run("snakefmt", "--check", "Snakefile", "workflow"), "snakefmt Snakefile workflow")
