"""The code base stays ruff- and mypy-clean: checked in the suite so that CI enforces it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.harness.cache import cache_root

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_ruff_clean() -> None:
    result = _run("ruff", "check", "borgdqn", "operator", "tests", "benchmarks")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_clean() -> None:
    # The packages listed in pyproject.toml: borgdqn, borg_operator and tests.harness. The cache lives with the
    # harness's, so that a fresh clone does not analyse torch and the other dependencies again (37 s -> 1 s);
    # mypy checks every cached module's hash, so a stale entry is analysed again, never trusted.
    result = _run("mypy", "--cache-dir", str(cache_root() / "mypy"))
    assert result.returncode == 0, result.stdout + result.stderr
